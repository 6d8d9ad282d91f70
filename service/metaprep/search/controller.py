"""The TAMS architecture controller: task embedding -> architecture logits -> Gumbel-softmax.

MLtD §3.2: a 2-layer MLP (128 hidden) maps a task embedding z (mean input embedding of the
support set, or a sentence-encoder embedding) to logits α over (layers x edges x ops). During
meta-training the architecture is sampled with straight-through Gumbel-softmax (Jang et al.,
2017): hard one-hot forward, soft gradient. The released code forgot the Gumbel noise; we add
it, with an exponential temperature schedule τ_start -> τ_end. At test time α = argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class ArchController(nn.Module):
    def __init__(self, embed_dim: int, layers: int, edges: int, ops: list[str], hidden: int = 128) -> None:
        super().__init__()
        self.layers, self.edges, self.ops = layers, edges, list(ops)
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, layers * edges * len(ops)))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        z = F.layer_norm(z.to(self.net[0].weight.dtype), z.shape[-1:])  # mean embeddings vary little: standardise them
        return self.net(z).view(-1, self.layers, self.edges, len(self.ops))

    def forward(self, z: torch.Tensor, tau: float = 1.0, sample: bool = True,
                noise_seeds: list[int] | None = None) -> torch.Tensor:
        """Architecture α (T, layers, edges, ops): straight-through Gumbel when ``sample`` else argmax.

        ``noise_seeds`` (one per task) make each task's Gumbel noise independent of which other
        tasks share the batch, so sharding a meta-batch over workers does not change the draws;
        without them the noise comes from the global RNG.
        """
        # fp32 also under bf16 autocast: in bf16 the clamp's upper bound 1 - 1e-7 rounds to 1.0, so a draw
        # of u = 1 gave log(-log(u)) = log(0) and a NaN architecture (every mltd step skipped in bf16)
        logits = self.logits(z).float()
        if not sample:
            return F.one_hot(logits.argmax(-1), len(self.ops)).to(logits.dtype)
        if noise_seeds is None:
            u = torch.rand_like(logits)
        else:
            u = torch.stack([torch.rand(logits.shape[1:], generator=torch.Generator().manual_seed(s))
                             for s in noise_seeds]).to(logits)
        u = u.clamp(1e-10, 1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(u))
        soft = torch.softmax((logits + gumbel) / tau, dim=-1)
        hard = F.one_hot(soft.argmax(-1), len(self.ops)).to(soft.dtype)
        return hard - soft.detach() + soft


def temperature(step: int, total: int, tau_start: float, tau_end: float) -> float:
    """Exponential schedule from tau_start (step 0) to tau_end (last step)."""
    frac = step / max(total - 1, 1)
    return tau_start * (tau_end / tau_start) ** frac


@dataclass(frozen=True)
class TauSchedule:
    """The Gumbel-softmax temperature schedule of a run (``search.tau_*`` over ``meta.meta_steps``)."""

    start: float = 1.0
    end: float = 0.1
    total: int = 1

    def at(self, step: int) -> float:
        return temperature(step, self.total, self.start, self.end)


def describe_architecture(alpha: torch.Tensor, ops: list[str]) -> list[dict[str, list[str]]]:
    """Readable report: per task, per layer, the op chosen on each edge."""
    choice = alpha.argmax(-1)  # (T, layers, edges)
    return [{f"layer{layer}": [ops[i] for i in choice[t, layer].tolist()] for layer in range(choice.shape[1])}
            for t in range(choice.shape[0])]
