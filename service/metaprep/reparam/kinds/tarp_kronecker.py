"""Kronecker TARP (MLtD eq. 4, Compacter-style): Φj = Σ_k H_jk ⊗ (U_jk V_jkᵀ) over n blocks."""

from __future__ import annotations

import torch

from metaprep.reparam.kinds.base import ReparamKind, register
from metaprep.reparam.kinds.tarp_bilinear import tarp_init


def kronecker_phi(h: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Φ = Σ_k H_k ⊗ (U_k V_kᵀ) for a batch of tasks: (T, C_out, C_in)."""
    t, n, p, _ = u.shape
    q = v.shape[2]
    uv = torch.einsum("tkpr,tkqr->tkpq", u, v)
    return torch.einsum("tkab,tkpq->tapbq", h, uv).reshape(t, n * p, n * q)


@register
class TARPKronecker(ReparamKind):
    name = "tarp_kronecker"
    tarp = True

    def shapes(self, c_in, c_out, rank, blocks):
        n = blocks
        return {"H1": (n, n, n), "U1": (n, c_out // n, rank), "V1": (n, c_in // n, rank),
                "H2": (n, n, n), "U2": (n, c_out // n, rank), "V2": (n, c_in // n, rank)}

    def check(self, layer, c_in, c_out, rank, blocks):
        if c_in % blocks or c_out % blocks:
            return f"reparam.kronecker_blocks: {blocks} must divide the widths of {layer} ({c_in} -> {c_out})"
        return super().check(layer, c_in, c_out, rank, blocks)

    def init(self, factor, shape, generator):
        return tarp_init(factor, shape, generator)  # H like G: the last axis is the input

    def delta(self, w0, x, f, rank):
        phi1 = kronecker_phi(f["H1"], f["U1"], f["V1"]) * w0
        phi2 = kronecker_phi(f["H2"], f["U2"], f["V2"])
        return torch.bmm(x, (phi1 + phi2).transpose(1, 2))

    def dense(self, w0, f):
        one = {k: v.unsqueeze(0) for k, v in f.items()}
        return (kronecker_phi(one["H1"], one["U1"], one["V1"])[0] * w0
                + kronecker_phi(one["H2"], one["U2"], one["V2"])[0])
