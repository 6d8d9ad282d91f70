"""Task embeddings from a sentence encoder over the support set (issue 18: TAMS diversity).

MLtD §3.2 feeds the architecture controller a task embedding z; the paper's z is the mean input
embedding of the support tokens (:meth:`MetaModel.task_embedding`), which varies little between tasks of
one language and lets the controller collapse to one architecture. With
``search.task_embedding: sentence_encoder`` z is instead the mean over the support examples of a frozen
sentence encoder's embeddings (all-MiniLM-L6-v2 by default: mean over non-pad tokens, L2-normalised,
as its ``1_Pooling`` config says), computed when a support batch is encoded
(:func:`metaprep.tasks.families.batch_encoder`) and carried in ``TaskBatch.embedding``. The encoder is
never trained and is not part of the model's state: a registered controller records
``search.encoder_path`` in its spec and whoever adapts it loads the same encoder.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from metaprep.tasks.base import Episode

ENCODER_MAX_TOKENS = 128  # all-MiniLM-L6-v2 was trained on up to 128 word pieces
CACHE_SIZE = 50_000  # embeddings kept per process (384 floats each for MiniLM: ~75 MB at most)


class SupportEncoder:
    """z_t = mean over task t's support examples of normalised sentence embeddings of ``prompt + target``."""

    def __init__(self, path: str) -> None:
        from metaprep.models.base import resolve_path
        from metaprep.models.hf import load_encoder

        self.path = path
        self.model, self.tokenizer = load_encoder(resolve_path(path, "search.encoder_path"))
        self.model.requires_grad_(False)
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed_text(self, text: str) -> torch.Tensor:
        """(D,) fp32 embedding of one text, encoded alone (no padding: the value does not depend on which
        texts share a batch, so W workers = 1 worker) and cached (tasks' examples recur across meta-steps)."""
        if text not in self._cache:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            enc = self.tokenizer(text, truncation=True, max_length=ENCODER_MAX_TOKENS, return_tensors="pt")
            with torch.autocast("cpu", enabled=False):
                hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            self._cache[text] = F.normalize(hidden[0].float().mean(0), dim=-1)
        return self._cache[text]

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(N, D) sentence embeddings, fp32."""
        return torch.stack([self.embed_text(t) for t in texts])

    def __call__(self, episodes: list[Episode]) -> torch.Tensor:
        """(T, D): one embedding per episode, from its support set only (the query is never seen)."""
        texts = [f"{ex.prompt}{ex.target}" for ep in episodes for ex in ep.support]
        sizes = [len(ep.support) for ep in episodes]
        per_example = self.embed_texts(texts)
        return torch.stack([chunk.mean(0) for chunk in per_example.split(sizes)])


@lru_cache(maxsize=2)
def support_encoder(path: str) -> SupportEncoder:
    """One loaded encoder per process and path (the Ray Train worker, the benchmark, ``jobs.adapt``)."""
    return SupportEncoder(path)


def uses_sentence_encoder(search) -> bool:
    return search is not None and search.task_embedding == "sentence_encoder"


def task_encoder(cfg) -> SupportEncoder | None:
    """The encoder a :class:`~metaprep.config.MetaTrainConfig` asks for (a TAMS algorithm with
    ``search.task_embedding: sentence_encoder``), or None (the paper's mean input embedding)."""
    from metaprep.meta.algorithm import ALGORITHMS

    if not ALGORITHMS[cfg.algorithm].uses_tams or not uses_sentence_encoder(cfg.search):
        return None
    return support_encoder(cfg.search.encoder_path)
