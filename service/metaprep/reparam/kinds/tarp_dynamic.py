"""Dynamic TARP (MLtD eq. 5, the paper's best): Φj(x) = Uj Σj(x) Vjᵀ with Σj(x) = reshape(Gj x), per token.

The delta depends on the input, so an adapted model cannot be merged into dense weights.
"""

from __future__ import annotations

import torch

from metaprep.reparam.kinds.base import ReparamKind, bilinear_mult, register
from metaprep.reparam.kinds.tarp_bilinear import tarp_init


@register
class TARPDynamic(ReparamKind):
    name = "tarp_dynamic"
    tarp = True

    def shapes(self, c_in, c_out, rank, blocks):
        r = rank
        return {"U1": (c_out, r), "V1": (c_in, r), "G1": (r * r, c_in),
                "U2": (c_out, r), "V2": (c_in, r), "G2": (r * r, c_in)}

    def init(self, factor, shape, generator):
        return tarp_init(factor, shape, generator)

    def delta(self, w0, x, f, rank):
        t, n, _ = x.shape
        sigma1 = torch.bmm(x, f["G1"].transpose(1, 2)).view(t, n, rank, rank)  # Σ1(x), per token
        sigma2 = torch.bmm(x, f["G2"].transpose(1, 2)).view(t, n, rank, rank)
        a = torch.bmm(x, f["V2"])  # (T, N, r)
        add = torch.bmm(torch.einsum("tnkl,tnl->tnk", sigma2, a), f["U2"].transpose(1, 2))
        return bilinear_mult(w0, x, f["U1"], f["V1"], sigma1) + add
