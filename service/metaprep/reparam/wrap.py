"""Wrap a base model's dense layers by module name and hold the meta-learned fast-weight init."""

from __future__ import annotations

import torch
from torch import nn

from metaprep.config import ReparamConfig
from metaprep.errors import ConfigError
from metaprep.reparam.context import FastContext, FastWeights
from metaprep.reparam.kinds import get_kind
from metaprep.reparam.layers import ReparamLinear


def _is_dense(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or module.__class__.__name__ == "Conv1D"


def wrap_dense_layers(model: nn.Module, cfg: ReparamConfig, ctx: FastContext) -> dict[str, ReparamLinear]:
    """Replace every dense layer whose name ends with one of ``cfg.targets`` by a ReparamLinear.

    Returns ``{module name: wrapper}``. The LM head is never wrapped (tied to the embeddings).
    """
    chosen = [(name, mod) for name, mod in model.named_modules()
              if _is_dense(mod) and name.split(".")[-1] in cfg.targets and "lm_head" not in name]
    if not chosen:
        raise ConfigError(f"reparam.targets: no dense layer of the model matches {cfg.targets}")
    wrappers = {}
    for name, module in chosen:
        c_out, c_in = (module.weight.shape[::-1] if module.__class__.__name__ == "Conv1D"
                       else module.weight.shape)
        problem = get_kind(cfg.kind).check(name, c_in, c_out, cfg.rank, cfg.kronecker_blocks)
        if problem:
            raise ConfigError(problem)
        wrapper = ReparamLinear(module, name, cfg.kind, cfg.rank, cfg.alpha, cfg.kronecker_blocks, ctx)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, wrapper)
        wrappers[name] = wrapper
    return wrappers


def param_key(layer: str, factor: str) -> str:
    """The parameter name of one fast-weight init (dots are not allowed in parameter names)."""
    return f"{layer}--{factor}".replace(".", "__")


class FastWeightInit(nn.Module):
    """Meta-learned initialisation of every fast weight (TARP/LoRA factors, TAMS op weights).

    ``forward(T)`` expands each init to a leading task dimension; because it is a module call,
    ZeRO-3 gathers the partitioned init parameters for it like for any other forward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layout: dict[str, list[str]] = {}
        self.meta_only: set[tuple[str, str]] = set()  # (layer, factor) the inner loop does not adapt

    @property
    def params(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters(recurse=False))

    def add(self, layer: str, factor: str, value: torch.Tensor, adapted: bool = True) -> None:
        """Register the init of one fast weight; ``adapted=False``: read per task but only meta-learned
        (the inner loop leaves it at its init, e.g. the TAMS cell's projections)."""
        # registered directly on this module (not in a ParameterDict child): ZeRO-3 gathers a
        # module's own parameters for its forward, and a child that never runs forward is never gathered
        self.register_parameter(param_key(layer, factor), nn.Parameter(value))
        self.layout.setdefault(layer, []).append(factor)
        if not adapted:
            self.meta_only.add((layer, factor))

    def add_reparam(self, wrappers: dict[str, ReparamLinear], seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for name, w in wrappers.items():
            for factor, shape in w.impl.shapes(w.c_in, w.c_out, w.rank, w.blocks).items():
                self.add(name, factor, w.impl.init(factor, shape, gen))

    def forward(self, num_tasks: int) -> FastWeights:
        # repeat (a copy), not expand (a view): ZeRO-3 frees gathered params after this forward
        return {layer: {f: p.unsqueeze(0).repeat(num_tasks, *[1] * p.dim()) for f, p in fs.items()}
                for layer, fs in self.single().items()}

    def single(self) -> FastWeights:
        """The init without a task dimension (for export)."""
        params = self.params
        return {layer: {f: params[param_key(layer, f)] for f in factors} for layer, factors in self.layout.items()}
