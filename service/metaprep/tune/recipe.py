"""Reading a sweep recipe: the base configuration and its validated ``sweep:`` section.

The section's format is documented in :mod:`metaprep.tune.space`. Parsing validates every key against
the base recipe (types, ranges, swept keys, ASHA against the meta-val schedule) and builds the
:class:`~metaprep.tune.space.SweepSpec`; it loads no model. Every error is a
:class:`~metaprep.errors.ConfigError` naming ``file:line`` and the ``sweep.`` key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

from metaprep.config import MetaTrainConfig, apply_overrides, from_dict, load_yaml
from metaprep.errors import ConfigError
from metaprep.tune.space import (
    ASHA_KEYS,
    DEFAULT_SWEEP,
    FORBIDDEN_KEYS,
    FORBIDDEN_PREFIXES,
    KINDS,
    METRIC,
    RECOMMENDER_KEYS,
    SEARCHERS,
    SWEEP_KEYS,
    AshaSpec,
    ParamSpec,
    RecommenderSpec,
    SweepSpec,
    Where,
    apply_params,
    is_number,
)


def load_sweep_recipe(path: str | Path, overrides: list[str] | None = None,
                      num_samples: int | None = None) -> tuple[MetaTrainConfig, dict, SweepSpec]:
    """Read a recipe with an optional ``sweep:`` section.

    Returns the validated base configuration, the nested base recipe (what trials start from) and
    the sweep spec (:data:`~metaprep.tune.space.DEFAULT_SWEEP` when the recipe has none).
    ``--set sweep.KEY=VALUE`` overrides reach the sweep section like any other key.
    """
    data, lines = load_yaml(path)
    data = apply_overrides(data, list(overrides or []))
    raw_sweep = data.pop("sweep", None)
    cfg = from_dict(MetaTrainConfig, data, str(path), lines).validate()
    base = dataclasses.asdict(cfg)
    if num_samples is not None:
        raw_sweep = copy.deepcopy(DEFAULT_SWEEP) if raw_sweep is None else raw_sweep
        if isinstance(raw_sweep, dict):  # otherwise parse_sweep reports the malformed section
            raw_sweep = {**raw_sweep, "num_samples": num_samples}
    spec = parse_sweep(raw_sweep, base, str(path), lines)
    if spec.asha.enabled and cfg.meta.eval_every >= cfg.meta.meta_steps:
        spec.asha.enabled = False
        spec.asha.off_reason = (f"meta.eval_every ({cfg.meta.eval_every}) >= meta.meta_steps ({cfg.meta.meta_steps}): "
                                f"the meta-val loss is first known at the last step, so there is nothing to stop "
                                f"trials on early; set meta.eval_every below meta.meta_steps to let ASHA stop poor "
                                f"trials")
    return cfg, base, spec


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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_sweep(raw: Any, base: dict, source: str = "<recipe>", lines: dict[str, int] | None = None) -> SweepSpec:
    """Validate a ``sweep:`` mapping (``None``: :data:`DEFAULT_SWEEP`) against the base recipe ``base``.

    A ``recommender`` block is validated, not ranked: see :func:`metaprep.tune.portfolio.resolve_initial_points`.
    """
    where = Where(source, lines)
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
    recommender = _parse_recommender(raw["recommender"], space, where) if has_recommender else None
    return SweepSpec(space=space, num_samples=num_samples, searcher=searcher, seed=seed,
                     max_concurrent=max_concurrent, initial=initial, portfolio=portfolio, asha=asha,
                     recommender=recommender, where=where)


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


def _int(value: Any, key: str, low: int, where: Where) -> int:
    if not _is_int(value) or value < low:
        raise ConfigError(f"{where(key)}: expected an integer >= {low}, got {value!r}")
    return value


def _check_values(key: str, values: list, base: dict, where: Where, what: str) -> None:
    """Each value must pass the recipe's own type and range validation at ``key``."""
    for v in values:
        try:
            from_dict(MetaTrainConfig, apply_params(base, {key: v})).validate()
        except ConfigError as exc:
            msg = str(exc).removeprefix("<config>: ")
            raise ConfigError(f"{where(what)}: value {v!r} is not valid for {key} ({msg})") from None


def _parse_param(key: str, spec: Any, base: dict, where: Where) -> ParamSpec:
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
        if len(args) != 2 or not all(is_number(a) for a in args):
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


def _points(raw: Any, what: str, space: dict[str, ParamSpec], base: dict, where: Where) -> list[dict]:
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


def _parse_asha(raw: Any, base: dict, where: Where) -> AshaSpec:
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
    if not is_number(rf) or not rf > 1:
        raise ConfigError(f"{where('sweep.asha.reduction_factor')}: expected a number > 1, got {rf!r}")
    return AshaSpec(enabled=enabled, grace_period=grace, reduction_factor=float(rf),
                    off_reason=None if enabled else "sweep.asha.enabled is false in the recipe")


def _parse_recommender(raw: Any, space: dict[str, ParamSpec], where: Where) -> RecommenderSpec:
    """The shape of ``sweep.recommender``; what depends on the surrogate is checked when the portfolio is ranked
    (:func:`metaprep.tune.portfolio.resolve_initial_points`)."""
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
    if not isinstance(meta, dict) or not meta or not all(is_number(_as_float(v)) and math.isfinite(_as_float(v))
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
