"""Task families by name: ``tasks.family`` in a recipe selects one of these loaders.

Each loader takes the :class:`TasksConfig` and the resolved data directory and returns a list
of :class:`Task`. Families that read shared data import lazily so that the core library does
not depend on their parsers.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from metaprep.config import TasksConfig
from metaprep.errors import ConfigError, DataError
from metaprep.tasks.base import Task, TaskBatch, make_batch, validate_tasks
from metaprep.tasks.jsonl import load_jsonl_tasks
from metaprep.tasks.synthetic import make_synthetic_tasks

DATA_DIR_ENV = "METAPREP_DATA_DIR"
ENCODER_FAMILIES = ("convai2_mc",)  # scored by a sentence encoder (DESIGN.md §4), not a causal LM

# family -> "module:function"; each function(cfg: TasksConfig, data_dir: Path | None) -> list[Task]
_LAZY = {
    "persona": "metaprep.tasks.persona:load_persona_tasks",
    "multidomain": "metaprep.tasks.multidomain:load_multidomain_tasks",
    "summarization": "metaprep.tasks.summarization:load_summarization_tasks",
    "convai2_mc": "metaprep.tasks.convai2_mc:load_convai2_mc_tasks",
}

FAMILIES = ("synthetic", "jsonl", *_LAZY)


def batch_encoder(family: str, task_encoder: Callable[[list], torch.Tensor] | None = None,
                  ) -> Callable[..., TaskBatch]:
    """How the family's episodes become tensors: ``fn(episodes, part, tokenizer, seq_len, task_index)``.

    With a ``task_encoder`` (:func:`metaprep.search.task_encoder.task_encoder`), support batches also carry
    each task's embedding z for the TAMS controller.
    """
    if family in ENCODER_FAMILIES:
        from metaprep.tasks.convai2_mc import make_mc_batch

        encode = make_mc_batch
    else:
        encode = make_batch
    if task_encoder is None:
        return encode

    def encode_with_z(episodes, part, tokenizer, seq_len, task_index=None) -> TaskBatch:
        batch = encode(episodes, part, tokenizer, seq_len, task_index)
        return replace(batch, embedding=task_encoder(episodes)) if part == "support" else batch

    return encode_with_z


def batch_encoder_for(cfg) -> Callable[..., TaskBatch]:
    """:func:`batch_encoder` of a :class:`~metaprep.config.MetaTrainConfig`: its family's, with the TAMS task
    encoder when the config asks for one (:func:`metaprep.search.task_encoder.task_encoder`)."""
    from metaprep.search.task_encoder import task_encoder

    return batch_encoder(cfg.tasks.family, task_encoder(cfg))


def resolve_data_dir(cfg: TasksConfig) -> Path | None:
    """``tasks.data_dir``, else ``$METAPREP_DATA_DIR``, else ``../shared/data`` if it exists."""
    if cfg.data_dir:
        return Path(cfg.data_dir)
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def _loader(family: str) -> Callable[[TasksConfig, Path | None], list[Task]]:
    if family == "synthetic":
        return lambda cfg, _: make_synthetic_tasks(cfg.num_tasks, letters=cfg.synthetic_letters, seed=cfg.split_seed)
    if family == "jsonl":
        def load(cfg: TasksConfig, _: Path | None) -> list[Task]:
            if not cfg.path:
                raise ConfigError("tasks.path: family 'jsonl' needs a JSONL file or folder of *.jsonl files")
            return load_jsonl_tasks(cfg.path)
        return load
    if family not in _LAZY:
        raise ConfigError(f"tasks.family: {family!r} is not valid; choose one of {', '.join(FAMILIES)}")
    module, func = _LAZY[family].split(":")
    return getattr(importlib.import_module(module), func)


def load_tasks(cfg: TasksConfig) -> list[Task]:
    tasks = _loader(cfg.family)(cfg, resolve_data_dir(cfg))
    source = cfg.path or f"tasks.family={cfg.family}"
    if not tasks:
        raise DataError(f"{source}: no tasks found")
    return validate_tasks(tasks, cfg.shots + cfg.query_size, source)
