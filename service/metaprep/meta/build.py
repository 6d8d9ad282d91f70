"""Assemble a MetaModel for a config: base model, wrappers, algorithm, trainable parameter set."""

from __future__ import annotations

import torch

from metaprep.config import MetaTrainConfig
from metaprep.meta.algorithm import get_algorithm
from metaprep.meta.meta_lora import AdapterTable
from metaprep.meta.model import MetaModel
from metaprep.models.base import LoadedModel, load_base_model


def build_meta_model(cfg: MetaTrainConfig, loaded: LoadedModel | None = None, num_train_tasks: int = 0,
                     model_cls: type[MetaModel] = MetaModel) -> tuple[MetaModel, LoadedModel]:
    """Load (or take) the base model and wrap it for ``cfg.algorithm`` as a ``model_cls``.

    Trainable parameters follow the algorithm: the base unless ``meta.freeze_base`` (and never for
    ``finetune``); the fast-weight init only for algorithms that meta-learn it; the controller for
    ``mltd``. Dropout is disabled so 1 worker and N workers compute the same meta-gradient.
    """
    loaded = loaded or load_base_model(cfg.model, seed=cfg.seed)
    algorithm = get_algorithm(cfg.algorithm, second_order=cfg.meta.second_order)
    if not algorithm.first_order:
        # CPU flash-SDPA has no double backward; eager attention is differentiable twice.
        loaded.model.set_attn_implementation("eager")
    model = model_cls(loaded.model, cfg, uses_tams=algorithm.uses_tams)
    model.algorithm = algorithm
    if cfg.algorithm == "meta_lora":
        model.adapters = AdapterTable(model.fast_init, max(num_train_tasks, 1), seed=cfg.seed + 3)
    for p in model.lm.parameters():
        p.requires_grad_(algorithm.meta_trains and not cfg.meta.freeze_base)
    for p in model.fast_init.parameters():
        p.requires_grad_(algorithm.trains_fast_init)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if hasattr(model.lm.config, "attention_dropout"):
        model.lm.config.attention_dropout = 0.0
    return model, loaded


def trainable_parameters(model: MetaModel) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
