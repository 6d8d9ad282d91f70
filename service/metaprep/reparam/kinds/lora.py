"""LoRA (Hu et al., 2021): Φ1 = 0, Φ2 = B A; the additive special case of TARP."""

from __future__ import annotations

import torch

from metaprep.reparam.kinds.base import ReparamKind, gaussian, register


@register
class LoRA(ReparamKind):
    name = "lora"
    peft_lora = True  # PEFT's scale lora_alpha / r equals ours

    def shapes(self, c_in, c_out, rank, blocks):
        return {"A": (rank, c_in), "B": (c_out, rank)}

    def init(self, factor, shape, generator):
        return torch.zeros(shape) if factor == "B" else gaussian(shape, shape[-1], generator)

    def delta(self, w0, x, f, rank):
        return torch.bmm(torch.bmm(x, f["A"].transpose(1, 2)), f["B"].transpose(1, 2))

    def dense(self, w0, f):
        return f["B"] @ f["A"]
