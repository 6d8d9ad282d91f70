"""The zero-shot defaults a recommender must beat: the configuration best on average over the training datasets.

Every dataset has its own candidate pool (Quick-Tune: disjoint pools; NMTLC: pools that overlap only
partly), so "the configuration that is best on average" is defined over the *new* dataset's candidates:
each candidate x is looked up in each training dataset d as its nearest configuration NN_d(x) (Euclidean
distance in the standardised configuration encoding of :mod:`metaprep.transfer.features`, fitted on the
training configurations; an exact match where the pools overlap). Then

- **best default**: candidates ordered by the mean over d of the min-max normalised performance of
  NN_d(x); its first pick is "the best default";
- **average rank**: ordered by the mean over d of the rank quantile of NN_d(x) within pool d (the
  zero-shot average-rank portfolio of Wistuba et al., 2015).

Ties are broken by the other score. Used by the ``config_transfer`` benchmark as baselines and by
:mod:`metaprep.transfer.guard`, which puts the best default first where the surrogate's own held-out picks
lose to it.
"""

from __future__ import annotations

import numpy as np

from metaprep.transfer.features import DictEncoder
from metaprep.transfer.metadataset import Pool, config_key
from metaprep.transfer.surrogate import minmax


def normalized_regret(perf: np.ndarray, order: list[int] | np.ndarray, k: int) -> float:
    """``(max y - max of the first k picks) / (max y - min y)``; 0 for a constant pool (0 = the pool's best
    configuration among the first k picks, 1 = the best of them is the pool's worst)."""
    lo, hi = float(np.min(perf)), float(np.max(perf))
    if hi - lo <= 0:
        return 0.0
    return (hi - float(np.max(perf[np.asarray(order[:k], dtype=int)]))) / (hi - lo)


def rank_quantile(values: np.ndarray) -> np.ndarray:
    """Rank of each value scaled to [0, 1] (0 = worst, 1 = best), ties sharing their average rank."""
    n = len(values)
    ranks = np.empty(n)
    ranks[np.argsort(values, kind="stable")] = np.arange(n)
    _, inverse = np.unique(values, return_inverse=True)
    ranks = (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]
    return ranks / max(n - 1, 1)


def default_scores(train: list[Pool], candidates: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate: the mean normalised performance and the mean rank quantile of its nearest configuration
    in each training pool (module docstring). Equally near configurations are taken in ``config_key`` order,
    so the answer does not depend on the order a pool lists its runs in."""
    encoder = DictEncoder().fit([c for p in train for c in p.configs])
    xt = encoder.transform(candidates)
    perf = np.zeros(len(xt))
    rank = np.zeros(len(xt))
    for pool in train:
        keyed = sorted(range(len(pool.configs)), key=lambda i: config_key(pool.configs[i]))
        xd = encoder.transform([pool.configs[i] for i in keyed])
        d2 = (xt ** 2).sum(1)[:, None] + (xd ** 2).sum(1)[None, :] - 2 * xt @ xd.T
        nn = np.asarray(keyed)[np.argmin(d2, axis=1)]
        perf += minmax(pool.performance)[nn]
        rank += rank_quantile(pool.performance)[nn]
    return perf / len(train), rank / len(train)


def order_by(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Indices by ``primary`` descending, ties by ``secondary`` descending."""
    return np.lexsort((-secondary, -primary))


def best_default_order(train: list[Pool], candidates: list[dict]) -> np.ndarray:
    """``candidates`` ordered best default first (module docstring)."""
    perf, rank = default_scores(train, candidates)
    return order_by(perf, rank)
