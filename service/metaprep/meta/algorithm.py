"""What every meta-training algorithm provides, and the registry of algorithms by name.

An algorithm is one module of :mod:`metaprep.meta.algorithms` defining a :class:`MetaAlgorithm`
subclass decorated with :func:`register`. Its class attributes declare what it needs and does;
config validation, the trainer, export, the benchmarks and the shared test table read them, so
adding an algorithm is adding one module (and one row of ``tests/test_algorithms.py``).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import ClassVar

import torch
from torch import nn

from metaprep.meta.inner import InnerLoopSpec
from metaprep.search.controller import TauSchedule
from metaprep.tasks.base import TaskBatch

SECOND_ORDER = ("never", "optional", "always")


class MetaAlgorithm(nn.Module):
    """Base protocol: ``meta_loss`` returns per-task losses (T,) whose gradient is the meta-gradient.

    An ``nn.Module`` so that per-algorithm state (Meta-LoRA's adapter table) is the algorithm's own
    and is checkpointed with it; the model it trains is passed in, never stored.
    """

    name: ClassVar[str]
    needs_tarp: ClassVar[bool] = False  # requires a TARP reparam kind (MLtD)
    uses_tams: ClassVar[bool] = False  # the model gets TAMS cells and an architecture controller
    trains_fast_init: ClassVar[bool] = True  # the outer loop meta-learns the fast-weight init
    meta_trains: ClassVar[bool] = True  # False: no outer updates (direct finetuning)
    second_order: ClassVar[str] = "never"  # "never" | "optional" (meta.second_order) | "always"
    encoder_ok: ClassVar[bool] = False  # runs on the convai2_mc sentence-encoder scorer
    episodic: ClassVar[bool] = False  # adapt on support, loss on query (MAML family): meta.support_weight applies

    def __init__(self, inner: InnerLoopSpec, create_graph: bool = False, tau: TauSchedule | None = None,
                 support_weight: float = 0.0, warm_start_steps: int = 0) -> None:
        super().__init__()
        self.inner = inner
        self.create_graph = create_graph
        self.tau = tau or TauSchedule()
        self.support_weight = support_weight
        self.warm_start_steps = warm_start_steps

    @classmethod
    def uses_second_order(cls, requested: bool) -> bool:
        """Whether the meta-gradient differentiates through the inner updates (MAML eq. 1)."""
        return cls.second_order == "always" or (cls.second_order == "optional" and requested)

    @classmethod
    def from_config(cls, cfg, model, num_train_tasks: int) -> MetaAlgorithm:
        """Build from a :class:`~metaprep.config.MetaTrainConfig`; the only place an algorithm reads it."""
        m, s = cfg.meta, cfg.search
        return cls(InnerLoopSpec(m.inner_steps, m.inner_lr, m.inner_optimizer, m.inner_checkpointing),
                   create_graph=cls.uses_second_order(m.second_order),
                   tau=TauSchedule(s.tau_start, s.tau_end, m.meta_steps),
                   support_weight=m.support_weight, warm_start_steps=m.warm_start_steps)

    def objective(self, model, support: TaskBatch, query: TaskBatch, step: int) -> tuple[torch.Tensor, dict]:
        """What a meta-step minimises: the multitask loss for the first ``warm_start_steps`` steps
        (``meta.warm_start_steps``), then :meth:`meta_loss`."""
        if step < self.warm_start_steps:
            losses = model.task_losses(support.concat(query), None, None)
            return losses, {"query_loss": float(losses.detach().mean())}
        return self.meta_loss(model, support, query, step)

    def meta_loss(self, model, support: TaskBatch, query: TaskBatch, step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


ALGORITHMS: dict[str, type[MetaAlgorithm]] = {}


def register(cls: type[MetaAlgorithm]) -> type[MetaAlgorithm]:
    """Class decorator: add an algorithm to :data:`ALGORITHMS` under ``cls.name``."""
    if cls.name in ALGORITHMS:
        raise ValueError(f"algorithm {cls.name!r} registered twice")
    if cls.second_order not in SECOND_ORDER:
        raise ValueError(f"algorithm {cls.name}: second_order must be one of {SECOND_ORDER}")
    ALGORITHMS[cls.name] = cls
    return cls


def algorithm_names(**capabilities: object) -> tuple[str, ...]:
    """Registered names, optionally only those whose class attributes equal ``capabilities``."""
    return tuple(name for name, cls in ALGORITHMS.items()
                 if all(getattr(cls, key) == value for key, value in capabilities.items()))


def _discover() -> None:
    package = importlib.import_module("metaprep.meta.algorithms")
    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{package.__name__}.{module.name}")


_discover()
