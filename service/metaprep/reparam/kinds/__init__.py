"""Fast-weight reparameterisations by name: ``reparam.kind`` selects one of :data:`REPARAM_KINDS`.

Each kind is one module of this package defining a :class:`~metaprep.reparam.kinds.base.ReparamKind`
subclass decorated with :func:`~metaprep.reparam.kinds.base.register`: its factor shapes, their
initialisation, the batched per-task delta of the forward pass and (for static kinds) the dense
weight that export merges. Adding a kind is adding a module here; config validation, the wrapper,
export and the tests read this registry.
"""

from __future__ import annotations

import importlib
import pkgutil

from metaprep.reparam.kinds.base import REPARAM_KINDS, ReparamKind, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def get_kind(name: str) -> ReparamKind:
    """The registered kind ``name`` (config validation has already checked it exists)."""
    return REPARAM_KINDS[name]


__all__ = ["REPARAM_KINDS", "ReparamKind", "get_kind", "register"]
