"""The wrapper of a base dense layer that adds per-task low-rank terms (MLtD §3.1; LoRA as a special case).

For a base weight ``W0`` (C_out x C_in, torch layout) a wrapper computes, per task t,

    y = W0 x + b + s * delta_t(x),     s = alpha / r

where ``delta_t`` is the batched delta of the layer's kind (:mod:`metaprep.reparam.kinds`: ``lora``,
``tarp_bilinear``, ``tarp_kronecker``, ``tarp_dynamic``). All factors carry a leading task dimension,
so one forward pass serves a whole meta-batch.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from metaprep.reparam.context import FastContext, by_task
from metaprep.reparam.kinds import get_kind
from metaprep.reparam.kinds.tarp_kronecker import kronecker_phi

__all__ = ["ReparamLinear", "kronecker_phi"]


class ReparamLinear(nn.Module):
    """A base dense layer (``nn.Linear`` or GPT-2 ``Conv1D``) plus per-task low-rank terms.

    The wrapper owns the base ``weight``/``bias`` parameters under the same names, so the
    state-dict keys of the wrapped model equal the base model's (the base can be exported
    unchanged) and ZeRO-3 gathers them in this module's own forward.
    """

    def __init__(self, base: nn.Module, name: str, kind: str, rank: int, alpha: float,
                 blocks: int, ctx: FastContext) -> None:
        super().__init__()
        self.conv1d = base.__class__.__name__ == "Conv1D"  # GPT-2 stores W as (C_in, C_out)
        self.weight = base.weight
        self.bias = base.bias
        self.c_in, self.c_out = (self.weight.shape if self.conv1d else self.weight.shape[::-1])
        self.name, self.kind, self.rank, self.blocks = name, kind, rank, blocks
        self.impl = get_kind(kind)
        self.scale = alpha / rank
        self.ctx = ctx

    def w0(self):
        """The base weight in (C_out, C_in) layout."""
        return self.weight.t() if self.conv1d else self.weight

    def base_forward(self, x):
        return F.linear(x, self.w0(), self.bias)

    def delta(self, x, fast: dict):
        """``delta_t(x)`` for x grouped by task (T, N, C_in) and factors (T, ...)."""
        return self.impl.delta(self.w0(), x, {k: v.to(x.dtype) for k, v in fast.items()}, self.rank)

    def forward(self, x):
        y = self.base_forward(x)
        fast = self.ctx.fast.get(self.name) if self.ctx.fast is not None else None
        if fast is None:
            return y
        shape = x.shape
        delta = self.delta(by_task(x, self.ctx.num_tasks), fast)
        return y + self.scale * delta.reshape(*shape[:-1], self.c_out)

    def extra_repr(self) -> str:
        return f"{self.name}: {self.kind} r={self.rank} ({self.c_in} -> {self.c_out})"
