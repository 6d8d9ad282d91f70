"""A sentence encoder that scores 20 candidate replies: the convai2_mc model of DESIGN.md §4.

Block et al. (2024, §5) finetune RoBERTa + LoRA to pick the gold reply of a dialogue context among
20 candidates. Here the encoder (all-MiniLM-L6-v2 by default) embeds the context and every
candidate separately (bi-encoder: mean over non-pad tokens, L2-normalised, as the model's own
``1_Pooling`` config says); the score of candidate c is ``s · cos(e_context, e_c)`` with the
fixed scale s = 20 of sentence-transformers' ranking loss, and the task loss is the 20-way cross
entropy of the gold candidate, averaged over a task's examples.

:class:`MCScorer` is a :class:`~metaprep.meta.model.MetaModel` whose ``lm`` is the encoder, so the
LoRA fast weights, the meta-learned init and every first-order algorithm (``finetune``,
``multitask`` = standard retraining, ``meta_lora``: the algorithms registered with ``encoder_ok``)
run unchanged; only :meth:`task_losses` differs. :func:`metaprep.meta.build.build_meta_model`
builds it for the ``convai2_mc`` task family.

Batches (:func:`metaprep.tasks.convai2_mc.make_mc_batch`) reuse :class:`TaskBatch` with one more
axis: ``input_ids``/``attention_mask`` are (T, n, 1 + C, L) (the context, then the C candidates)
and ``labels`` is (T, n), the gold candidate's index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metaprep.meta.model import MetaModel
from metaprep.reparam.context import FastWeights
from metaprep.tasks.base import TaskBatch

SCALE = 20.0  # cosine-similarity scale (temperature 0.05), sentence-transformers MultipleNegativesRankingLoss
ENCODER_TARGETS = ("query", "value")  # LoRA on attention q/v, as in the paper's RoBERTa experiment


class MCScorer(MetaModel):
    """Bi-encoder multiple-choice scorer with fast weights on the encoder's dense layers (``lm``)."""

    def embed(self, ids: torch.Tensor, mask: torch.Tensor, fast: FastWeights | None, num_tasks: int) -> torch.Tensor:
        """Mean-pooled, L2-normalised sentence embeddings of (T·m, L) token ids; rows are task-major."""
        with self.ctx.use(fast, None, num_tasks):
            hidden = self.lm(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
        return F.normalize(pooled.to(torch.promote_types(pooled.dtype, torch.float32)), dim=-1)  # fp32 under bf16

    def scores(self, batch: TaskBatch, fast: FastWeights | None) -> torch.Tensor:
        """Candidate logits (T, n, C): ``SCALE`` x cosine of the context with each candidate."""
        t, n, s, length = batch.input_ids.shape
        emb = self.embed(batch.input_ids.reshape(t * n * s, length), batch.attention_mask.reshape(t * n * s, length),
                         fast, t).view(t, n, s, -1)
        return SCALE * torch.einsum("tnd,tncd->tnc", emb[:, :, 0], emb[:, :, 1:])

    def accuracy(self, batch: TaskBatch, fast: FastWeights | None) -> torch.Tensor:
        """Per task (T,): fraction of examples whose gold candidate scores highest."""
        return (self.scores(batch, fast).argmax(-1) == batch.labels).float().mean(1)

    def task_losses(self, batch: TaskBatch, fast: FastWeights | None, arch: torch.Tensor | None = None,
                    ) -> torch.Tensor:
        """Mean 20-way cross entropy of the gold candidate, per task: shape (T,)."""
        logits = self.scores(batch, fast)
        t, n, c = logits.shape
        return F.cross_entropy(logits.reshape(t * n, c), batch.labels.reshape(-1), reduction="none").view(t, n).mean(1)
