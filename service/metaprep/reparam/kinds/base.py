"""What a reparameterisation kind provides, and the registry the kinds add themselves to.

For a base weight ``W0`` (C_out x C_in, torch layout) a wrapped layer computes, per task t,
``y = W0 x + b + s * delta_t(x)`` with ``s = alpha / r`` (MLtD eq. 2 in residual form:
``W = (1 + Φ1) ⊙ W0 + Φ2``, so zero-initialised output factors give exactly the base model).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

REPARAM_KINDS: dict[str, ReparamKind] = {}


class ReparamKind:
    """One fast-weight reparameterisation. Factors carry a leading task dimension T in ``delta``."""

    name: ClassVar[str]
    tarp: ClassVar[bool] = False  # a TARP kind (MLtD §3.1): algorithms with ``needs_tarp`` require one
    peft_lora: ClassVar[bool] = False  # exported exactly as a PEFT LoRA adapter

    def shapes(self, c_in: int, c_out: int, rank: int, blocks: int) -> dict[str, tuple[int, ...]]:
        """Shapes (without the task dimension) of one layer's factors, in initialisation order."""
        raise NotImplementedError

    def check(self, layer: str, c_in: int, c_out: int, rank: int, blocks: int) -> str | None:
        """Why this kind cannot wrap a layer of these widths (``None``: it can)."""
        if rank > min(c_in, c_out):
            return f"reparam.rank: must be <= the layer width ({min(c_in, c_out)} at {layer}), got {rank}"
        return None

    def init(self, factor: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Standard init: output-side factors zero (the wrapped model equals the base), others Gaussian."""
        raise NotImplementedError

    def delta(self, w0: torch.Tensor, x: torch.Tensor, f: dict[str, torch.Tensor], rank: int) -> torch.Tensor:
        """Batched ``delta_t(x)``: ``x`` (T, N, C_in) and factors (T, ...) -> (T, N, C_out)."""
        raise NotImplementedError

    def dense(self, w0: torch.Tensor, f: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The dense weight difference (C_out, C_in) of one task's factors, or ``None`` if the delta
        depends on the input (then it cannot be merged into the base weights)."""
        return None

    @property
    def mergeable(self) -> bool:
        return type(self).dense is not ReparamKind.dense


def register(cls: type[ReparamKind]) -> type[ReparamKind]:
    """Class decorator: add a kind to :data:`REPARAM_KINDS` under ``cls.name``."""
    if cls.name in REPARAM_KINDS:
        raise ValueError(f"reparam kind {cls.name!r} registered twice")
    REPARAM_KINDS[cls.name] = cls()
    return cls


def gaussian(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """N(0, 1/fan_in) init (draws from ``generator``, so the order of calls fixes the values)."""
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def per_task_weight_cheaper(tokens: int, rank: int) -> bool:
    """Whether forming each task's ``(U Vᵀ) ⊙ W0`` beats ``r`` matmuls with ``W0`` over its ``tokens`` inputs.

    Per task, in units of C_in·C_out multiply-adds: r·N for the matmul route (DESIGN.md §1.1's hint) against
    r + 1 + N for the per-task weight (rank-r product, Hadamard product, one matmul). LM episodes have hundreds
    of tokens per task, so the weight wins about r-fold: on SmolLM2-135M (rank 4, 4 tasks x 512 tokens) the
    matmul route made an MLtD-TARP meta-step 4.5x a LoRA one. It also saves less for backward there: two
    C_out x C_in tensors per task instead of r·N·(C_in + C_out) activations.
    """
    return rank * tokens > rank + 1 + tokens


def bilinear_mult(w0: torch.Tensor, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                  sigma: torch.Tensor | None = None) -> torch.Tensor:
    """(U Σ Vᵀ ⊙ W0) x = Σ_k u_k ⊙ Σ_l Σ_kl W0 (v_l ⊙ x); Σ = I for the static case.

    The route of DESIGN.md §1.1: r matmuls with the shared ``W0``, no per-task weight. Static kinds
    (``sigma`` None) take :func:`per_task_weight_mult` instead where :func:`per_task_weight_cheaper`.
    """
    if sigma is None and per_task_weight_cheaper(x.shape[1], u.shape[-1]):
        return per_task_weight_mult(w0, x, u, v)
    return matmul_route_mult(w0, x, u, v, sigma)


def per_task_weight_mult(w0: torch.Tensor, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(U Vᵀ ⊙ W0) x with each task's weight formed: (T, C_out, C_in), then one batched matmul."""
    return torch.bmm(x, (torch.bmm(u, v.transpose(1, 2)) * w0).transpose(1, 2))


def matmul_route_mult(w0: torch.Tensor, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                      sigma: torch.Tensor | None = None) -> torch.Tensor:
    """(U Σ Vᵀ ⊙ W0) x through r matmuls with the shared ``W0``; never materialises a per-task weight."""
    xv = x.unsqueeze(2) * v.transpose(1, 2).unsqueeze(1)  # (T, N, r, C_in)
    z = torch.nn.functional.linear(xv, w0)  # (T, N, r, C_out)
    if sigma is not None:
        z = torch.einsum("tnkl,tnlo->tnko", sigma, z)
    return (z * u.transpose(1, 2).unsqueeze(1)).sum(2)
