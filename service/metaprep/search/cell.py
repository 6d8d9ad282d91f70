"""TAMS: the task-adaptive search cell added after each FFN (MLtD §3.2).

A DARTS-style cell (Liu et al., 2019) at a reduced width w: two input nodes (the FFN's input and
output, each projected C -> w), ``nodes`` intermediate nodes each summing a mixed op over all
previous nodes (9 edges for 3 nodes), output = mean of the intermediate nodes projected back
w -> C and added residually to the FFN output. Candidate ops: zero, skip, linear(+ReLU), GLU,
causal conv1d k=3 and k=5 (+ReLU). Op weights are shared across tasks (ENAS-style) and read
from the fast-weight context like TARP factors, so the inner loop adapts exactly the ops a
task's architecture selects (unselected ops get zero gradient under a one-hot α).
The up-projection is zero-initialised, so a model with cells equals the base model at init. The
projections are meta-learned (outer loop) but not adapted in the inner loop, which adapts only the
op weights, as in the paper.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metaprep.reparam.context import FastContext

CONV_KERNELS = {"conv3": 3, "conv5": 5}
PROJECTIONS = ("down_in", "down_out", "up")  # meta-learned in the outer loop, not adapted per task


def num_edges(nodes: int) -> int:
    """Edges of a cell with two input nodes: node i sums over 2 + i predecessors."""
    return sum(2 + i for i in range(nodes))


def cell_shapes(dim: int, width: int, nodes: int, ops: list[str]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"down_in": (width, dim), "down_out": (width, dim), "up": (dim, width)}
    for e in range(num_edges(nodes)):
        if "linear" in ops:
            shapes[f"e{e}.linear"] = (width, width)
        if "glu" in ops:
            shapes[f"e{e}.glu"] = (width, 2 * width)
        for op, k in CONV_KERNELS.items():
            if op in ops:
                shapes[f"e{e}.{op}"] = (k, width, width)
    return shapes


def init_cell_weight(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name == "up":
        return torch.zeros(shape)
    fan_in = shape[-1] if name.startswith("down") else shape[-2] * (shape[0] if len(shape) == 3 else 1)
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def _op(name: str, h: torch.Tensor, w: dict[str, torch.Tensor], edge: int) -> torch.Tensor:
    """One candidate op on h (T, n, L, w) with per-task weights (T, ...)."""
    if name == "zero":
        return torch.zeros_like(h)
    if name == "skip":
        return h
    if name == "linear":
        return F.relu(torch.einsum("tnlc,tcd->tnld", h, w[f"e{edge}.linear"]))
    if name == "glu":
        a, g = torch.einsum("tnlc,tcd->tnld", h, w[f"e{edge}.glu"]).chunk(2, dim=-1)
        return a * torch.sigmoid(g)
    k = CONV_KERNELS[name]
    padded = F.pad(h, (0, 0, k - 1, 0))  # causal: position l sees l-k+1 .. l
    windows = padded.unfold(2, k, 1)  # (T, n, L, w, k)
    return F.relu(torch.einsum("tnlck,tkcd->tnld", windows, w[f"e{edge}.{name}"]))


class TAMSCell:
    """The cell for one decoder layer, attached as a forward hook on its FFN.

    ``y = ffn(x) + cell(x, ffn(x))`` when the context holds a task architecture; a hook (not a
    wrapper module) keeps the model's state-dict keys equal to the base model's.
    """

    def __init__(self, name: str, layer_index: int, nodes: int, ops: list[str], ctx: FastContext) -> None:
        self.name, self.layer_index, self.nodes, self.ops = name, layer_index, nodes, list(ops)
        self.ctx = ctx

    def attach(self, ffn: nn.Module) -> None:
        ffn.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor:
        fast = self.ctx.fast.get(self.name) if self.ctx.fast is not None else None
        if fast is None or self.ctx.arch is None:
            return y
        x = args[0]
        t = self.ctx.num_tasks
        w = {k: v.to(x.dtype) for k, v in fast.items()}
        alpha = self.ctx.arch[:, self.layer_index].to(x.dtype)  # (T, edges, ops)
        seq = x.shape[-2]
        xt = x.reshape(t, -1, seq, x.shape[-1])
        yt = y.reshape(t, -1, seq, y.shape[-1])
        states = [torch.einsum("tnlc,twc->tnlw", xt, w["down_in"]),
                  torch.einsum("tnlc,twc->tnlw", yt, w["down_out"])]
        # ops no task selects need not run when α carries no gradient (inner loop, adaptation, evaluation):
        # their weight is exactly 0; the zero op never contributes, not even to α's gradient
        used = alpha.detach().ne(0).any(0) if not alpha.requires_grad else None  # (edges, ops)
        edge = 0
        for _ in range(self.nodes):
            node = 0
            for h in states:
                for o, op in enumerate(self.ops):
                    if op == "zero" or (used is not None and not used[edge, o]):
                        continue
                    node = node + alpha[:, edge, o].view(t, 1, 1, 1) * _op(op, h, w, edge)
                edge += 1
            states.append(node if torch.is_tensor(node) else torch.zeros_like(states[0]))
        out = torch.stack(states[2:]).mean(0)
        return y + torch.einsum("tnlw,tcw->tnlc", out, w["up"]).reshape(y.shape)
