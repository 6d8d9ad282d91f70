"""The ``sweep:`` section of a recipe: search space, searcher, ASHA and concurrency, validated.

A sweep recipe is an ordinary meta-training recipe plus a top-level ``sweep:`` mapping (the rest of
the file is the base configuration every trial starts from)::

    sweep:
      space:                                  # dotted recipe keys -> one distribution each
        meta.inner_lr: {loguniform: [0.03, 1.0]}
        meta.outer_lr: {loguniform: [3.0e-4, 3.0e-2]}
        meta.inner_steps: {choice: [1, 2, 3]}
        reparam.rank: {choice: [2, 4, 8]}
      num_samples: 6                          # trials in total (initial points included)
      searcher: random                        # random | optuna (if installed) | transfer
      seed: 0                                 # of the searcher's random stream
      max_concurrent: 0                       # 0 = as many as the cluster's CPUs (or GPUs) fit
      initial:                                # optional: configurations evaluated first
        - {meta.inner_lr: 0.3, meta.outer_lr: 0.003}
      portfolio: [...]                        # searcher transfer: ranked configurations to try first
      recommender: {...}                      # searcher transfer: the recommender's portfolio (below)
      asha: {enabled: true, grace_period: 10, reduction_factor: 2}

Nested keys (``meta: {inner_lr: {loguniform: ...}}``) are the same as dotted ones, so
``--set 'sweep.space.meta.inner_lr={loguniform: [0.01, 0.1]}'`` works. Numbers YAML reads as strings
(``1e-3``: no dot) are taken as numbers for float keys and float distributions.

Distributions: ``loguniform: [lo, hi]`` and ``uniform: [lo, hi]`` (float keys), ``randint: [lo, hi]``
and ``lograndint: [lo, hi]`` (integer keys, both ends inclusive), ``choice: [v1, v2, ...]`` (any key).
The metric is always ``meta_val_loss`` (mean meta-validation query loss after adaptation, lower is
better); ASHA's time axis is the meta-step, so rungs fall at ``grace_period · reduction_factor^k``
meta-steps, ``max_t`` being ``meta.meta_steps``.

Keys that would make trials incomparable or change their resources cannot be swept: the task data
and split (``tasks.*``, ``seed``: the meta-validation tasks must be the same for every trial),
``meta.meta_steps`` / ``meta.eval_every`` / ``meta.eval_tasks`` (ASHA's time axis and the metric's
definition), and ``distributed.*``, ``checkpoint.*``, ``registry.*``, ``tracking.*``.

Searcher ``transfer`` proposes a portfolio of configurations first, in order, then samples the space
at random (:class:`~metaprep.transfer.searcher.PortfolioSearcher`; the zero-shot warm start of
Strangmann et al., 2024, and Quick-Tune's initial design, Arango et al., ICLR 2024). The portfolio is
the explicit ``portfolio:`` list, then the top-k of the transfer recommender when a ``recommender:``
block is given (either one, or both; a recommended point already listed is not repeated)::

    recommender:
      surrogate: .state/surrogate             # a folder saved by `jobs.recommend --surrogate-dir`, or
                                              # models:/NAME/VERSION | models:/NAME@alias (`--register`)
      meta_features: {num_samples: 5000}      # exactly the surrogate's meta-feature names
      params: {meta.inner_lr: lr}             # swept key -> the surrogate's configuration name
      fixed: {rank: 8}                        # surrogate configuration values held fixed
      candidates: 64                          # points sampled from the space (seeded by sweep.seed)
      top_k: 4                                # of them, the recommender's portfolio
      cost_aware: false                       # Quick-Tune's cost-aware ranking (needs a cost surrogate)

The surrogate is loaded (a folder relative to the working directory; a ``models:/`` URI downloaded
from ``tracking.uri`` / ``MLFLOW_TRACKING_URI``) and the portfolio ranked while the section is
validated, so a mismatch fails before any trial runs. Every configuration name of the surrogate
must be mapped under ``params`` or held under ``fixed`` (else it would be imputed silently).

Every error is a :class:`~metaprep.errors.ConfigError` naming ``file:line`` and the ``sweep.`` key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaprep.config import MetaTrainConfig, from_dict
from metaprep.errors import ConfigError, ModelLoadError, RegistryError

METRIC = "meta_val_loss"
MODE = "min"
SEARCHERS = ("random", "optuna", "transfer")
KINDS = ("loguniform", "uniform", "randint", "lograndint", "choice")
SWEEP_KEYS = ("space", "num_samples", "searcher", "seed", "max_concurrent", "initial", "portfolio", "recommender",
              "asha", "metric")
RECOMMENDER_KEYS = ("surrogate", "meta_features", "params", "fixed", "candidates", "top_k", "cost_aware")
ASHA_KEYS = ("enabled", "grace_period", "reduction_factor")
FORBIDDEN_PREFIXES = ("tasks.", "distributed.", "checkpoint.", "registry.", "tracking.")
FORBIDDEN_KEYS = ("seed", "meta.meta_steps", "meta.eval_every", "meta.eval_tasks")

# Used when a recipe has no ``sweep:`` section (e.g. jobs/configs/tiny.yaml): the method's stated pain point.
DEFAULT_SWEEP: dict[str, Any] = {
    "space": {
        "meta.inner_lr": {"loguniform": [0.03, 1.0]},
        "meta.outer_lr": {"loguniform": [3e-4, 3e-2]},
        "meta.inner_steps": {"choice": [1, 2, 3]},
    },
}


@dataclass
class ParamSpec:
    """One swept key and its distribution."""

    key: str
    kind: str
    args: list

    def to_tune(self):
        """The Ray Tune domain for this distribution."""
        from ray import tune

        a = self.args
        if self.kind == "loguniform":
            return tune.loguniform(a[0], a[1])
        if self.kind == "uniform":
            return tune.uniform(a[0], a[1])
        if self.kind == "randint":
            return tune.randint(a[0], a[1] + 1)  # Tune's upper bound is exclusive; the YAML's is inclusive
        if self.kind == "lograndint":
            return tune.lograndint(a[0], a[1] + 1)
        return tune.choice(list(a))

    def probe_values(self) -> list:
        """Values that every draw lies between (or is one of): checked against the recipe's validation."""
        return list(self.args) if self.kind == "choice" else [self.args[0], self.args[1]]

    @property
    def numeric(self) -> bool:
        return self.kind != "choice" or all(_is_number(v) for v in self.args)

    @property
    def log_scale(self) -> bool:
        return self.kind in ("loguniform", "lograndint")

    def to_dict(self) -> dict:
        return {self.kind: list(self.args)}


@dataclass
class AshaSpec:
    enabled: bool = True
    grace_period: int | None = None  # None: meta.eval_every (the first evaluation)
    reduction_factor: float = 2.0


@dataclass
class RecommenderSpec:
    """A validated ``sweep.recommender`` block (module docstring)."""

    surrogate: str
    meta_features: dict[str, float]
    params: dict[str, str]  # swept key -> surrogate configuration name
    fixed: dict[str, Any] = field(default_factory=dict)
    candidates: int = 64
    top_k: int = 4
    cost_aware: bool = False


@dataclass
class SweepSpec:
    """A validated ``sweep:`` section."""

    space: dict[str, ParamSpec]
    num_samples: int = 6
    searcher: str = "random"
    seed: int = 0
    max_concurrent: int = 0
    initial: list[dict] = field(default_factory=list)
    portfolio: list[dict] = field(default_factory=list)
    asha: AshaSpec = field(default_factory=AshaSpec)
    metric: str = METRIC
    mode: str = MODE
    recommender: RecommenderSpec | None = None
    # the recommender's picks in rank order: Recommendation fields plus ``params`` (the swept keys)
    recommended: list[dict] = field(default_factory=list)

    def tune_space(self) -> dict:
        return {key: p.to_tune() for key, p in self.space.items()}

    def to_dict(self) -> dict:
        return {"space": {k: p.to_dict() for k, p in self.space.items()}, "num_samples": self.num_samples,
                "searcher": self.searcher, "seed": self.seed, "max_concurrent": self.max_concurrent,
                "initial": self.initial, "portfolio": self.portfolio, "asha": dataclasses.asdict(self.asha),
                "metric": self.metric, "mode": self.mode,
                "recommender": dataclasses.asdict(self.recommender) if self.recommender else None}


# --------------------------------------------------------------------------- config plumbing

def apply_params(base: dict, params: dict[str, Any]) -> dict:
    """A deep copy of the nested recipe ``base`` with dotted ``params`` set."""
    data = copy.deepcopy(base)
    for dotted, value in params.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def trial_config(base: dict, params: dict[str, Any], source: str = "<sweep>") -> MetaTrainConfig:
    """The validated configuration of one trial: ``base`` with the sampled ``params``.

    Checkpoints are taken at every meta-validation: that is how the meta-val loss reaches ASHA
    during training (:mod:`metaprep.tune.sweep` reads it from each checkpoint's trainer state).
    """
    cfg = from_dict(MetaTrainConfig, apply_params(base, params), source).validate()
    cfg.checkpoint.every = cfg.meta.eval_every
    return cfg


def _field_type(dotted: str) -> Any:
    """The annotated type of a dotted MetaTrainConfig key, or a ConfigError listing the valid keys here."""
    cls: Any = MetaTrainConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown recipe key {dotted!r}; valid keys at {where}: {', '.join(sorted(hints))}")
        tp = hints[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"{'.'.join(parts[: i + 1])!r} is a value, not a section (in {dotted!r})")
            cls = tp
        elif dataclasses.is_dataclass(tp):
            raise ConfigError(f"{dotted!r} is a section; sweep one of its keys: "
                              f"{', '.join(sorted(typing.get_type_hints(tp)))}")
    return tp


def _is_section(dotted: str) -> bool:
    cls: Any = MetaTrainConfig
    for part in dotted.split("."):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return False
        cls = hints[part]
    return dataclasses.is_dataclass(cls)


def _as_float(v: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: take it as the number it means, as the recipe loader does."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _is_float_key(dotted: str) -> bool:
    try:
        tp = _field_type(dotted)
    except ConfigError:
        return False
    return tp is float or float in typing.get_args(tp)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --------------------------------------------------------------------------- parsing

class _Where:
    """``file:line: sweep.key`` prefixes for error messages."""

    def __init__(self, source: str, lines: dict[str, int]):
        self.source, self.lines = source, lines

    def __call__(self, dotted: str) -> str:
        line = self.lines.get(dotted)
        return f"{self.source}:{line}: {dotted}" if line else f"{self.source}: {dotted}"


def parse_sweep(raw: Any, base: dict, source: str = "<recipe>", lines: dict[str, int] | None = None,
                tracking_uri: str | None = None) -> SweepSpec:
    """Validate a ``sweep:`` mapping (``None``: :data:`DEFAULT_SWEEP`) against the base recipe ``base``.

    A ``recommender`` block is ranked here (``tracking_uri``: where a ``models:/`` surrogate is downloaded from).
    """
    where = _Where(source, lines or {})
    if raw is None:
        raw = copy.deepcopy(DEFAULT_SWEEP)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where('sweep')}: expected a mapping (space, num_samples, searcher, ...), "
                          f"got {type(raw).__name__}")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{where(f'sweep.{key}')}: unknown key; valid keys: {', '.join(SWEEP_KEYS)}")
    space_raw = raw.get("space", DEFAULT_SWEEP["space"])
    if not isinstance(space_raw, dict) or not space_raw:
        raise ConfigError(f"{where('sweep.space')}: expected a non-empty mapping of recipe keys to distributions, "
                          f"e.g. {{meta.inner_lr: {{loguniform: [0.03, 1.0]}}}}")
    space = {k: _parse_param(k, v, base, where) for k, v in _flatten_space(space_raw).items()}

    metric = raw.get("metric", METRIC)
    if metric != METRIC:
        raise ConfigError(f"{where('sweep.metric')}: only {METRIC!r} (meta-validation query loss after adaptation, "
                          f"minimised) is reported by the trials, got {metric!r}")
    num_samples = _int(raw.get("num_samples", 6), "sweep.num_samples", 1, where)
    seed = _int(raw.get("seed", 0), "sweep.seed", 0, where)
    max_concurrent = _int(raw.get("max_concurrent", 0), "sweep.max_concurrent", 0, where)
    searcher = raw.get("searcher", "random")
    if searcher not in SEARCHERS:
        raise ConfigError(f"{where('sweep.searcher')}: {searcher!r} is not valid; choose one of "
                          f"{', '.join(SEARCHERS)}")
    initial = _points(raw.get("initial", []), "sweep.initial", space, base, where)
    portfolio = _points(raw.get("portfolio", []), "sweep.portfolio", space, base, where)
    has_recommender = raw.get("recommender") is not None
    if has_recommender and searcher != "transfer":
        raise ConfigError(f"{where('sweep.recommender')}: only used by searcher 'transfer' (set sweep.searcher: "
                          f"transfer), got searcher {searcher!r}")
    if searcher == "transfer" and not portfolio and not has_recommender:
        raise ConfigError(f"{where('sweep.portfolio')}: searcher 'transfer' needs a non-empty portfolio (the "
                          f"recommended configurations, best first, e.g. [{{meta.inner_lr: 0.3}}]) or a "
                          f"sweep.recommender block")
    if searcher != "transfer" and portfolio:
        raise ConfigError(f"{where('sweep.portfolio')}: only used by searcher 'transfer' (use sweep.initial to "
                          f"evaluate given configurations first with searcher {searcher!r})")
    if searcher == "transfer" and initial:
        raise ConfigError(f"{where('sweep.initial')}: with searcher 'transfer', list the configurations to "
                          f"evaluate first under sweep.portfolio")
    asha = _parse_asha(raw.get("asha", {}), base, where)
    spec = SweepSpec(space=space, num_samples=num_samples, searcher=searcher, seed=seed,
                     max_concurrent=max_concurrent, initial=initial, portfolio=portfolio, asha=asha)
    if has_recommender:
        spec.recommender = _parse_recommender(raw["recommender"], space, where)
        spec.recommended = recommend(spec.recommender, space, seed, where, tracking_uri)
        spec.portfolio += [r["params"] for r in spec.recommended if r["params"] not in spec.portfolio]
    return spec


def _flatten_space(raw: dict, prefix: str = "") -> dict[str, Any]:
    """``{meta: {inner_lr: {loguniform: ...}}}`` -> ``{"meta.inner_lr": {loguniform: ...}}`` (what --set builds)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and _is_section(dotted) and not set(value) & set(KINDS):
            out.update(_flatten_space(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _int(value: Any, key: str, low: int, where: _Where) -> int:
    if not _is_int(value) or value < low:
        raise ConfigError(f"{where(key)}: expected an integer >= {low}, got {value!r}")
    return value


def _check_values(key: str, values: list, base: dict, where: _Where, what: str) -> None:
    """Each value must pass the recipe's own type and range validation at ``key``."""
    for v in values:
        try:
            from_dict(MetaTrainConfig, apply_params(base, {key: v})).validate()
        except ConfigError as exc:
            msg = str(exc).removeprefix("<config>: ")
            raise ConfigError(f"{where(what)}: value {v!r} is not valid for {key} ({msg})") from None


def _parse_param(key: str, spec: Any, base: dict, where: _Where) -> ParamSpec:
    dotted = f"sweep.space.{key}"
    if key in FORBIDDEN_KEYS or key.startswith(FORBIDDEN_PREFIXES):
        raise ConfigError(f"{where(dotted)}: {key} cannot be swept (it would change the meta-validation tasks, "
                          f"ASHA's time axis or the trial's resources); set it in the recipe instead")
    try:
        tp = _field_type(key)
    except ConfigError as exc:
        raise ConfigError(f"{where(dotted)}: {exc}") from None
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where(dotted)}: expected one distribution, e.g. {{loguniform: [lo, hi]}} or "
                          f"{{choice: [a, b]}}; kinds: {', '.join(KINDS)}")
    kind, args = next(iter(spec.items()))
    if kind not in KINDS:
        raise ConfigError(f"{where(dotted)}: unknown distribution {kind!r}; choose one of {', '.join(KINDS)}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where(dotted)}: {kind} needs a non-empty list, got {args!r}")
    origin = typing.get_origin(tp)
    base_tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp) if origin else tp
    if kind in ("loguniform", "uniform") or base_tp is float:
        args = [_as_float(a) for a in args]
    if kind != "choice":
        if len(args) != 2 or not all(_is_number(a) for a in args):
            raise ConfigError(f"{where(dotted)}: {kind} takes [lo, hi] (two numbers), got {args!r}")
        lo, hi = args
        if not lo < hi:
            raise ConfigError(f"{where(dotted)}: {kind} needs lo < hi, got [{lo}, {hi}]")
        if kind in ("loguniform", "lograndint") and lo <= 0:
            raise ConfigError(f"{where(dotted)}: {kind} needs lo > 0, got {lo}")
        if kind in ("loguniform", "uniform") and base_tp is not float:
            raise ConfigError(f"{where(dotted)}: {key} is {getattr(base_tp, '__name__', base_tp)}, not float; "
                              f"use choice{', randint or lograndint' if base_tp is int else ''}")
        if kind in ("randint", "lograndint"):
            if base_tp is not int:
                raise ConfigError(f"{where(dotted)}: {key} is {getattr(base_tp, '__name__', base_tp)}, not int; "
                                  f"use {'loguniform or uniform' if base_tp is float else 'choice'}")
            if not (_is_int(lo) and _is_int(hi)):
                raise ConfigError(f"{where(dotted)}: {kind} bounds must be integers, got {args!r}")
        if not all(math.isfinite(a) for a in args):
            raise ConfigError(f"{where(dotted)}: bounds must be finite, got {args!r}")
    p = ParamSpec(key, kind, list(args))
    _check_values(key, p.probe_values(), base, where, dotted)
    return p


def _points(raw: Any, what: str, space: dict[str, ParamSpec], base: dict, where: _Where) -> list[dict]:
    if not isinstance(raw, list) or not all(isinstance(p, dict) and p for p in raw):
        raise ConfigError(f"{where(what)}: expected a list of non-empty mappings of swept keys to values, "
                          f"e.g. [{{meta.inner_lr: 0.3}}]")
    points = []
    for i, point in enumerate(raw):
        for key, value in point.items():
            value = _as_float(value) if key in space and _is_float_key(key) else value
            if key not in space:
                raise ConfigError(f"{where(what)}[{i}]: {key!r} is not a swept key; swept keys: "
                                  f"{', '.join(space)}")
            _check_values(key, [value], base, where, f"{what}[{i}].{key}")
        points.append({str(k): _as_float(v) if _is_float_key(str(k)) else v for k, v in point.items()})
    return points


def _parse_asha(raw: Any, base: dict, where: _Where) -> AshaSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where('sweep.asha')}: expected a mapping ({', '.join(ASHA_KEYS)}), got {raw!r}")
    for key in raw:
        if key not in ASHA_KEYS:
            raise ConfigError(f"{where(f'sweep.asha.{key}')}: unknown key; valid keys: {', '.join(ASHA_KEYS)}")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where('sweep.asha.enabled')}: expected true or false, got {enabled!r}")
    meta = from_dict(MetaTrainConfig, base).meta
    grace = raw.get("grace_period")
    if grace is not None:
        grace = _int(grace, "sweep.asha.grace_period", 1, where)
        if grace > meta.meta_steps:
            raise ConfigError(f"{where('sweep.asha.grace_period')}: must be <= meta.meta_steps "
                              f"({meta.meta_steps}), got {grace}")
        if grace < meta.eval_every:
            raise ConfigError(f"{where('sweep.asha.grace_period')}: must be >= meta.eval_every ({meta.eval_every}): "
                              f"the meta-val loss is first known at meta-step {meta.eval_every}, got {grace}")
    rf = raw.get("reduction_factor", 2.0)
    if not _is_number(rf) or not rf > 1:
        raise ConfigError(f"{where('sweep.asha.reduction_factor')}: expected a number > 1, got {rf!r}")
    return AshaSpec(enabled=enabled, grace_period=grace, reduction_factor=float(rf))


# --------------------------------------------------------------------------- recommender portfolio

def _parse_recommender(raw: Any, space: dict[str, ParamSpec], where: _Where) -> RecommenderSpec:
    """The shape of ``sweep.recommender``; what depends on the surrogate is checked by :func:`recommend`."""
    key = "sweep.recommender"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where(key)}: expected a mapping ({', '.join(RECOMMENDER_KEYS)}), got {raw!r}")
    for k in raw:
        if k not in RECOMMENDER_KEYS:
            raise ConfigError(f"{where(f'{key}.{k}')}: unknown key; valid keys: {', '.join(RECOMMENDER_KEYS)}")
    surrogate = raw.get("surrogate")
    if not isinstance(surrogate, str) or not surrogate.strip():
        raise ConfigError(f"{where(f'{key}.surrogate')}: required: a folder saved by `python -m jobs.recommend "
                          f"... --surrogate-dir DIR` or models:/NAME/VERSION (registered with --register NAME), "
                          f"got {surrogate!r}")
    if not surrogate.startswith("models:/") and not (Path(surrogate).expanduser() / "surrogate.json").is_file():
        raise ConfigError(f"{where(f'{key}.surrogate')}: {surrogate!r} is not a saved surrogate folder (no "
                          f"surrogate.json); save one with `python -m jobs.recommend ... --surrogate-dir DIR` "
                          f"or give models:/NAME/VERSION")
    meta = raw.get("meta_features")
    if not isinstance(meta, dict) or not meta or not all(_is_number(_as_float(v)) and math.isfinite(_as_float(v))
                                                         for v in meta.values()):
        raise ConfigError(f"{where(f'{key}.meta_features')}: expected a mapping of meta-feature names to finite "
                          f"numbers, e.g. {{num_samples: 5000}}, got {meta!r}")
    params = _flatten_space(raw["params"]) if isinstance(raw.get("params"), dict) else None
    if not params or not all(isinstance(v, str) for v in params.values()):
        raise ConfigError(f"{where(f'{key}.params')}: expected a mapping of swept keys to the surrogate's "
                          f"configuration names, e.g. {{meta.inner_lr: lr}}, got {raw.get('params')!r}")
    for k, name in params.items():
        if k not in space:
            raise ConfigError(f"{where(f'{key}.params.{k}')}: {k!r} is not a swept key; swept keys: "
                              f"{', '.join(space)}")
        if list(params.values()).count(name) > 1:
            raise ConfigError(f"{where(f'{key}.params.{k}')}: configuration name {name!r} is mapped from more "
                              f"than one swept key")
    fixed = raw.get("fixed", {}) or {}
    if not isinstance(fixed, dict) or not all(isinstance(v, (int, float, str)) for v in fixed.values()):
        raise ConfigError(f"{where(f'{key}.fixed')}: expected a mapping of configuration names to numbers or "
                          f"strings, e.g. {{rank: 8}}, got {fixed!r}")
    top_k = _int(raw.get("top_k", 4), f"{key}.top_k", 1, where)
    candidates = _int(raw.get("candidates", 64), f"{key}.candidates", 1, where)
    if candidates < top_k:
        raise ConfigError(f"{where(f'{key}.candidates')}: must be >= top_k ({top_k}): the portfolio is picked "
                          f"among the sampled candidates, got {candidates}")
    cost_aware = raw.get("cost_aware", False)
    if not isinstance(cost_aware, bool):
        raise ConfigError(f"{where(f'{key}.cost_aware')}: expected true or false, got {cost_aware!r}")
    return RecommenderSpec(surrogate=surrogate, meta_features={str(k): float(_as_float(v)) for k, v in meta.items()},
                           params=params, fixed={str(k): _as_float(v) for k, v in fixed.items()},
                           candidates=candidates, top_k=top_k, cost_aware=cost_aware)


def _load_recommender(surrogate: str, where: _Where, uri: str | None):
    from metaprep.transfer.recommender import Recommender

    try:
        if not surrogate.startswith("models:/"):
            return Recommender.load(Path(surrogate).expanduser())
        import tempfile

        from metaprep.registry.tracking import tracking_uri
        from metaprep.transfer.registry import download_surrogate

        with tempfile.TemporaryDirectory() as tmp:  # Recommender.load reads everything into memory
            return Recommender.load(download_surrogate(surrogate, tmp, tracking_uri(uri)))
    except (ModelLoadError, RegistryError) as exc:
        raise ConfigError(f"{where('sweep.recommender.surrogate')}: {exc}") from None


def recommend(rec: RecommenderSpec, space: dict[str, ParamSpec], seed: int, where: _Where,
              tracking_uri: str | None = None) -> list[dict]:
    """The recommender's top-k among ``rec.candidates`` seeded samples of ``space``, in rank order
    (fewer when the samples hold fewer distinct configurations).

    Each sample of the ``params`` keys becomes a surrogate configuration (keys renamed, ``fixed``
    added) and :meth:`~metaprep.transfer.recommender.Recommender.rank` picks the best-of-k portfolio
    for ``rec.meta_features`` by transfer alone (Strangmann et al., 2024; cost-aware as in Quick-Tune,
    Arango et al., ICLR 2024). Returns each Recommendation's fields plus ``params`` (the swept keys).
    """
    import numpy as np

    from metaprep.transfer.metadataset import config_key
    from metaprep.transfer.searcher import to_python

    key = "sweep.recommender"
    recommender = _load_recommender(rec.surrogate, where, tracking_uri)
    names = recommender.surrogate.encoder.config.names
    for k, name in rec.params.items():
        if name not in names:
            raise ConfigError(f"{where(f'{key}.params.{k}')}: {name!r} is not a configuration name of the "
                              f"surrogate; its names: {', '.join(names)}")
    for name in rec.fixed:
        if name not in names:
            raise ConfigError(f"{where(f'{key}.fixed.{name}')}: {name!r} is not a configuration name of the "
                              f"surrogate; its names: {', '.join(names)}")
        if name in rec.params.values():
            raise ConfigError(f"{where(f'{key}.fixed.{name}')}: {name!r} is already mapped from a swept key "
                              f"under params; hold it fixed or sweep it, not both")
    unset = [n for n in names if n not in rec.params.values() and n not in rec.fixed]
    if unset:
        raise ConfigError(f"{where(f'{key}.params')}: the surrogate's configuration names {', '.join(unset)} are "
                          f"neither mapped from a swept key under params nor held under fixed")
    expected = recommender.surrogate.meta_features
    if set(rec.meta_features) != set(expected):
        unknown = sorted(set(rec.meta_features) - set(expected))
        missing = sorted(set(expected) - set(rec.meta_features))
        what = "; ".join(([f"unknown {unknown}"] if unknown else []) + ([f"missing {missing}"] if missing else []))
        raise ConfigError(f"{where(f'{key}.meta_features')}: {what}; the surrogate expects exactly "
                          f"{', '.join(expected)}")

    rng = np.random.default_rng([seed, 1])  # a stream apart from the searcher's own fallback samples
    domains = {k: space[k].to_tune() for k in rec.params}
    points: dict[str, dict] = {}  # surrogate configuration -> its swept point, duplicates dropped
    configs = []
    for _ in range(rec.candidates):
        point = {k: to_python(d.sample(random_state=rng)) for k, d in domains.items()}
        config = {**rec.fixed, **{rec.params[k]: v for k, v in point.items()}}
        if points.setdefault(config_key(config), point) is point:
            configs.append(config)
    try:
        picks = recommender.rank(rec.meta_features, configs, k=rec.top_k, cost_aware=rec.cost_aware)
    except ConfigError as exc:  # cost-aware ranking with a surrogate fitted without costs
        raise ConfigError(f"{where(f'{key}.cost_aware')}: {exc}") from None
    return [{**r.to_dict(), "params": points[config_key(r.config)]} for r in picks]
