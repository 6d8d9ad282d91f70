"""The baselines' model: the MetaModel's math as an ordinary module, as a ``higher`` or ``torch.func`` user writes it.

A plain copy of the base whose LoRA/TARP factors and TAMS op weights are ordinary ``nn.Parameter`` s
with a task dimension of 1. The delta is the library's own (:class:`~metaprep.reparam.layers.ReparamLinear`
over its kind's ``delta``), the cell is the library's :class:`~metaprep.search.cell.TAMSCell`, and the
loss, task embedding and architecture are :class:`~metaprep.meta.model.MetaModel` 's own methods, so
``higher`` and ``torch.func`` (:mod:`.functional`) see the same math as the batched step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from metaprep.config import SearchConfig
from metaprep.meta.model import MetaModel, ffn_modules
from metaprep.reparam.context import FastContext
from metaprep.reparam.layers import ReparamLinear
from metaprep.reparam.wrap import param_key
from metaprep.search.cell import TAMSCell


def _own_factors(module: nn.Module, init: dict[str, torch.Tensor], prefix: str) -> dict[str, str]:
    """Register each factor of ``init`` on ``module`` as a parameter with a task dimension of 1; factor -> name."""
    names = {f: prefix + f.replace(".", "_") for f in init}
    for f, value in init.items():
        module.register_parameter(names[f], nn.Parameter(value.detach().clone().unsqueeze(0)))
    return names


class PlainReparamLinear(ReparamLinear):
    """A :class:`ReparamLinear` over a plain base layer whose factors are its own parameters.

    Its private :class:`FastContext` is filled from those parameters for each forward, so the
    wrapper's own ``delta`` (the kind's math) runs unchanged.
    """

    def __init__(self, base: nn.Module, like: ReparamLinear, init: dict[str, torch.Tensor]) -> None:
        super().__init__(base, like.name, like.kind, like.rank, like.scale * like.rank, like.blocks, FastContext())
        self.factors = _own_factors(self, init, "f_")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = {f: getattr(self, name) for f, name in self.factors.items()}
        with self.ctx.use({self.name: fast}, None, 1):
            return super().forward(x)


class PlainCellFFN(nn.Module):
    """An FFN followed by its TAMS cell, op weights as ordinary parameters (the cell's own code)."""

    def __init__(self, ffn: nn.Module, cell_name: str, layer_index: int, search: SearchConfig,
                 init: dict[str, torch.Tensor], holder: FastContext) -> None:
        super().__init__()
        self.ffn = ffn
        self.cell_name = cell_name
        self.factors = _own_factors(self, init, "c_")
        self.cell = TAMSCell(cell_name, layer_index, search.nodes, search.ops, holder)  # a hook object, not a module
        self.holder = holder  # holds the task's architecture (set per task, outside higher)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ffn(x)
        fast = {self.cell_name: {f: getattr(self, name) for f, name in self.factors.items()}}
        with self.holder.use(fast, self.holder.arch, 1):
            return self.cell(self.ffn, (x,), y)


class SliceableModuleList(nn.ModuleList):
    """``higher`` patches a ModuleList into a class whose constructor takes other arguments, so the
    ``layers[:n]`` slicing of transformers' Llama (which calls ``self.__class__(...)``) fails; slices
    here return a plain list of the (patched) modules, which is all the model iterates over."""

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return list(self._modules.values())[idx]
        return super().__getitem__(idx)


class PlainMetaModel(nn.Module):
    """The MetaModel's math as an ordinary module: what a ``higher`` user would write."""

    task_embedding = MetaModel.task_embedding  # mean input embedding of the support set (reads self.lm)
    architecture = MetaModel.architecture  # the controller's sampled architecture (reads self.controller)

    def __init__(self, lm: nn.Module, meta: MetaModel, search: SearchConfig) -> None:
        super().__init__()
        for name, module in list(lm.named_modules()):
            if type(module) is nn.ModuleList:
                parent, _, attr = name.rpartition(".")
                (lm.get_submodule(parent) if parent else lm).register_module(attr, SliceableModuleList(module))
        self.lm = lm
        self.holder = FastContext()
        self.encoded_tasks = meta.encoded_tasks  # read by task_embedding
        init = meta.fast_init.single()
        wrapped = {name: m for name, m in meta.lm.named_modules() if isinstance(m, ReparamLinear)}
        for name, like in wrapped.items():
            parent, _, attr = name.rpartition(".")
            owner = lm.get_submodule(parent) if parent else lm
            setattr(owner, attr, PlainReparamLinear(getattr(owner, attr), like, init[name]))
        self.controller = copy.deepcopy(meta.controller) if meta.uses_tams else None
        if self.controller is not None:
            for index, (name, ffn) in enumerate(ffn_modules(lm)):
                parent, _, attr = name.rpartition(".")
                lm.get_submodule(parent).register_module(
                    attr, PlainCellFFN(ffn, f"{name}.tams", index, search, init[f"{name}.tams"], self.holder))
        meta_only = meta.fast_init.meta_only  # read per task but not adapted (the TAMS projections)
        self.fast: list[nn.Parameter] = []  # what the inner loop adapts
        for m in lm.modules():
            if isinstance(m, PlainReparamLinear):
                layer = m.name
            elif isinstance(m, PlainCellFFN):
                layer = m.cell_name
            else:
                continue
            self.fast += [getattr(m, name) for f, name in m.factors.items() if (layer, f) not in meta_only]


def learner_names(plain: PlainMetaModel) -> dict[str, str]:
    """Each parameter name of ``plain`` -> the name of the :class:`~metaprep.meta.build.MetaLearner` parameter
    it copies (``model.lm.*``, ``model.fast_init.*``, ``model.controller.*``), to compare gradients."""
    factors, cells = {}, []
    for name, m in plain.lm.named_modules():
        if isinstance(m, PlainReparamLinear):
            layer = m.name
        elif isinstance(m, PlainCellFFN):
            layer = m.cell_name
            cells.append(f"lm.{name}.")
        else:
            continue
        factors.update({f"lm.{name}.{attr}": f"model.fast_init.{param_key(layer, f)}" for f, attr in m.factors.items()})
    out = {}
    for name, _ in plain.named_parameters():
        cell = next((c for c in cells if name.startswith(c + "ffn.")), None)  # the FFN inside a PlainCellFFN
        out[name] = factors.get(name) or "model." + (cell + name[len(cell) + 4:] if cell else name)
    return out
