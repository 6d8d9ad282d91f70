"""Assemble what a config trains: the MetaModel for its task family and the algorithm that meta-trains it.

:func:`build_meta_model` loads the base (a causal LM, or the sentence encoder of the ``convai2_mc``
family), wraps it and sets which parameters the algorithm trains; :func:`build_learner` pairs the
model with its algorithm in the one module handed to DeepSpeed.
"""

from __future__ import annotations

import torch
from torch import nn

from metaprep.config import MetaTrainConfig
from metaprep.meta.algorithm import ALGORITHMS, MetaAlgorithm
from metaprep.meta.checkpointing import checkpoint_decoder_layers
from metaprep.meta.mc_scorer import MCScorer
from metaprep.meta.model import MetaModel
from metaprep.meta.precision import mixed_precision
from metaprep.models.base import LoadedModel, load_base_model, resolve_path
from metaprep.tasks.base import TaskBatch
from metaprep.tasks.families import ENCODER_FAMILIES


class MetaLearner(nn.Module):
    """The module DeepSpeed wraps: a :class:`MetaModel` and the algorithm that meta-trains it.

    ``forward`` returns the per-task meta-losses (T,) of this worker's tasks and scalar metrics, so
    one ``engine(...)`` call per meta-step runs under every ZeRO stage.

    The call's mixed precision (``dtype``, bf16 under ``distributed.precision``) is entered here, inside
    the engine: DeepSpeed's ``engine.forward`` switches off a CUDA autocast entered outside it unless its
    own ``torch_autocast`` section is on (``deepspeed.runtime.torch_autocast.autocast_if_enabled``), which
    would also send those gradients in bf16. Measured on an H200 before this: "bf16" steps ran in fp32.
    """

    def __init__(self, model: MetaModel, algorithm: MetaAlgorithm) -> None:
        super().__init__()
        self.model = model
        self.algorithm = algorithm

    def forward(self, support: TaskBatch, query: TaskBatch, step: int,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
        with mixed_precision(support.input_ids.device.type, dtype):
            return self.algorithm.objective(self.model, support, query, step)


def load_for_family(cfg: MetaTrainConfig) -> LoadedModel:
    """The base the family needs: the sentence encoder for ``convai2_mc``, else the causal LM of ``model``."""
    if cfg.tasks.family in ENCODER_FAMILIES:
        from metaprep.models.hf import load_encoder

        path = resolve_path(cfg.model.path)
        encoder, tokenizer = load_encoder(path)
        return LoadedModel(encoder, tokenizer, "hf", str(path))
    return load_base_model(cfg.model, seed=cfg.seed)


def needs_eager_attention(cfg: MetaTrainConfig) -> bool:
    """Eager attention instead of SDPA: for second order and for bf16 on CPU.

    CPU flash-SDPA has no double backward; eager attention is differentiable twice. In bf16 on CPU
    eager is also faster: SmolLM2 fomaml, 4 tasks x 8 x 64 tokens, 4.4 s vs 5.5 s a step
    (flash-SDPA's bf16 backward was a fifth of the step); in fp32 flash is faster (11.6 s vs 13.9 s).
    """
    cpu_bf16 = cfg.distributed.bf16 and not cfg.distributed.use_gpu
    return ALGORITHMS[cfg.algorithm].uses_second_order(cfg.meta.second_order) or cpu_bf16


def build_meta_model(cfg: MetaTrainConfig, loaded: LoadedModel | None = None) -> tuple[MetaModel, LoadedModel]:
    """Load (or take) the base model and wrap it for ``cfg.algorithm``.

    Trainable parameters follow the algorithm: the base unless ``meta.freeze_base`` (and never for
    ``finetune``); the fast-weight init only for algorithms that meta-learn it; the controller for
    ``mltd``. Dropout is disabled so 1 worker and N workers compute the same meta-gradient.
    """
    spec = ALGORITHMS[cfg.algorithm]
    loaded = loaded or load_for_family(cfg)
    if needs_eager_attention(cfg):
        loaded.model.set_attn_implementation("eager")
    model_cls = MCScorer if cfg.tasks.family in ENCODER_FAMILIES else MetaModel
    model = model_cls(loaded.model, cfg.reparam, cfg.search if spec.uses_tams else None, seed=cfg.seed)
    if cfg.distributed.activation_checkpointing:
        checkpoint_decoder_layers(model.lm, model.ctx)
    for p in model.lm.parameters():
        p.requires_grad_(spec.meta_trains and not cfg.meta.freeze_base)
    for p in model.fast_init.parameters():
        p.requires_grad_(spec.trains_fast_init)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if hasattr(model.lm.config, "attention_dropout"):
        model.lm.config.attention_dropout = 0.0
    return model, loaded


def build_learner(cfg: MetaTrainConfig, model: MetaModel, num_train_tasks: int = 0) -> MetaLearner:
    """Pair ``model`` with ``cfg.algorithm`` (Meta-LoRA keeps one adapter per meta-training task)."""
    return MetaLearner(model, ALGORITHMS[cfg.algorithm].from_config(cfg, model, num_train_tasks))


def trainable_parameters(module: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
