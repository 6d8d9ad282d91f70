"""Meta-test adaptation: adapt a prepared model to new tasks' support sets within a budget.

Starts from the meta-learned fast-weight init (or the standard init for algorithms that do not
learn one), fixes the architecture to the controller's argmax, runs ``steps`` inner updates
without a meta-graph and records the query loss after every step (the adaptation curve).
All tasks of a call are adapted together in one batched inner loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from metaprep.meta.inner import detached, inner_loop
from metaprep.meta.precision import mixed_precision
from metaprep.reparam.context import FastWeights
from metaprep.tasks.base import TaskBatch


@dataclass
class AdaptResult:
    curve: list[list[float]]  # per step (0 = before), per task query loss
    fast: FastWeights
    arch: torch.Tensor | None

    @property
    def query_loss_before(self) -> float:
        return sum(self.curve[0]) / len(self.curve[0])

    @property
    def query_loss_after(self) -> float:
        return sum(self.curve[-1]) / len(self.curve[-1])

    @property
    def per_task_after(self) -> list[float]:
        return self.curve[-1]

    def perplexity(self, loss: float) -> float:
        return math.exp(min(loss, 50.0))


def adapt(model, support: TaskBatch, query: TaskBatch, steps: int, lr: float, optimizer: str = "sgd",
          autocast_dtype: torch.dtype | None = None,
          on_step: Callable[[int, list[float]], None] | None = None) -> AdaptResult:
    """Adapt to every task of ``support`` for ``steps`` steps; query losses before/after each step.

    ``on_step(step, per-task query losses)`` is called as each is measured (step 0: before adapting)."""
    was_training = model.training
    model.eval()
    device_type = support.input_ids.device.type

    def query_losses(fast: FastWeights, arch: torch.Tensor | None) -> list[float]:
        with torch.no_grad(), mixed_precision(device_type, autocast_dtype):
            return model.task_losses(query, fast, arch).float().tolist()

    with torch.no_grad():
        arch = model.architecture(support, sample=False)
        fast = model.fast_init(support.num_tasks)
    curve: list[list[float]] = []

    def measure(f: FastWeights) -> None:
        curve.append(query_losses(f, arch))
        if on_step is not None:
            on_step(len(curve) - 1, curve[-1])

    measure(fast)
    with mixed_precision(device_type, autocast_dtype):
        fast, _ = inner_loop(model, support, detached(fast), arch, steps, lr, optimizer, create_graph=False,
                             on_step=measure)
    model.train(was_training)
    return AdaptResult(curve, {layer: {k: v.detach() for k, v in fs.items()} for layer, fs in fast.items()}, arch)


def adapt_in_chunks(model, episodes: list, encode: Callable[[list, str], TaskBatch], steps: int, lr: float,
                    optimizer: str, *, chunk: int, autocast_dtype: torch.dtype | None = None,
                    on_chunk: Callable[[list, AdaptResult], None] | None = None) -> list[list[float]]:
    """:func:`adapt` over many episodes, ``chunk`` tasks at a time (bounded memory); per step (0 = before)
    the query loss of every episode, in order. ``encode(episodes, "support" | "query")`` makes a chunk's
    batch; ``on_chunk(episodes, result)`` sees each chunk's result (architectures, extra metrics)."""
    curve: list[list[float]] = [[] for _ in range(steps + 1)]
    for start in range(0, len(episodes), chunk):
        part = episodes[start:start + chunk]
        res = adapt(model, encode(part, "support"), encode(part, "query"), steps, lr, optimizer,
                    autocast_dtype=autocast_dtype)
        for step, losses in enumerate(res.curve):
            curve[step].extend(losses)
        if on_chunk is not None:
            on_chunk(part, res)
    return curve


def support_losses(model, support: TaskBatch, autocast_dtype: torch.dtype | None = None) -> list[float]:
    """Per task, the prepared model's loss on the task's own support examples before any adaptation step (a
    meta-feature of the task that needs none of its query examples)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), mixed_precision(support.input_ids.device.type, autocast_dtype):
        arch = model.architecture(support, sample=False)
        losses = model.task_losses(support, model.fast_init(support.num_tasks), arch).float().tolist()
    model.train(was_training)
    return losses


def support_losses_in_chunks(model, episodes: list, encode: Callable[[list, str], TaskBatch], *, chunk: int,
                             autocast_dtype: torch.dtype | None = None) -> list[float]:
    """:func:`support_losses` of every episode, ``chunk`` tasks at a time."""
    return [loss for start in range(0, len(episodes), chunk)
            for loss in support_losses(model, encode(episodes[start:start + chunk], "support"), autocast_dtype)]
