"""Direct finetuning: the pretrained base adapted to each new task with no meta-training.

The baseline every paper compares against (MLtD Table 2 "pretrain + finetune"). It performs no
outer updates; evaluation adapts a fresh low-rank adapter of the configured kind per task.
"""

from __future__ import annotations

from metaprep.meta.algorithm import MetaAlgorithm, register


@register
class Finetune(MetaAlgorithm):
    name = "finetune"
    trains_fast_init = False
    meta_trains = False
    encoder_ok = True

    def meta_loss(self, model, support, query, step):
        raise RuntimeError("finetune performs no meta-training")
