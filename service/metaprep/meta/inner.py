"""The inner loop: adapt fast weights on a support set by SGD or an Adam-style update.

Shared by every algorithm and by meta-test adaptation. Fast weights are tensors with a leading
task dimension; since tasks do not interact in the forward pass, the gradient of the summed
support losses w.r.t. task t's slice is exactly task t's own gradient. With
``create_graph=True`` the updates stay differentiable (MAML's second-order term, Finn et al.
2017 eq. 1); otherwise gradients are constants (FOMAML).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from metaprep.reparam.context import FastWeights
from metaprep.search.controller import TauSchedule
from metaprep.tasks.base import TaskBatch

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


@dataclass(frozen=True)
class InnerLoopSpec:
    """The inner loop's settings (``meta.inner_*``), handed to an algorithm explicitly."""

    steps: int
    lr: float
    optimizer: str = "sgd"
    checkpoint: bool = False  # meta.inner_checkpointing: recompute each second-order inner step in backward


def flatten_fast(fast: FastWeights) -> tuple[list[tuple[str, str]], list[torch.Tensor]]:
    keys = [(layer, f) for layer, factors in fast.items() for f in factors]
    return keys, [fast[layer][f] for layer, f in keys]


def unflatten_fast(keys: list[tuple[str, str]], tensors: list[torch.Tensor]) -> FastWeights:
    out: FastWeights = {}
    for (layer, f), t in zip(keys, tensors, strict=True):
        out.setdefault(layer, {})[f] = t
    return out


def detached(fast: FastWeights) -> FastWeights:
    """A leaf copy that requires grad (start of adaptation without a meta-graph)."""
    return {layer: {f: t.detach().clone().requires_grad_(True) for f, t in fs.items()} for layer, fs in fast.items()}


def inner_loop(model, support: TaskBatch, fast: FastWeights, arch: torch.Tensor | None, steps: int, lr: float,
               optimizer: str = "sgd", create_graph: bool = False,
               on_step: Callable[[FastWeights], None] | None = None,
               keep_first: bool = False, checkpoint_steps: bool = False) -> tuple[FastWeights, list[torch.Tensor]]:
    """``steps`` updates of ``fast`` on ``support``; returns the adapted weights and per-step losses (T,).

    ``on_step`` sees the weights after every update (adaptation curves). Factors the model declares
    meta-only (``model.fast_init.meta_only``, e.g. TAMS projections) are read but not updated.
    ``keep_first``: the first loss (at the init) is returned with its graph, for an outer term on it.

    ``checkpoint_steps`` (with ``create_graph``; ``meta.inner_checkpointing``): each update runs in a
    non-reentrant :func:`torch.utils.checkpoint.checkpoint` that keeps only its inputs (the fast weights
    and Adam moments, small next to the activations). The meta-backward recomputes one step's forward and
    differentiable backward at a time, so second order holds the graph of one inner step instead of all
    of them, for about two more forward-backward passes per step: part of it already in the forward, where
    the inner ``autograd.grad`` inside the checkpoint unpacks, and so recomputes, the step's saved tensors;
    the meta-gradient is the same (``tests/test_fast_paths.py``).
    """
    keys, params = flatten_fast(fast)
    slow = {i for i, key in enumerate(keys) if key in model.fast_init.meta_only}
    moments = [t for p in params for t in (torch.zeros_like(p), torch.zeros_like(p))] if optimizer == "adam" else []
    n = len(params)

    def update(step: int, keep: bool, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One inner step: (params..., moments...) -> (loss, params..., moments...)."""
        params, moments = list(state[:n]), list(state[n:])
        loss = model.task_losses(support, unflatten_fast(keys, params), arch)
        adapted = [p for i, p in enumerate(params) if i not in slow]
        grad_iter = iter(torch.autograd.grad(loss.sum(), adapted, create_graph=create_graph, allow_unused=True,
                                             retain_graph=create_graph or keep))
        grads = [torch.zeros_like(p) if i in slow else next(grad_iter) for i, p in enumerate(params)]
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        if not moments:
            return loss, *(p - lr * g for p, g in zip(params, grads, strict=True))
        b1, b2 = ADAM_BETAS
        new_params, new_moments = [], []
        for p, g, m, v in zip(params, grads, moments[0::2], moments[1::2], strict=True):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
            # sqrt(v + eps²) instead of sqrt(v) + eps: smooth at v = 0 for second-order gradients
            new_params.append(p - lr * m_hat / torch.sqrt(v_hat + ADAM_EPS**2))
            new_moments += [m, v]
        return loss, *new_params, *new_moments

    losses = []
    for step in range(1, steps + 1):
        keep = keep_first and step == 1
        if checkpoint_steps and create_graph:
            out = checkpoint(update, step, keep, *params, *moments, use_reentrant=False)
        else:
            out = update(step, keep, *params, *moments)
        loss, params, moments = out[0], list(out[1:n + 1]), list(out[n + 1:])
        losses.append(loss if keep else loss.detach())
        if on_step is not None:
            on_step(unflatten_fast(keys, params))
    return unflatten_fast(keys, params), losses


def adapt_then_query(model, support: TaskBatch, query: TaskBatch, step: int, inner: InnerLoopSpec,
                     tau: TauSchedule, create_graph: bool, support_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The MAML-family episode (MAML, FOMAML, MLtD): architecture, inner loop on support, loss on query.

    ``create_graph`` keeps the inner updates differentiable (second order, Finn et al. 2017 eq. 1).
    ``support_weight`` λ > 0 adds λ·L_support at the init (before adaptation) to each task's outer loss,
    so the slow weights also learn from the support tokens, which multitask retraining reads and the
    papers' objective does not (``meta.support_weight``).
    """
    t = tau.at(step)
    arch = model.architecture(support, tau=t, sample=True)
    fast = model.fast_init(support.num_tasks)
    # first order without a support term: nothing differentiates through the inner loop, so α is a
    # constant there (and the TAMS cell skips the ops no task selected)
    constant = not create_graph and support_weight == 0 and arch is not None
    inner_arch = arch.detach() if constant else arch
    fast, support_losses = inner_loop(model, support, fast, inner_arch, inner.steps, inner.lr, inner.optimizer,
                                      create_graph=create_graph, keep_first=support_weight > 0,
                                      checkpoint_steps=inner.checkpoint)
    query_losses = model.task_losses(query, fast, arch)
    metrics = {"support_loss_before": float(support_losses[0].detach().mean()),
               "query_loss": float(query_losses.detach().mean()), "tau": t}
    if support_weight > 0:
        return query_losses + support_weight * support_losses[0], metrics
    return query_losses, metrics
