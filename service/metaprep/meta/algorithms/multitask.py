"""Standard retraining / multitask learning (the baseline of Block et al. 2024, §3).

Fit one shared model to the pooled data of the meta-training tasks (support and query alike),
with no fast weights: min_W Σ_t L_t(W). At meta-test a fresh low-rank adapter is finetuned on
the new task; nothing in this objective makes W adaptable, which is what Meta-LoRA fixes.
"""

from __future__ import annotations

from metaprep.meta.algorithm import MetaAlgorithm, register


@register
class Multitask(MetaAlgorithm):
    name = "multitask"
    trains_fast_init = False
    encoder_ok = True

    def meta_loss(self, model, support, query, step):
        losses = model.task_losses(support.concat(query), None, None)
        return losses, {"query_loss": float(losses.detach().mean())}
