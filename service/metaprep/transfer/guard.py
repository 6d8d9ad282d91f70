"""Where to trust the surrogate's first pick: a local, cross-validated choice against the best default.

A transfer surrogate extrapolates where a new dataset's meta-features sit away from most training
datasets, and there a plain default is often the safer first pick. On NMTLC, for instance, the
surrogate's first pick beats the best default on six of eight held-out datasets and loses badly on the
two robust19 ones, whose dataset sizes are ten times any other's. Strangmann et al. (2024) and
Quick-Tune (Arango et al., ICLR 2024) always trust the surrogate. The guard learns *where* the default
wins, from the training datasets alone:

1. **Held-out evidence.** The training datasets with two or more distinct results are split into
   ``K = min(folds, D)`` groups (one dataset per group when ``D <= folds``: leave-one-dataset-out).
   For each held-out dataset d, a surrogate fitted on the other groups (same settings and seed as the
   recommender's own) gives its first pick, and the other groups give their best default
   (:mod:`metaprep.transfer.defaults`). Both are scored by normalised regret@1 on d's pool:
   ``r_s(d)`` and ``r_0(d)``.
2. **Local estimate.** For a new dataset with meta-features m, the expected gain of the default is the
   kernel-weighted mean (Nadaraya-Watson) ``delta(m) = sum_d w_d (r_s(d) - r_0(d)) / sum_d w_d``,
   ``w_d = exp(-|z(m) - z(d)|^2 / 2h^2)``, with z the surrogate's standardised meta-feature encoding
   and the bandwidth h the median, over the held-out datasets, of the (non-zero) distance to the
   nearest other one (the data's own spacing; nothing is tuned; 1 when every distance is 0). Far from
   every training dataset the weights go to the nearest ones.
3. **Self-check.** The rule of step 2 is itself cross-validated on the same evidence, at no extra fit:
   each held-out dataset is decided from the *other* held-out datasets only, and the guard is on only
   if those decisions have a lower mean regret@1 than always trusting the surrogate. Where the evidence
   is too noisy to place the surrogate's failures, the guard switches itself off and says so.
4. **Decision.** With the guard on, the best default is the first pick where ``delta(m) > 0``, the
   surrogate's otherwise; the rest of the portfolio is the surrogate's best-of-k given that first pick
   (:meth:`metaprep.transfer.recommender.Recommender.rank`). Cost-aware ranking is not guarded: the
   evidence compares performance only.

The cost is K more surrogate fits (performance ensembles only) when a recommender is fitted. Saved next
to the surrogate as ``guard.json`` (plain JSON).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaprep.errors import ConfigError, ModelLoadError
from metaprep.jsonio import is_finite_number, read_json
from metaprep.transfer.defaults import best_default_order, normalized_regret
from metaprep.transfer.features import DictEncoder
from metaprep.transfer.metadataset import Pool

GUARD_FILE = "guard.json"
GUARD_VERSION = 1
GUARD_FOLDS = 8  # leave-one-dataset-out up to 8 evaluable training datasets, 8 groups beyond
PICKS = ("surrogate", "best_default")
TIE = 1e-9  # the rule must lower the held-out mean regret by more than this to be used


def evaluable(pool: Pool) -> bool:
    """A pool where a first pick can be scored: two or more configurations, not all equally good."""
    return len(pool.configs) >= 2 and float(np.ptp(pool.performance)) > 0


@dataclass
class HeldOut:
    """One training dataset's held-out evidence (module docstring, 1)."""

    dataset: str
    meta_features: dict[str, float]
    regret_surrogate: float
    regret_default: float


@dataclass
class GuardDecision:
    """The first pick's source for one new dataset and the evidence behind it."""

    pick: str  # one of PICKS
    delta: float  # expected regret@1 of the surrogate's pick minus the default's (> 0: the default is better)
    neighbours: list[dict]  # the held-out datasets with the largest weights: name, weight, both regrets
    same_as_surrogate: bool = False  # the best default is also the surrogate's first pick among these candidates
    check: dict | None = None  # the self-check (module docstring, 3): mean regret@1 per rule and whether it is on

    def reason(self) -> str:
        if self.check is not None and not self.check["active"]:
            return (f"first pick: the surrogate's (the guard is off: on the training datasets, held out in turn, "
                    f"choosing by the nearest datasets' evidence gave mean normalised regret@1 "
                    f"{self.check['guarded']:.3f}, always the surrogate {self.check['surrogate']:.3f})")
        near = ", ".join(f"{n['dataset']} (weight {n['weight']:.2f}: surrogate {n['regret_surrogate']:.3f}, "
                         f"default {n['regret_default']:.3f})" for n in self.neighbours)
        who = "the best default" if self.pick == "best_default" else "the surrogate's pick"
        if self.pick == "best_default" and self.same_as_surrogate:
            who += " (here also the surrogate's own first pick)"
        than = f"{abs(self.delta):.3f} {'more' if self.delta > 0 else 'less'}"
        return (f"first pick: {who}. On the training datasets most like this one, held out in turn, the surrogate's "
                f"first pick had {than} normalised regret than the best default's (weighted by similarity): {near}")


class DefaultGuard:
    """Held-out regrets of the surrogate's and the default's first picks, and the local rule over them."""

    def __init__(self, records: list[HeldOut], bandwidth: float, folds: int):
        self.records = records
        self.bandwidth = bandwidth
        self.folds = folds

    @classmethod
    def fit(cls, pools: list[Pool], fit_surrogate, encoder: DictEncoder, *, folds: int = GUARD_FOLDS,
            seed: int = 0) -> DefaultGuard | None:
        """Cross-validate over ``pools`` (module docstring, 1). ``fit_surrogate(pools)`` returns a fitted
        :class:`~metaprep.transfer.surrogate.TransferSurrogate`; ``encoder``: the recommender's meta-feature
        encoder. None when fewer than two datasets can be held out."""
        if folds == 1 or folds < 0:
            raise ConfigError(f"guard folds must be 0 (no guard) or >= 2, got {folds}")
        names = sorted(p.dataset for p in pools if evaluable(p))
        if len(names) < 2 or folds == 0:
            return None
        np.random.default_rng(seed).shuffle(names)
        k = min(folds, len(names))
        by_name = {p.dataset: p for p in pools}
        records = []
        for f in range(k):
            held = set(names[f::k])
            train = [p for p in pools if p.dataset not in held]
            surrogate = fit_surrogate(train)
            for name in sorted(held):
                pool = by_name[name]
                mean = surrogate.predict_members(pool.configs, pool.meta_features).mean(0)
                default = int(best_default_order(train, pool.configs)[0])
                records.append(HeldOut(name, dict(pool.meta_features),
                                       normalized_regret(pool.performance, [int(np.argmax(mean))], 1),
                                       normalized_regret(pool.performance, [default], 1)))
        z = encoder.transform([r.meta_features for r in records])
        d = np.linalg.norm(z[:, None] - z[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        nearest = d.min(1)
        positive = nearest[np.isfinite(nearest) & (nearest > 0)]
        bandwidth = float(np.median(positive)) if len(positive) else 1.0
        return cls(records, bandwidth, k)

    def _weights(self, z: np.ndarray, zd: np.ndarray, exclude: int | None = None) -> np.ndarray:
        """Normalised kernel weights of the held-out datasets ``zd`` for a dataset at ``z`` (module docstring, 2)."""
        logw = -((zd - z) ** 2).sum(1) / (2 * self.bandwidth ** 2)
        if exclude is not None:
            logw[exclude] = -np.inf
        w = np.exp(logw - logw.max())  # far from every dataset, the nearest ones keep the weight
        return w / w.sum()

    def self_check(self, encoder: DictEncoder) -> dict:
        """Mean regret@1 over the held-out datasets of always the surrogate, always the default, and the rule
        deciding each from the others; ``active``: the rule beats always the surrogate (module docstring, 3)."""
        zd = encoder.transform([r.meta_features for r in self.records])
        gaps = np.array([r.regret_surrogate - r.regret_default for r in self.records])
        guarded = [r.regret_default if float(self._weights(zd[i], zd, exclude=i) @ gaps) > 0 else r.regret_surrogate
                   for i, r in enumerate(self.records)]
        surrogate = float(np.mean([r.regret_surrogate for r in self.records]))
        check = {"surrogate": surrogate, "default": float(np.mean([r.regret_default for r in self.records])),
                 "guarded": float(np.mean(guarded))}
        return {**check, "active": check["guarded"] < surrogate - TIE}

    def decide(self, meta: dict[str, float], encoder: DictEncoder, *, show: int = 3) -> GuardDecision:
        """Which first pick to trust for a dataset with meta-features ``meta`` (module docstring, 2-4)."""
        zd = encoder.transform([r.meta_features for r in self.records])
        w = self._weights(encoder.transform([meta])[0], zd)
        gaps = np.array([r.regret_surrogate - r.regret_default for r in self.records])
        delta = float(w @ gaps)
        top = np.argsort(-w, kind="stable")[:show]
        neighbours = [{"dataset": self.records[i].dataset, "weight": float(w[i]),
                       "regret_surrogate": self.records[i].regret_surrogate,
                       "regret_default": self.records[i].regret_default} for i in top]
        check = self.self_check(encoder)
        pick = PICKS[1] if check["active"] and delta > 0 else PICKS[0]
        return GuardDecision(pick, delta, neighbours, check=check)

    # ------------------------------------------------------------------------------------ save/load
    def to_dict(self) -> dict:
        return {"kind": "default_guard", "format_version": GUARD_VERSION, "bandwidth": self.bandwidth,
                "folds": self.folds,
                "held_out": [{"dataset": r.dataset, "meta_features": r.meta_features,
                              "regret_surrogate": r.regret_surrogate, "regret_default": r.regret_default}
                             for r in self.records]}

    @classmethod
    def load(cls, path: Path, meta_features: list[str]) -> DefaultGuard:
        """The ``guard.json`` of a surrogate whose meta-features are ``meta_features``, else a one-line
        :class:`ModelLoadError` naming the field at fault."""
        data = read_json(path, "default guard", ModelLoadError)
        if not isinstance(data, dict) or data.get("kind") != "default_guard" \
                or data.get("format_version") != GUARD_VERSION:
            raise ModelLoadError(f"{path}: not a default guard of format {GUARD_VERSION} (as written by "
                                 "Recommender.save)")
        if not is_finite_number(data.get("bandwidth")) or data["bandwidth"] <= 0:
            raise ModelLoadError(f"{path}: 'bandwidth' must be a positive number")
        if not isinstance(data.get("folds"), int) or isinstance(data["folds"], bool) or data["folds"] < 2:
            raise ModelLoadError(f"{path}: 'folds' must be an integer >= 2")
        held = data.get("held_out")
        if not isinstance(held, list) or len(held) < data["folds"]:
            raise ModelLoadError(f"{path}: 'held_out' must be a list of at least 'folds' ({data['folds']}) held-out "
                                 "datasets")
        records = []
        for n, r in enumerate(held):
            where = f"{path}: held_out[{n}]"
            if not isinstance(r, dict) or not isinstance(r.get("dataset"), str):
                raise ModelLoadError(f"{where}: must be an object with a string 'dataset'")
            meta = r.get("meta_features")
            if not isinstance(meta, dict) or sorted(meta) != sorted(meta_features) \
                    or not all(is_finite_number(v) for v in meta.values()):
                raise ModelLoadError(f"{where}: 'meta_features' must map exactly {sorted(meta_features)} to finite "
                                     "numbers")
            for key in ("regret_surrogate", "regret_default"):
                if not is_finite_number(r.get(key)) or not 0 <= r[key] <= 1:
                    raise ModelLoadError(f"{where}: {key!r} must be a number in [0, 1]")
            if any(h.dataset == r["dataset"] for h in records):
                raise ModelLoadError(f"{where}: dataset {r['dataset']!r} is held out twice")
            records.append(HeldOut(r["dataset"], {str(k): float(v) for k, v in meta.items()},
                                   float(r["regret_surrogate"]), float(r["regret_default"])))
        return cls(records, float(data["bandwidth"]), data["folds"])


