"""Reptile (Nichol, Achiam, Schulman, 2018): move the init towards the adapted weights.

Update (Algorithm 1 of the paper): θ ← θ + ε · mean_t (φ_t − θ), with φ_t the fast weights after
``meta.inner_steps`` steps on the task's support and query data. We express it as the gradient
of the surrogate ½‖θ − sg(φ_t)‖² (its gradient is θ − φ_t), so the outer optimizer and
DeepSpeed apply it like any other loss. The base weights, which the inner loop does not adapt,
receive the first-order query gradient at φ_t.
"""

from __future__ import annotations

import dataclasses

import torch

from metaprep.meta.algorithm import MetaAlgorithm
from metaprep.meta.inner import flatten_fast, inner_loop
from metaprep.tasks.base import TaskBatch


def concat(a: TaskBatch, b: TaskBatch) -> TaskBatch:
    """Pool support and query examples per task: (T, n_s + n_q, L)."""
    return dataclasses.replace(a, input_ids=torch.cat([a.input_ids, b.input_ids], 1),
                               labels=torch.cat([a.labels, b.labels], 1),
                               attention_mask=torch.cat([a.attention_mask, b.attention_mask], 1))


class Reptile(MetaAlgorithm):
    name = "reptile"

    def meta_loss(self, model, support, query, step):
        cfg = model.cfg.meta
        init = model.fast_init(support.num_tasks)
        fast, losses = inner_loop(model, concat(support, query), init, None, cfg.inner_steps, cfg.inner_lr,
                                  cfg.inner_optimizer, create_graph=False)
        _, init_t = flatten_fast(init)
        _, fast_t = flatten_fast(fast)
        pull = sum(0.5 * (i - f.detach()).pow(2).flatten(1).sum(1) for i, f in zip(init_t, fast_t, strict=True))
        detached = {layer: {k: v.detach() for k, v in fs.items()} for layer, fs in fast.items()}
        query_losses = model.task_losses(query, detached, None)
        return pull + query_losses, {"support_loss_before": float(losses[0].mean()),
                                     "query_loss": float(query_losses.detach().mean())}
