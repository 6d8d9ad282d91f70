"""The training evidence behind a recommendation: the metric in its own units, the nearest training
datasets, and how far to trust the number.

The surrogate predicts performance min-max normalised inside each training dataset (1 = as good as
the best configuration of that dataset's pool, 0 = the worst; :mod:`metaprep.transfer.surrogate`).
That scale has no units: a new dataset's best and worst runs are unknown. It is mapped back by
analogy with the training datasets most like the new one:

- *nearest datasets*: the ``K`` training datasets closest to the new one in the surrogate's own
  meta-feature encoding (log-scaled where a feature spans a factor of 20 or more, standardised over
  the training datasets; :mod:`metaprep.transfer.features`), by Euclidean distance, among the
  datasets with a run of an in-scope candidate (a finetuning pick is mapped onto finetuning runs'
  range, not onto from-scratch runs');
- *prediction*: each ensemble member's prediction ``f_j``, clipped to [0, 1] (the training targets'
  range; beyond it the surrogate extrapolates past the best or worst run ever seen), is placed in
  each neighbour's observed range, ``worst_n + f_j (best_n - worst_n)``; the prediction is the mean
  of these ``M x K`` values and its uncertainty their standard deviation, which holds both the
  members' disagreement (the transfer uncertainty of a deep ensemble, Lakshminarayanan et al., 2017)
  and how much "as good as the best" differs between similar datasets;
- both are computed on the reader's higher-is-better scale and mapped to the metric's units by
  :meth:`~metaprep.transfer.metadataset.Metric.value` (NMTLC: perplexity = exp(-performance)); the
  ±1 sd band is mapped end by end, so it is asymmetric where the map is not linear.

Saved next to a surrogate as ``evidence.json`` (plain JSON; runs refer to ``candidates.json`` by index).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaprep.errors import ModelLoadError
from metaprep.jsonio import is_finite_number, read_json
from metaprep.transfer.features import DictEncoder
from metaprep.transfer.metadataset import Metric, Pool, config_key, distinct_configs

EVIDENCE_FILE = "evidence.json"
EVIDENCE_VERSION = 1
# neighbours a prediction is mapped through: one odd dataset moves the answer by a third at most, and the
# shipped meta-datasets (8 and 20 datasets) still have that many *similar* datasets to offer
NEIGHBOURS = 3


@dataclass
class DatasetRecord:
    """One training dataset as the recommender remembers it."""

    name: str
    meta_features: dict[str, float]
    performance: dict[int, float]  # candidate index -> performance, higher is better (repeated runs averaged)
    cost: dict[int, float]  # candidate index -> seconds, where the run's cost was recorded

    @property
    def worst(self) -> float:
        return min(self.performance.values())

    @property
    def best(self) -> float:
        return max(self.performance.values())


@dataclass
class Neighbour:
    dataset: DatasetRecord
    distance: float  # Euclidean, in the surrogate's encoding of the meta-features


class TrainingEvidence:
    """What each training dataset observed, indexed by candidate configuration (module docstring)."""

    def __init__(self, metric: Metric, configs: list[dict], datasets: list[DatasetRecord]):
        self.metric = metric
        self.configs = configs
        self.datasets = datasets
        self._index = {config_key(c): i for i, c in enumerate(configs)}

    @classmethod
    def from_pools(cls, pools: list[Pool], metric: Metric) -> TrainingEvidence:
        configs = distinct_configs(pools)
        index = {config_key(c): i for i, c in enumerate(configs)}
        datasets = []
        for pool in pools:
            ids = [index[config_key(c)] for c in pool.configs]
            datasets.append(DatasetRecord(
                pool.dataset, dict(pool.meta_features),
                {i: float(p) for i, p in zip(ids, pool.performance, strict=True)},
                {i: float(c) for i, c in zip(ids, pool.cost, strict=True) if np.isfinite(c)}))
        return cls(metric, configs, datasets)

    @property
    def has_cost(self) -> bool:
        return any(d.cost for d in self.datasets)

    def index(self, config: dict) -> int | None:
        """The candidate index of ``config``, None when no training dataset ran it."""
        return self._index.get(config_key(config))

    def pools(self) -> list[Pool]:
        """Each training dataset as a candidate pool (performance only: no costs or curves)."""
        out = []
        for d in self.datasets:
            ids = sorted(d.performance)
            out.append(Pool(d.name, dict(d.meta_features), [self.configs[i] for i in ids],
                            np.array([d.performance[i] for i in ids]), np.full(len(ids), np.nan), [()] * len(ids)))
        return out

    def meta_ranges(self) -> dict[str, tuple[float, float]]:
        """Each meta-feature's (min, max) over the training datasets."""
        names = sorted({k for d in self.datasets for k in d.meta_features})
        return {n: (min(d.meta_features[n] for d in self.datasets), max(d.meta_features[n] for d in self.datasets))
                for n in names}

    def nearest(self, meta: dict[str, float], encoder: DictEncoder, scope: list[dict] | None = None,
                k: int = NEIGHBOURS) -> list[Neighbour]:
        """The ``k`` training datasets nearest to ``meta`` that ran a configuration of ``scope`` (all datasets when
        none did); ``encoder``: the surrogate's meta-feature encoder."""
        ids = {self.index(c) for c in scope or []} - {None}
        eligible = [d for d in self.datasets if ids & d.performance.keys()] or self.datasets
        x = encoder.transform([meta])[0]
        dist = np.linalg.norm(encoder.transform([d.meta_features for d in eligible]) - x, axis=1)
        return [Neighbour(eligible[i], float(dist[i])) for i in np.argsort(dist, kind="stable")[:k]]

    def in_metric_units(self, members: np.ndarray, neighbours: list[Neighbour]
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prediction, band low, band high) per candidate in the metric's units, from the (M, N) normalised
        member predictions ``members`` mapped through ``neighbours`` (module docstring)."""
        worst = np.array([n.dataset.worst for n in neighbours])[:, None, None]
        best = np.array([n.dataset.best for n in neighbours])[:, None, None]
        values = worst + np.clip(members, 0.0, 1.0)[None] * (best - worst)  # (K, M, N), higher is better
        mean, sd = values.mean((0, 1)), values.std((0, 1))
        a, b = self.metric.value(mean - sd), self.metric.value(mean + sd)
        return self.metric.value(mean), np.minimum(a, b), np.maximum(a, b)

    def observed(self, dataset: DatasetRecord, config: dict) -> float | None:
        """The metric ``dataset`` observed for ``config`` (in the metric's units), None when it did not run it."""
        i = self.index(config)
        return None if i is None or i not in dataset.performance else self.metric.value(dataset.performance[i])

    def disjoint_values(self, configs: list[dict]) -> dict[str, list[list[str]]]:
        """Per categorical field of ``configs``, its values split into groups that never share a training dataset
        (only fields with two or more groups): the surrogate never saw values of different groups compared."""
        out = {}
        for name in sorted({k for c in configs for k, v in c.items() if isinstance(v, str)}):
            wanted = {c[name] for c in configs if isinstance(c.get(name), str)}
            per_dataset = [{self.configs[i].get(name) for i in d.performance} & wanted for d in self.datasets]
            groups: list[set[str]] = []
            for present in per_dataset:
                if present:
                    joined = [g for g in groups if g & present]
                    groups = [g for g in groups if not g & present] + [set().union(present, *joined)]
            if len(groups) > 1:
                out[name] = sorted(sorted(g) for g in groups)
        return out

    def to_dict(self) -> dict:
        return {"kind": "training_evidence", "format_version": EVIDENCE_VERSION, "metric": self.metric.to_dict(),
                "datasets": [{"name": d.name, "meta_features": d.meta_features,
                              "runs": [[i, p, d.cost.get(i)] for i, p in sorted(d.performance.items())]}
                             for d in self.datasets]}



def load_evidence(path: Path, configs: list[dict]) -> TrainingEvidence:
    """The ``evidence.json`` saved next to a surrogate whose ``candidates.json`` holds ``configs``, or a
    one-line :class:`ModelLoadError` naming the field at fault."""
    data = read_json(path, "training evidence", ModelLoadError)
    if not isinstance(data, dict) or data.get("kind") != "training_evidence" \
            or data.get("format_version") != EVIDENCE_VERSION:
        raise ModelLoadError(f"{path}: not training evidence of format {EVIDENCE_VERSION} (as written by "
                             "Recommender.save)")
    try:
        metric = Metric.from_dict(data.get("metric"))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    if not isinstance(data.get("datasets"), list) or not data["datasets"]:
        raise ModelLoadError(f"{path}: 'datasets' must be a non-empty list")
    datasets = []
    for n, d in enumerate(data["datasets"]):
        where = f"{path}: datasets[{n}]"
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise ModelLoadError(f"{where}: must be an object with a string 'name'")
        meta = d.get("meta_features")
        if not isinstance(meta, dict) or not all(is_finite_number(v) for v in meta.values()):
            raise ModelLoadError(f"{where}: 'meta_features' must be an object of finite numbers")
        runs = d.get("runs")
        if not isinstance(runs, list) or not runs or not all(
                isinstance(r, list) and len(r) == 3 and isinstance(r[0], int) and 0 <= r[0] < len(configs)
                and is_finite_number(r[1]) and (r[2] is None or is_finite_number(r[2])) for r in runs):
            raise ModelLoadError(f"{where}: 'runs' must be a non-empty list of [candidate index < "
                                 f"{len(configs)}, performance, seconds or null]")
        datasets.append(DatasetRecord(d["name"], {str(k): float(v) for k, v in meta.items()},
                                      {r[0]: float(r[1]) for r in runs},
                                      {r[0]: float(r[2]) for r in runs if r[2] is not None}))
    return TrainingEvidence(metric, configs, datasets)
