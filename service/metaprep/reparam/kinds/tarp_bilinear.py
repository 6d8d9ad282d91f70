"""Static bilinear TARP (MLtD eq. 3): Φj = Uj Vjᵀ, W = (1 + Φ1) ⊙ W0 + Φ2."""

from __future__ import annotations

import torch

from metaprep.reparam.kinds.base import ReparamKind, bilinear_mult, gaussian, register


def tarp_init(factor: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """U zero (the wrapped model equals the base); the multiplicative V1 with std 1/sqrt(r), because it
    rescales W0's inputs elementwise and must be O(1) for the first step on U1 to be informative; the
    additive V2 with std 1/sqrt(C_in); Σ-generators G and Kronecker H with std 1/sqrt(last axis)."""
    if factor.startswith("U"):
        return torch.zeros(shape)
    fan_in = shape[-2] if factor == "V2" else shape[-1]
    return gaussian(shape, fan_in, generator)


@register
class TARPBilinear(ReparamKind):
    name = "tarp_bilinear"
    tarp = True

    def shapes(self, c_in, c_out, rank, blocks):
        return {"U1": (c_out, rank), "V1": (c_in, rank), "U2": (c_out, rank), "V2": (c_in, rank)}

    def init(self, factor, shape, generator):
        return tarp_init(factor, shape, generator)

    def delta(self, w0, x, f, rank):
        add = torch.bmm(torch.bmm(x, f["V2"]), f["U2"].transpose(1, 2))
        return bilinear_mult(w0, x, f["U1"], f["V1"]) + add

    def dense(self, w0, f):
        return (f["U1"] @ f["V1"].T) * w0 + f["U2"] @ f["V2"].T
