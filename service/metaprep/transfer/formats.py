"""Readers of meta-dataset formats; each returns a :class:`~metaprep.transfer.metadataset.MetaDataset`
whose :class:`~metaprep.transfer.metadataset.Metric` says how to report ``performance`` in the metric's own
units (NMTLC: perplexity; Quick-Tune: accuracy in %; generic: the ``performance`` column, or the ``loss``
column when every row gives a loss; MLflow adapt runs: ``final_query_loss``).

- **NMTLC JSONL** (``read_nmtlc``): one run per line with ``task``, ``dataset_name``, ``basemodel``,
  ``hyperparams``, ``perplexity_curve``, ``perplexity_optimal``, ``max_len``. A *dataset* is a
  ``dataset_name`` (a language pair / corpus; every one has 36-420 distinct configurations). A
  *configuration* is ``basemodel`` (categorical: ``scratch``, ``bloomz``, ``xglm``) plus every
  hyperparameter except ``dataset_size``; ``dataset_size`` and ``max_len`` are properties of the
  corpus and become the meta-features. Performance is ``-ln(perplexity_optimal)`` (the negated best
  validation cross-entropy in nats/token); the curve is ``-ln`` of the perplexity curve. NMTLC
  records no cost, so ``cost`` is ``None``. Repeated runs of one configuration are kept as rows; the
  per-dataset candidate pool (:meth:`MetaDataset.pools`) averages them.
- **Quick-Tune folder** (``read_quicktune``): ``table.csv`` (one row per configuration id, one-hot
  ``cat:NAME:VALUE`` columns are folded back into one categorical ``NAME``), ``perf.json`` and
  ``cost.json`` (``{dataset: {config_id: [per-epoch value]}}``), ``descriptors.json``
  (``{dataset: [n_samples, n_classes, resolution, channels]}``). Performance is the best validation
  top-1 accuracy (%) of the run's curve (many runs stop after one epoch; the best point is what a
  user would keep). Cost is the run's total seconds: the shared copy stores *per-epoch* seconds
  (non-monotone lists), which are summed; lists that are non-decreasing everywhere in a dataset are
  read as cumulative and their last value is taken.
- **Generic CSV / JSONL** (``read_generic``), one run per row / line:

  ============================  ==========================================================
  column / key                  meaning
  ============================  ==========================================================
  ``dataset`` (required)        dataset (task) id; rows with the same id share a pool
  ``config.NAME``               one hyperparameter; numbers are numeric, anything else is
                                categorical; an empty CSV cell means "not set"
  ``meta.NAME``                 a numeric meta-feature, constant within a dataset
                                (``meta_feature.NAME`` is accepted as well)
  ``performance``               final score, **higher is better**
  ``loss``                      instead of ``performance``: lower is better (negated on read;
                                ``curve`` then holds losses too)
  ``curve`` (optional)          JSON list of per-step values in the same orientation; when no
                                ``performance``/``loss`` is given, its best point is used
  ``cost`` (optional)           seconds the run took (for the cost surrogate)
  ============================  ==========================================================

  In JSONL, ``config`` and ``meta_features`` (or ``meta``) may also be nested objects.
- **MLflow adapt runs** (``read_mlflow_adapt_runs``): the service's own ``jobs.adapt`` runs in a
  tracking store, every FINISHED run of the experiment (default ``metaprep-adapt``) with ``config.*``
  params, read against the contract of :mod:`metaprep.registry.adapt_runs` (``config.*``,
  ``meta_feature.*``, ``task``, metrics ``query_loss`` per step, ``final_query_loss``, ``cost_s``).
  The dataset id is the run's task (else a hash of the meta-features). Performance is
  ``-final_query_loss`` (``-`` last ``query_loss`` when the final metric is missing); the curve is
  ``-query_loss``.
  ``load_metadataset`` accepts ``mlflow:<tracking-uri>[#experiment]`` or a bare ``sqlite:``/
  ``http(s):`` tracking URI.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path
from typing import Any

from metaprep.errors import DataError
from metaprep.jsonio import decode_utf8, read_bytes, read_json, read_jsonl
from metaprep.registry.adapt_runs import ADAPT_EXPERIMENT, META_FEATURE, AdaptRun, read_adapt_runs
from metaprep.transfer.metadataset import GENERIC_METRIC, ConfigValue, MetaDataset, MetaRow, Metric

NMTLC_KEYS = ("dataset_name", "hyperparams", "perplexity_curve")
QUICKTUNE_FILES = ("table.csv", "perf.json", "cost.json", "descriptors.json")
QUICKTUNE_META = ("num_samples", "num_classes", "resolution", "num_channels")
NMTLC_METRIC = Metric("perplexity", "best validation perplexity (exp of the cross-entropy in nats/token); "
                      "lower is better", higher_is_better=False, transform="exp_neg")
QUICKTUNE_METRIC = Metric("accuracy_pct", "best validation top-1 accuracy in percent (0-100); higher is better")
GENERIC_LOSS_METRIC = Metric("loss", "the meta-dataset's loss column; lower is better", higher_is_better=False,
                             transform="negate")
ADAPT_METRIC = Metric("final_query_loss", "the adapt run's final query loss; lower is better",
                      higher_is_better=False, transform="negate")
GENERIC_EXPECTED = ("expected columns: dataset, config.NAME..., meta.NAME..., performance (or loss "
                    "or curve), optional cost")


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not a number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line errors."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _config_value(value: Any) -> ConfigValue:
    number = _number(value)
    if number is not None:
        return number
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _curve(values: Any, where: str, key: str) -> list[float]:
    if not isinstance(values, list) or not values:
        raise DataError(f"{where}: {key!r} must be a non-empty list of numbers")
    out = [_number(v) for v in values]
    if any(v is None for v in out):
        raise DataError(f"{where}: {key!r} holds a non-numeric or non-finite value")
    return out  # type: ignore[return-value]


def read_nmtlc(path: str | Path) -> MetaDataset:
    """NMTLC JSONL (see the module docstring for what a dataset and a configuration are)."""
    path = Path(path)
    rows = []
    for lineno, obj in read_jsonl(path, "meta-dataset file"):
        where = f"{path}:{lineno}"
        missing = [k for k in NMTLC_KEYS if k not in obj]
        if missing:
            raise DataError(f"{where}: missing key {missing[0]!r} (an NMTLC line has {', '.join(NMTLC_KEYS)})")
        hp = obj["hyperparams"]
        if not isinstance(hp, dict) or "dataset_size" not in hp:
            raise DataError(f"{where}: 'hyperparams' must be an object with 'dataset_size'")
        ppl = _curve(obj["perplexity_curve"], where, "perplexity_curve")
        best = _number(obj.get("perplexity_optimal", min(ppl)))
        if best is None or best <= 0 or min(ppl) <= 0:
            raise DataError(f"{where}: perplexities must be positive numbers")
        config: dict[str, ConfigValue] = {"basemodel": str(obj.get("basemodel", "scratch"))}
        config.update({k: _config_value(v) for k, v in hp.items() if k != "dataset_size"})
        size = _number(hp["dataset_size"])
        max_len = _number(obj.get("max_len", 0))
        if size is None or max_len is None:
            raise DataError(f"{where}: 'dataset_size' and 'max_len' must be numbers")
        rows.append(MetaRow(
            dataset=str(obj["dataset_name"]),
            meta_features={"dataset_size": size, "max_len": max_len},
            config=config,
            performance=-math.log(best),
            curve=tuple(-math.log(p) for p in ppl),
            source=where,
        ))
    return MetaDataset(rows, path.name, "nmtlc", "-ln(best validation perplexity)", NMTLC_METRIC)


QUICKTUNE_SHAPES = {"perf.json": "{dataset: {config_id: [per-epoch values]}}",
                    "cost.json": "{dataset: {config_id: [per-epoch seconds]}}",
                    "descriptors.json": f"{{dataset: [{', '.join(QUICKTUNE_META)}]}}"}


def _quicktune_missing(path: Path) -> DataError:
    return DataError(f"{path}: missing (a Quick-Tune folder has {', '.join(QUICKTUNE_FILES)})")


def _load_json(path: Path) -> dict:
    """One JSON file of a Quick-Tune folder: an object of the shape in :data:`QUICKTUNE_SHAPES`."""
    if not path.exists():
        raise _quicktune_missing(path)
    data = read_json(path, "Quick-Tune file")
    if not isinstance(data, dict):
        raise DataError(f"{path}: must be a JSON object {QUICKTUNE_SHAPES[path.name]}, got {type(data).__name__}")
    return data


def _read_table(path: Path) -> dict[str, dict[str, ConfigValue]]:
    """``table.csv``: configuration id -> configuration (one-hot ``cat:NAME:VALUE`` columns folded back)."""
    if not path.exists():
        raise _quicktune_missing(path)
    reader = csv.reader(io.StringIO(decode_utf8(read_bytes(path, "Quick-Tune table"), str(path)), newline=""))
    try:
        header = next(reader, None)
        rows = list(enumerate(reader, start=2))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    if not header or len(header) < 2:
        raise DataError(f"{path}:1: header must be an id column followed by hyperparameter columns")
    for name in header[1:]:
        if name.startswith("cat:") and (name.count(":") < 2 or not name.split(":", 2)[1]):
            raise DataError(f"{path}:1: column {name!r}: one-hot columns are named cat:NAME:VALUE")
    return {values[0]: _table_row(header, values, f"{path}:{lineno}") for lineno, values in rows}


def _table_row(header: list[str], values: list[str], where: str) -> dict[str, ConfigValue]:
    if len(values) != len(header):
        raise DataError(f"{where}: {len(values)} cells, header has {len(header)}")
    config: dict[str, ConfigValue] = {}
    for name, value in zip(header[1:], values[1:], strict=True):
        if name.startswith("cat:"):
            _, hp, choice = name.split(":", 2)
            if _number(value) == 1.0:
                config[hp] = choice
            continue
        number = _number(value)
        if number is None:
            raise DataError(f"{where}: column {name!r} is {value!r}, a number is expected")
        config[name] = number
    return config


def _descriptors(desc: dict, dataset: str, path: Path) -> dict[str, float]:
    """The meta-features of ``dataset`` from ``descriptors.json``."""
    values = desc.get(dataset)
    numbers = [_number(v) for v in values] if isinstance(values, list) else []
    if len(numbers) != len(QUICKTUNE_META) or any(n is None for n in numbers):
        raise DataError(f"{path}: dataset {dataset!r} needs [{', '.join(QUICKTUNE_META)}] (numbers), "
                        f"got {_short(values)}")
    return dict(zip(QUICKTUNE_META, numbers, strict=True))  # type: ignore[arg-type]


def _run_costs(cost: dict, dataset: str, path: Path) -> dict[str, float]:
    """Total seconds per configuration id of ``dataset`` (see the module docstring: per-epoch or cumulative)."""
    runs = cost.get(dataset, {})
    if not isinstance(runs, dict):
        raise DataError(f"{path}: {dataset!r} must be an object {{config_id: [per-epoch seconds]}}")
    lists = {}
    for cid, values in runs.items():
        seconds = [_number(v) for v in values] if isinstance(values, list) else [None]
        if any(v is None or v < 0 for v in seconds):
            raise DataError(f"{path}: {dataset}/{cid}: costs must be a list of non-negative numbers of seconds, "
                            f"got {_short(values)}")
        if seconds:
            lists[cid] = seconds
    multi = [c for c in lists.values() if len(c) > 1]
    cumulative = bool(multi) and all(all(b >= a for a, b in pairwise(c)) for c in multi)
    return {cid: c[-1] if cumulative else sum(c) for cid, c in lists.items()}


def read_quicktune(folder: str | Path) -> MetaDataset:
    """The Quick-Tune meta-dataset folder (see the module docstring)."""
    folder = Path(folder)
    configs = _read_table(folder / "table.csv")
    perf = _load_json(folder / "perf.json")
    cost = _load_json(folder / "cost.json")
    desc = _load_json(folder / "descriptors.json")
    rows = []
    for ds, curves in perf.items():
        is_runs = isinstance(curves, dict) and all(isinstance(v, list) for v in curves.values())
        if not is_runs and ds not in desc:
            continue  # e.g. the "info" entry describing the set
        if not isinstance(curves, dict):
            raise DataError(f"{folder / 'perf.json'}: {ds!r} must be an object {{config_id: [per-epoch values]}}")
        meta = _descriptors(desc, ds, folder / "descriptors.json")
        totals = _run_costs(cost, ds, folder / "cost.json")
        for cid, values in curves.items():
            where = f"{folder / 'perf.json'}: {ds}/{cid}"
            if cid not in configs:
                raise DataError(f"{where}: configuration id not in table.csv")
            curve = _curve(values, where, "curve")
            rows.append(MetaRow(ds, meta, configs[cid], max(curve), tuple(curve), totals.get(cid), where))
    return MetaDataset(rows, folder.name, "quicktune", "best validation top-1 accuracy (%)", QUICKTUNE_METRIC)


def _split_prefixed(obj: dict, where: str) -> tuple[dict[str, ConfigValue], dict[str, float]]:
    config: dict[str, ConfigValue] = {}
    meta: dict[str, float] = {}
    nested_config = obj.get("config")
    if isinstance(nested_config, dict):
        config.update({str(k): _config_value(v) for k, v in nested_config.items() if v not in ("", None)})
    nested_meta = obj.get("meta_features", obj.get("meta"))
    raw_meta = dict(nested_meta) if isinstance(nested_meta, dict) else {}
    for key, value in obj.items():
        if key.startswith("config.") and value not in ("", None):
            config[key[len("config."):]] = _config_value(value)
        elif key.startswith("meta."):
            raw_meta[key[len("meta."):]] = value
        elif key.startswith("meta_feature."):
            raw_meta[key[len("meta_feature."):]] = value
    for name, value in raw_meta.items():
        number = _number(value)
        if number is None:
            raise DataError(f"{where}: meta-feature {name!r} is {value!r}; meta-features must be numeric")
        meta[str(name)] = number
    return config, meta


def _is_loss(obj: dict) -> bool:
    """Whether a generic row gives its score as ``loss`` (lower is better) rather than ``performance``."""
    return obj.get("performance") in (None, "") and obj.get("loss") not in (None, "")


def _generic_row(obj: dict, where: str) -> MetaRow:
    dataset = obj.get("dataset")
    if dataset in (None, ""):
        raise DataError(f"{where}: missing 'dataset'; {GENERIC_EXPECTED}")
    config, meta = _split_prefixed(obj, where)
    if not config:
        raise DataError(f"{where}: no configuration (config.NAME columns or a 'config' object); "
                        f"{GENERIC_EXPECTED}")
    sign = 1.0
    target = obj.get("performance")
    if _is_loss(obj):
        sign, target = -1.0, obj["loss"]
    curve_raw = obj.get("curve")
    if isinstance(curve_raw, str) and curve_raw.strip():
        try:
            curve_raw = json.loads(curve_raw)
        except json.JSONDecodeError:
            raise DataError(f"{where}: 'curve' must be a JSON list of numbers") from None
    curve = [sign * v for v in _curve(curve_raw, where, "curve")] if curve_raw not in (None, "") else []
    if target in (None, ""):
        if not curve:
            raise DataError(f"{where}: needs 'performance', 'loss' or 'curve'; {GENERIC_EXPECTED}")
        performance = max(curve)
    else:
        number = _number(target)
        if number is None:
            raise DataError(f"{where}: 'performance'/'loss' is {target!r}, a finite number is expected")
        performance = sign * number
    cost = None
    if obj.get("cost") not in (None, ""):
        cost = _number(obj["cost"])
        if cost is None or cost < 0:
            raise DataError(f"{where}: 'cost' is {obj['cost']!r}, a non-negative number of seconds is expected")
    return MetaRow(str(dataset), meta, config, performance, tuple(curve), cost, where)


def read_generic(path: str | Path) -> MetaDataset:
    """The documented generic format, as CSV (``.csv``) or JSONL (anything else)."""
    path = Path(path)
    rows, losses = [], []
    if path.suffix.lower() == ".csv":
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                if not reader.fieldnames or "dataset" not in reader.fieldnames:
                    raise DataError(f"{path}:1: header has no 'dataset' column; {GENERIC_EXPECTED}")
                for lineno, record in enumerate(reader, start=2):
                    if None in record:
                        raise DataError(f"{path}:{lineno}: more cells than header columns")
                    rows.append(_generic_row(record, f"{path}:{lineno}"))
                    losses.append(_is_loss(record))
        except FileNotFoundError:
            raise DataError(f"{path}: meta-dataset file not found") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
    else:
        for lineno, obj in read_jsonl(path, "meta-dataset file"):
            rows.append(_generic_row(obj, f"{path}:{lineno}"))
            losses.append(_is_loss(obj))
    if not rows:
        raise DataError(f"{path}: no runs; {GENERIC_EXPECTED}")
    # a file scored by ``loss`` throughout reports losses; any ``performance`` row keeps the oriented score
    metric = GENERIC_LOSS_METRIC if all(losses) else GENERIC_METRIC
    return MetaDataset(rows, path.name, "generic", "performance column (higher is better)", metric)


def read_mlflow_adapt_runs(tracking_uri: str, experiment: str = ADAPT_EXPERIMENT, where: str = "") -> MetaDataset:
    """The service's own adaptation runs in MLflow (:mod:`metaprep.registry.adapt_runs`), as rows (``where``: an
    MLflow search filter that selects some of them)."""
    return adapt_runs_metadataset(read_adapt_runs(tracking_uri, experiment, where), tracking_uri,
                                  f"mlflow:{experiment}",
                                  f"experiment {experiment!r} has no FINISHED run with config.* params and a "
                                  f"query_loss/final_query_loss metric" + (f" matching {where}" if where else ""))


def adapt_runs_metadataset(runs: Iterable[AdaptRun], where: str, name: str,
                           empty: str = "no adapt run with a query_loss/final_query_loss metric") -> MetaDataset:
    """Adapt runs (the contract's terms; ``where`` names their store in errors) as a meta-dataset."""
    rows = [row for run in runs if (row := _adapt_run_row(run, where)) is not None]
    if not rows:
        raise DataError(f"{where}: {empty}")
    return MetaDataset(rows, name, "mlflow", "-final_query_loss", ADAPT_METRIC)


def _adapt_run_row(run: AdaptRun, tracking_uri: str) -> MetaRow | None:
    where = f"{tracking_uri} run {run.run_id}"
    meta = {}
    for key, value in run.meta_features.items():
        number = _number(value)
        if number is None:
            raise DataError(f"{where}: {META_FEATURE}{key} is {value!r}; meta-features must be numeric")
        meta[key] = number
    curve = tuple(-loss for loss in run.curve)
    if run.final_loss is not None:
        performance = -run.final_loss
    elif curve:
        performance = curve[-1]
    else:
        return None
    dataset = run.task
    if not dataset:
        digest = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:8]
        dataset = f"mf-{digest}"
    config = {k: _config_value(v) for k, v in run.config.items()}
    return MetaRow(str(dataset), meta, config, performance, curve, run.cost_s, where)
