"""Meta-datasets of finetuning runs: rows of (dataset, meta-features, configuration, curve, cost).

A meta-dataset is what the transfer recommender learns from (Strangmann et al., 2024, §3; Quick-Tune,
Arango et al., ICLR 2024, §4): many finetuning *runs*, each a configuration tried on a dataset, with
the dataset's numeric meta-features, the run's learning curve and its cost. Every reader returns the
same :class:`MetaDataset` of :class:`MetaRow` objects, always oriented **higher is better**, so the
surrogates, the recommender and the ``config_transfer`` benchmark never care where rows came from.

Formats: :mod:`metaprep.transfer.formats` (NMTLC JSONL, Quick-Tune folders, generic CSV/JSONL, the
service's own MLflow adapt runs); :func:`load_metadataset` detects them, so a new meta-dataset in any
of them needs no code change.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from metaprep.errors import DataError
from metaprep.jsonio import read_jsonl
from metaprep.registry.adapt_runs import ADAPT_EXPERIMENT

ConfigValue = float | str

# How a reader's higher-is-better ``performance`` maps back to the metric a user reads.
METRIC_TRANSFORMS = {
    "identity": lambda p: p,
    "negate": lambda p: -p,  # a loss stored negated
    "exp_neg": lambda p: np.exp(-p),  # a perplexity stored as -ln(perplexity)
}


@dataclass(frozen=True)
class Metric:
    """The quantity a meta-dataset measures, in its own units (``performance`` is oriented for the surrogates)."""

    name: str  # short column name, e.g. "perplexity"
    meaning: str  # what a value means and which way is better, for users
    higher_is_better: bool = True
    transform: str = "identity"  # a key of METRIC_TRANSFORMS: performance -> metric

    def value(self, performance: float | np.ndarray) -> float | np.ndarray:
        """The metric in its own units of a (higher-is-better) ``performance``."""
        out = METRIC_TRANSFORMS[self.transform](np.asarray(performance, dtype=float))
        return float(out) if out.ndim == 0 else out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> Metric:
        """A metric saved by :meth:`to_dict`; ``ValueError`` naming the field that is wrong."""
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("name", "meaning")):
            raise ValueError("metric must be an object with string 'name' and 'meaning'")
        if not isinstance(data.get("higher_is_better", True), bool):
            raise ValueError("metric 'higher_is_better' must be true or false")
        if data.get("transform", "identity") not in METRIC_TRANSFORMS:
            raise ValueError(f"metric 'transform' must be one of {sorted(METRIC_TRANSFORMS)}")
        unknown = sorted(set(data) - {"name", "meaning", "higher_is_better", "transform"})
        if unknown:
            raise ValueError(f"metric: unknown fields {unknown}")
        return cls(**data)


GENERIC_METRIC = Metric("performance", "the meta-dataset's performance score; higher is better")


@dataclass(frozen=True)
class MetaRow:
    """One finetuning run. ``performance`` and ``curve`` are oriented higher-is-better."""

    dataset: str
    meta_features: dict[str, float]
    config: dict[str, ConfigValue]
    performance: float
    curve: tuple[float, ...] = ()
    cost: float | None = None  # seconds for the whole run; None where the source has none
    source: str = ""  # file:line or run id, for error messages


@dataclass
class Pool:
    """A dataset's candidate pool: its distinct configurations, repeated runs averaged."""

    dataset: str
    meta_features: dict[str, float]
    configs: list[dict[str, ConfigValue]]
    performance: np.ndarray  # (n,) mean over repeated runs, higher is better
    cost: np.ndarray  # (n,) seconds, nan where unknown
    curves: list[tuple[float, ...]]  # longest observed curve per configuration


@dataclass
class MetaDataset:
    """Rows of one meta-dataset plus where they came from and what ``performance`` means."""

    rows: list[MetaRow]
    name: str
    source_format: str
    performance_desc: str
    metric: Metric = GENERIC_METRIC  # what ``performance`` measures, in the metric's own units
    _pools: dict[str, Pool] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.rows:
            raise DataError(f"{self.name}: meta-dataset has no runs")
        seen: dict[str, MetaRow] = {}
        for row in self.rows:
            first = seen.setdefault(row.dataset, row)
            if row.meta_features.keys() != first.meta_features.keys() or any(
                not math.isclose(row.meta_features[k], first.meta_features[k], rel_tol=1e-6, abs_tol=1e-9)
                for k in row.meta_features
            ):
                raise DataError(f"{row.source}: meta-features of dataset {row.dataset!r} differ from "
                                f"{first.source} (meta-features must be constant within a dataset)")
        names = {tuple(sorted(r.meta_features)) for r in seen.values()}
        if len(names) > 1:
            raise DataError(f"{self.name}: datasets name different meta-features {sorted(names)}; "
                            "every dataset must have the same meta-feature names")

    def datasets(self) -> list[str]:
        return sorted({r.dataset for r in self.rows})

    @property
    def meta_feature_names(self) -> list[str]:
        return sorted(self.rows[0].meta_features)

    @property
    def config_names(self) -> list[str]:
        return sorted({k for r in self.rows for k in r.config})

    @property
    def has_cost(self) -> bool:
        return any(r.cost is not None for r in self.rows)

    def pools(self) -> dict[str, Pool]:
        """Per-dataset candidate pools (configurations deduplicated, sorted by dataset name)."""
        if self._pools is None:
            grouped: dict[str, dict[str, list[MetaRow]]] = defaultdict(dict)
            for row in self.rows:
                grouped[row.dataset].setdefault(config_key(row.config), []).append(row)
            pools = {}
            for ds in sorted(grouped):
                runs = list(grouped[ds].values())
                pools[ds] = Pool(
                    dataset=ds,
                    meta_features=dict(runs[0][0].meta_features),
                    configs=[dict(rs[0].config) for rs in runs],
                    performance=np.array([np.mean([r.performance for r in rs]) for rs in runs]),
                    cost=np.array([np.mean([r.cost for r in rs if r.cost is not None])
                                   if any(r.cost is not None for r in rs) else np.nan for rs in runs]),
                    curves=[max((r.curve for r in rs), key=len) for rs in runs],
                )
            self._pools = pools
        return self._pools

    def subset(self, datasets: list[str] | set[str]) -> MetaDataset:
        keep = set(datasets)
        return MetaDataset([r for r in self.rows if r.dataset in keep], self.name, self.source_format,
                           self.performance_desc, self.metric)


def config_key(config: dict[str, ConfigValue]) -> str:
    """A canonical string for a configuration (dict order and int/float spelling do not matter)."""
    return json.dumps({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in config.items()},
                      sort_keys=True)


def distinct_configs(pools: list[Pool]) -> list[dict[str, ConfigValue]]:
    """Every configuration of ``pools`` once, in order of first appearance (the default candidate pool)."""
    seen: set[str] = set()
    out = []
    for pool in pools:
        for config in pool.configs:
            key = config_key(config)
            if key not in seen:
                seen.add(key)
                out.append(config)
    return out


def load_metadataset(path: str | Path) -> MetaDataset:
    """Read a meta-dataset in any supported format, detected from the path and its content."""
    from metaprep.transfer.formats import (
        NMTLC_KEYS,
        QUICKTUNE_FILES,
        read_generic,
        read_mlflow_adapt_runs,
        read_nmtlc,
        read_quicktune,
    )

    text = str(path)
    if text.startswith("mlflow:"):
        uri, _, experiment = text[len("mlflow:"):].partition("#")
        return read_mlflow_adapt_runs(uri, experiment or ADAPT_EXPERIMENT)
    if text.startswith(("sqlite:", "http://", "https://", "databricks")):
        uri, _, experiment = text.partition("#")
        return read_mlflow_adapt_runs(uri, experiment or ADAPT_EXPERIMENT)
    p = Path(path)
    if p.is_dir():
        if (p / "table.csv").exists() and (p / "perf.json").exists():
            return read_quicktune(p)
        raise DataError(f"{p}: folder is not a Quick-Tune meta-dataset (needs {', '.join(QUICKTUNE_FILES)})")
    if not p.exists():
        raise DataError(f"{p}: meta-dataset not found (expected a .jsonl/.csv file, a Quick-Tune folder or "
                        "mlflow:<tracking-uri>)")
    if p.suffix.lower() == ".csv":
        return read_generic(p)
    first = read_jsonl(p, "meta-dataset file")[0][1]
    if all(k in first for k in NMTLC_KEYS):
        return read_nmtlc(p)
    return read_generic(p)
