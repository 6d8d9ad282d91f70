"""MetaModel: a base causal LM with wrapped layers, the fast-weight init and the TAMS controller.

The base weights, the TARP/LoRA meta-init, the TAMS op-weight init and the controller are its
parameters; fast weights are tensors passed in through :class:`FastContext`. It knows nothing of
the algorithm that trains it (:class:`~metaprep.meta.build.MetaLearner` pairs the two for DeepSpeed)
nor of the inner-loop settings, which the caller passes explicitly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaprep.config import ReparamConfig, SearchConfig
from metaprep.reparam.context import FastContext, FastWeights
from metaprep.reparam.wrap import FastWeightInit, wrap_dense_layers
from metaprep.search.cell import PROJECTIONS, TAMSCell, cell_shapes, init_cell_weight, num_edges
from metaprep.search.controller import ArchController
from metaprep.tasks.base import TaskBatch


def ffn_modules(lm: nn.Module) -> list[tuple[str, nn.Module]]:
    """The FFN of each decoder layer (``...layers.N.mlp`` in Llama, ``...h.N.mlp`` in GPT-2)."""
    return [(name, mod) for name, mod in lm.named_modules() if name.endswith(".mlp")]


class MetaModel(nn.Module):
    """``lm`` with its dense layers wrapped for ``reparam`` and, when ``search`` is given, TAMS cells.

    ``seed`` fixes the initialisation of the fast-weight init (seed + 1) and of the TAMS op weights
    (seed + 2).
    """

    def __init__(self, lm: nn.Module, reparam: ReparamConfig, search: SearchConfig | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.lm = lm
        self.ctx = FastContext()
        self.fast_init = FastWeightInit()
        wrappers = wrap_dense_layers(lm, reparam, self.ctx)
        self.fast_init.add_reparam(wrappers, seed=seed + 1)
        self.controller: ArchController | None = None
        self.encoded_tasks = False  # TAMS z from a sentence encoder, carried by the support batch
        if search is not None:
            self._add_tams(search, seed)

    @property
    def uses_tams(self) -> bool:
        return self.controller is not None

    def _add_tams(self, s: SearchConfig, seed: int) -> None:
        from metaprep.search.task_encoder import support_encoder, uses_sentence_encoder

        dim = self.lm.get_input_embeddings().weight.shape[1]
        self.encoded_tasks = uses_sentence_encoder(s)  # z comes with the batch (TaskBatch.embedding)
        z_dim = support_encoder(s.encoder_path).dim if self.encoded_tasks else dim
        gen = torch.Generator().manual_seed(seed + 2)
        ffns = ffn_modules(self.lm)
        for index, (name, ffn) in enumerate(ffns):
            TAMSCell(f"{name}.tams", index, s.nodes, s.ops, self.ctx).attach(ffn)
            for factor, shape in cell_shapes(dim, s.width, s.nodes, s.ops).items():
                self.fast_init.add(f"{name}.tams", factor, init_cell_weight(factor, shape, gen),
                                   adapted=factor not in PROJECTIONS)
        self.controller = ArchController(z_dim, len(ffns), num_edges(s.nodes), s.ops, s.controller_hidden)

    # ------------------------------------------------------------------ forward pieces
    def task_losses(self, batch: TaskBatch, fast: FastWeights | None, arch: torch.Tensor | None = None,
                    ) -> torch.Tensor:
        """Mean next-token loss on target tokens, per task: shape (T,). One forward for all tasks."""
        with self.ctx.use(fast, arch, batch.num_tasks):
            return lm_task_losses(self.lm, batch)

    def task_embedding(self, batch: TaskBatch) -> torch.Tensor:
        """z: mean input embedding of the support set (MLtD), or the sentence-encoder embedding that the batch
        carries (``search.task_embedding: sentence_encoder``, :mod:`metaprep.search.task_encoder`)."""
        if batch.embedding is not None:
            return batch.embedding
        if self.encoded_tasks:
            raise ValueError("search.task_embedding: sentence_encoder needs support batches encoded with the task "
                             "encoder (metaprep.tasks.families.batch_encoder_for(cfg))")
        emb = self.lm.get_input_embeddings()(batch.input_ids)  # (T, n, L, C)
        mask = batch.attention_mask.unsqueeze(-1).to(emb.dtype)
        return ((emb * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1)).detach()

    def architecture(self, support: TaskBatch, tau: float = 1.0, sample: bool = True) -> torch.Tensor | None:
        if self.controller is None:
            return None
        return self.controller(self.task_embedding(support), tau=tau, sample=sample, noise_seeds=support.noise_seeds)


# model types whose logits are exactly ``get_output_embeddings()(base_model(...).last_hidden_state)``
HEAD_AT_TARGETS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})


def lm_task_losses(lm: nn.Module, batch: TaskBatch, head_at_targets: bool = True) -> torch.Tensor:
    """Per-task mean next-token loss on target tokens, (T,), of a causal LM on a (T, n, L) batch.

    The LM head and cross entropy run only at positions whose next token is a target, not at every
    position (issue 17: for SmolLM2 a 49k-vocabulary head on 64 positions where a reply has 16 targets
    is most of the step); the result does not depend on how tasks are sharded. Models outside
    :data:`HEAD_AT_TARGETS`, and ``head_at_targets=False`` (a caller that must run the top-level forward,
    e.g. a ``higher`` functional model whose submodules read parameters the top-level call fills), get full logits.
    """
    t, n, length = batch.input_ids.shape
    ids = batch.input_ids.reshape(t * n, length)
    mask = batch.attention_mask.reshape(t * n, length)
    labels = batch.labels[..., 1:].reshape(t * n, length - 1)
    keep = labels != -100
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if head_at_targets and head is not None and model_type in HEAD_AT_TARGETS:
        hidden = lm.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][keep])  # (K, V): target positions only
    else:
        logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][keep]
    if logits.dtype in (torch.bfloat16, torch.float16):  # CE in fp32 under autocast
        logits = logits.float()
    tok = F.cross_entropy(logits, labels[keep], reduction="none")
    task_of = torch.arange(t, device=ids.device).repeat_interleave(n * (length - 1))[keep.reshape(-1)]
    sums = torch.zeros(t, dtype=tok.dtype, device=tok.device).index_add(0, task_of, tok)
    return sums / keep.view(t, -1).sum(1).clamp_min(1)
