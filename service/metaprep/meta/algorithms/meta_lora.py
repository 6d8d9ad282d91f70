"""Meta-LoRA: retraining with per-task low-rank adapters inside the objective (Block et al., 2024).

Objective (eq. 3 of the paper):  min_{W, {U_t, V_t}}  Σ_t L_t( W + U_t V_tᵀ ).
Each meta-training task keeps a persistent adapter (a row of :class:`AdapterTable`); a meta-step
takes ``meta.inner_steps`` gradient steps on the adapters of the sampled tasks (alternating
minimisation as in the released code), writes them back, then updates W on the loss at the new
adapters. Unlike standard retraining, W is fitted *given* that every task gets its own rank-r
correction, which is what makes it adaptable (Theorem 1: rank(Ŵ − W*) ≤ 2k; exact for T ≥ 3 in
the linear case, see the ``meta_lora_linear`` benchmark). At meta-test a fresh adapter is finetuned.
The adapter table is the algorithm's own state (checkpointed with it). With several workers each
writes the rows of its own tasks and the changes are all-reduced.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from metaprep.meta.algorithm import MetaAlgorithm, register
from metaprep.meta.inner import InnerLoopSpec, inner_loop
from metaprep.reparam.context import FastWeights
from metaprep.reparam.wrap import FastWeightInit, param_key


class AdapterTable(nn.Module):
    """Persistent per-task adapters as buffers (checkpointed with the model, never partitioned)."""

    def __init__(self, init: FastWeightInit, num_tasks: int, seed: int) -> None:
        super().__init__()
        self.layout = {layer: list(fs) for layer, fs in init.layout.items()}
        gen = torch.Generator().manual_seed(seed)
        for layer, factors in self.layout.items():
            for f in factors:
                base = init.params[param_key(layer, f)].detach()
                noise = torch.randn((num_tasks, *base.shape), generator=gen) * base.std() if base.any() else 0
                table = base.unsqueeze(0).repeat(num_tasks, *[1] * base.dim()) + noise
                self.register_buffer(param_key(layer, f), table)

    def gather(self, ids: list[int]) -> FastWeights:
        return {layer: {f: getattr(self, param_key(layer, f))[ids].clone().requires_grad_(True) for f in fs}
                for layer, fs in self.layout.items()}

    @torch.no_grad()
    def write(self, ids: list[int], old: FastWeights, new: FastWeights) -> None:
        for layer, fs in self.layout.items():
            for f in fs:
                table = getattr(self, param_key(layer, f))
                delta = torch.zeros_like(table)
                delta[ids] = (new[layer][f] - old[layer][f]).to(table.dtype)
                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    dist.all_reduce(delta)
                table.add_(delta)


@register
class MetaLoRA(MetaAlgorithm):
    name = "meta_lora"
    trains_fast_init = False
    encoder_ok = True

    def __init__(self, inner: InnerLoopSpec, adapters: AdapterTable, warm_start_steps: int = 0) -> None:
        super().__init__(inner, warm_start_steps=warm_start_steps)
        self.adapters = adapters

    @classmethod
    def from_config(cls, cfg, model, num_train_tasks):
        m = cfg.meta
        return cls(InnerLoopSpec(m.inner_steps, m.inner_lr, m.inner_optimizer),
                   AdapterTable(model.fast_init, max(num_train_tasks, 1), seed=cfg.seed + 3),
                   warm_start_steps=m.warm_start_steps)

    def meta_loss(self, model, support, query, step):
        inner = self.inner
        data = support.concat(query)
        old = self.adapters.gather(support.task_ids)
        new, losses = inner_loop(model, data, old, None, inner.steps, inner.lr, inner.optimizer)
        self.adapters.write(support.task_ids, old, new)
        fixed = {layer: {f: t.detach() for f, t in fs.items()} for layer, fs in new.items()}
        task_losses = model.task_losses(data, fixed, None)
        return task_losses, {"support_loss_before": float(losses[0].mean()),
                             "query_loss": float(task_losses.detach().mean())}
