"""Second-order meta-gradients under DeepSpeed ZeRO-3.

ZeRO-3 (Rajbhandari et al., SC 2020, §5.3) keeps each rank's 1/N slice of every parameter and
gathers a sublayer's weights just before it runs, freeing them again right after its forward and
after its backward. MAML's meta-gradient (Finn et al. 2017, eq. 1) differentiates through the
inner updates θ ↦ φ = θ − α∇L_support(θ): the inner gradient is built with ``create_graph=True``,
so the outer backward re-enters that graph, which saved the *gathered* weights. ZeRO-3 frees
them in place (``param.data`` becomes an empty tensor) long before the outer backward reads them,
and the step fails inside autograd (``mat2 must be a matrix``).

:func:`hold_gathered` keeps every parameter gathered from the start of the meta-step's forward
until ``engine.step()``: it gathers them once and marks each as in use by one more "submodule",
so ZeRO-3's per-sublayer release is a no-op; ``engine.step()`` re-partitions all parameters as it
always does before updating its fp32 slices. Gradients and optimizer state stay partitioned, and
weights are partitioned at rest (between meta-steps, in checkpoints); during a second-order step
each rank holds the full weights, as the double-backward graph needs them. First-order meta-steps
do not need this and keep ZeRO-3's per-sublayer gathering.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

HOLD_ID = -7  # a "submodule id" no DeepSpeed module has: while present, ZeRO-3 does not free the param


def zero3_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return sorted((p for p in module.parameters() if hasattr(p, "ds_id")), key=lambda p: p.ds_id)


@contextlib.contextmanager
def hold_gathered(module: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Gather every ZeRO-3 parameter of ``module`` and keep it gathered until the context exits.

    Wrap forward *and* backward of one meta-step; call ``engine.step()`` after the context, which
    re-partitions the weights (so the update lands in the partitions, not in stale full copies).
    """
    params = zero3_parameters(module) if enabled else []
    if not params:
        yield
        return
    params[0].all_gather(param_list=params)  # the same collective GatheredParameters uses; a no-op if gathered
    for p in params:
        p.ds_active_sub_modules.add(HOLD_ID)
    try:
        yield
    finally:
        for p in params:
            p.ds_active_sub_modules.discard(HOLD_ID)


def zero3_gathered(module: torch.nn.Module):
    """All of ``module``'s ZeRO-3 parameters gathered on every rank (read-only), e.g. for export."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
