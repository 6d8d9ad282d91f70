"""Choices and numeric ranges of a recipe: what :meth:`metaprep.config.MetaTrainConfig.validate` checks field by field.

Lower bounds keep a run meaningful; upper bounds keep a few characters of YAML from costing more than
the machine has (``model.tiny.vocab_size: 2e7`` or ``tasks.num_tasks: 1e8`` would exhaust its memory
instead of being refused). Each field has a generous fixed cap (:data:`CAPS`, ten times beyond any
real model or shipped recipe); the memory a ``tiny`` model run needs is estimated from its shape and
episodes (:func:`tiny_memory_bytes`) and compared with half of this machine's memory. Every refusal
names the key, the value and the bound.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import TYPE_CHECKING, Any

from metaprep.errors import ConfigError
from metaprep.jsonio import machine_memory_bytes

if TYPE_CHECKING:
    from metaprep.config import MetaTrainConfig

CAPS = {
    "model.tiny.vocab_size": 1 << 20,  # the largest real tokenizers have ~256k tokens
    "model.tiny.dim": 16_384,
    "model.tiny.layers": 256,
    "model.tiny.heads": 256,
    "model.tiny.hidden_dim": 65_536,
    "model.tiny.max_seq_len": 131_072,
    "tasks.num_tasks": 100_000,  # generated in memory by the synthetic family
    "tasks.synthetic_letters": 4096,
    "tasks.shots": 10_000,
    "tasks.query_size": 10_000,
    "tasks.seq_len": 32_768,
    "meta.meta_batch_size": 4_096,
    "checkpoint.max_failures": 100,  # Ray Train reads -1 as "retry forever": a worker that always fails hangs the job
    "meta.eval_tasks": 4_096,
    "meta.inner_steps": 10_000,
    "reparam.rank": 4_096,
    "reparam.kronecker_blocks": 4_096,
    "search.width": 16_384,
    "search.nodes": 64,
    "search.controller_hidden": 65_536,
}
SEED_MAX = 2**63 - 1  # torch generators take 64-bit seeds (the model adds small offsets to the seed)
SYNTHETIC_TASK_BYTES = 16 << 10  # one generated synthetic task (48 examples as Python objects)


def check_choices(cfg: Any) -> None:
    """Every field of ``cfg`` that declares choices holds one of them."""
    for key, value in _flat_choices(cfg):
        _choice(key, value, _choices_of(type(cfg), key))


def _choices_of(cls: type, dotted: str) -> tuple | None:
    """The valid values of the field at ``dotted`` (``None``: any value of its type)."""
    head, _, rest = dotted.partition(".")
    f = next(f for f in dataclasses.fields(cls) if f.name == head)
    if rest:
        return _choices_of(typing.get_type_hints(cls)[head], rest)
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def _flat_choices(cfg: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every field of ``cfg`` that declares choices (list items one by one)."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += _flat_choices(value, f"{prefix}{f.name}.")
        elif f.metadata.get("choices") is not None:
            out += [(f"{prefix}{f.name}", v) for v in (value if isinstance(value, list) else [value])]
    return out


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not valid; choose one of {', '.join(map(str, allowed))}")


def _positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{key}: must be a finite number > 0, got {value}")


def _finite_at_least(key: str, value: float, low: float) -> None:
    if not (math.isfinite(value) and value >= low):
        raise ConfigError(f"{key}: must be a finite number >= {low}, got {value}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key}: must be >= {low}, got {value}")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_ranges(cfg: MetaTrainConfig) -> None:
    """Every numeric field of ``cfg`` in range: lower bounds, :data:`CAPS` and the memory estimate."""
    m, t = cfg.meta, cfg.tasks
    for key in ("meta.inner_lr", "meta.outer_lr", "reparam.alpha", "search.tau_start", "search.tau_end"):
        _positive(key, _get(cfg, key))
    for key in ("meta.support_weight", "meta.weight_decay", "meta.grad_clip", "meta.early_stopping_min_delta"):
        _finite_at_least(key, _get(cfg, key), 0)
    for key, low in (("meta.inner_steps", 1), ("meta.meta_batch_size", 1), ("meta.meta_steps", 1),
                     ("meta.eval_every", 1), ("meta.warm_start_steps", 0), ("meta.eval_tasks", 1),
                     ("meta.early_stopping_patience", 0),
                     ("reparam.rank", 1), ("reparam.kronecker_blocks", 1), ("tasks.shots", 1),
                     ("tasks.query_size", 1), ("tasks.seq_len", 4), ("tasks.num_tasks", 3),
                     ("tasks.synthetic_letters", 1), ("distributed.num_workers", 1), ("distributed.cpus_per_worker", 1),
                     ("distributed.torch_threads", 0), ("search.width", 1), ("search.nodes", 1),
                     ("search.controller_hidden", 1), ("checkpoint.every", 0), ("checkpoint.keep", 1),
                     ("checkpoint.max_failures", 0),
                     ("model.tiny.vocab_size", 259), ("model.tiny.dim", 1), ("model.tiny.layers", 1),
                     ("model.tiny.heads", 1), ("model.tiny.hidden_dim", 1), ("model.tiny.max_seq_len", 4)):
        _at_least(key, _get(cfg, key), low)
    for key, cap in CAPS.items():
        if _get(cfg, key) > cap:
            raise ConfigError(f"{key}: must be <= {cap}, got {_get(cfg, key)}")
    for key in ("seed", "tasks.split_seed"):
        if not 0 <= _get(cfg, key) <= SEED_MAX:
            raise ConfigError(f"{key}: must be an integer in [0, 2**63 - 1], got {_get(cfg, key)}")
    if cfg.model.tiny.dim % cfg.model.tiny.heads:
        raise ConfigError(f"model.tiny.heads: must divide model.tiny.dim ({cfg.model.tiny.dim}), "
                          f"got {cfg.model.tiny.heads}")
    for key, frac in (("tasks.val_fraction", t.val_fraction), ("tasks.test_fraction", t.test_fraction)):
        if not 0.0 < frac < 0.5:
            raise ConfigError(f"{key}: must be in (0, 0.5), got {frac}")
    if m.meta_batch_size < cfg.distributed.num_workers:
        raise ConfigError(f"meta.meta_batch_size: must be >= distributed.num_workers "
                          f"({cfg.distributed.num_workers}) so every worker gets a task, got {m.meta_batch_size}")
    if cfg.model.path == "tiny" or cfg.model.kind == "tiny":
        _check_memory(cfg)


def tiny_memory_bytes(cfg: MetaTrainConfig) -> tuple[int, int]:
    """(parameters and optimizer state, activations and tasks) a ``tiny`` run holds on this machine, in bytes.

    Per worker: fp32 weights, gradients and AdamW's two moments (16 bytes a parameter), and the
    activations of its share of a meta-batch (or of the meta-val episodes) kept for every inner step:
    logits, softmax and their gradient over the vocabulary, plus per layer the hidden states, FFN and
    attention scores. Generated synthetic tasks are held by the driver and every worker. With
    ``meta.inner_checkpointing`` the meta-backward holds one inner step's graph (and the query's) at a time.
    """
    tiny, t, m, workers = cfg.model.tiny, cfg.tasks, cfg.meta, cfg.distributed.num_workers
    params = tiny.vocab_size * tiny.dim + tiny.layers * (4 * tiny.dim ** 2 + 3 * tiny.dim * tiny.hidden_dim
                                                         + 2 * tiny.dim) + tiny.dim  # tied embeddings
    per_token = 4 * (3 * tiny.vocab_size
                     + tiny.layers * (12 * tiny.dim + 4 * tiny.hidden_dim + 2 * tiny.heads * t.seq_len))
    per_task = (t.shots + t.query_size) * t.seq_len * per_token
    kept = 2 if m.inner_checkpointing else m.inner_steps + 1  # inner-step graphs alive at once, and the query's
    train = math.ceil(m.meta_batch_size / workers) * per_task * kept
    val = m.eval_tasks * per_task * 2  # adaptation of the meta-val episodes: forward + backward, no outer graph
    tasks = (workers + 1) * t.num_tasks * SYNTHETIC_TASK_BYTES if t.family == "synthetic" else 0
    return workers * 16 * params, workers * max(train, val) + tasks


def _check_memory(cfg: MetaTrainConfig) -> None:
    state, activations = tiny_memory_bytes(cfg)
    memory = machine_memory_bytes()
    bound = memory // 2  # the rest: Python, torch, Ray, DeepSpeed and the OS
    if state + activations > bound:
        gib = 1 << 30
        raise ConfigError(
            f"model.tiny / tasks / meta: a run of this size needs about {(state + activations) / gib:.1f} GiB "
            f"(weights and optimizer state {state / gib:.1f} GiB, activations and tasks {activations / gib:.1f} GiB), "
            f"above the bound of {bound / gib:.1f} GiB (half of this machine's {memory / gib:.1f} GiB); reduce "
            f"model.tiny.vocab_size/dim/layers/hidden_dim, meta.meta_batch_size, meta.eval_tasks, tasks.shots, "
            f"tasks.query_size, tasks.seq_len or tasks.num_tasks, or (second order) set meta.inner_checkpointing")
