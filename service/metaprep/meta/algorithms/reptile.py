"""Reptile (Nichol, Achiam, Schulman, 2018): move the init towards the adapted weights.

Update (Algorithm 1 of the paper): θ ← θ + ε · mean_t (φ_t − θ), with φ_t the fast weights after
``meta.inner_steps`` steps on the task's support and query data. We express it as the gradient
of the surrogate ½‖θ − sg(φ_t)‖² (its gradient is θ − φ_t), so the outer optimizer and
DeepSpeed apply it like any other loss. The base weights, which the inner loop does not adapt,
receive the first-order query gradient at φ_t.
"""

from __future__ import annotations

from metaprep.meta.algorithm import MetaAlgorithm, register
from metaprep.meta.inner import flatten_fast, inner_loop


@register
class Reptile(MetaAlgorithm):
    name = "reptile"

    def meta_loss(self, model, support, query, step):
        inner = self.inner
        init = model.fast_init(support.num_tasks)
        fast, losses = inner_loop(model, support.concat(query), init, None, inner.steps, inner.lr, inner.optimizer,
                                  create_graph=False)
        _, init_t = flatten_fast(init)
        _, fast_t = flatten_fast(fast)
        pull = sum(0.5 * (i - f.detach()).pow(2).flatten(1).sum(1) for i, f in zip(init_t, fast_t, strict=True))
        detached = {layer: {k: v.detach() for k, v in fs.items()} for layer, fs in fast.items()}
        query_losses = model.task_losses(query, detached, None)
        return pull + query_losses, {"support_loss_before": float(losses[0].mean()),
                                     "query_loss": float(query_losses.detach().mean())}
