"""``config_transfer`` suite: zero-shot configuration transfer on a meta-dataset (DESIGN.md §4).

Protocol. Without ``--test-meta``: leave-one-dataset-out (LODO) over the training meta-dataset —
every dataset with at least two distinct configurations is the test dataset once and every method
is fitted on the others. With ``--test-meta``: fit once on the whole training meta-dataset, evaluate
on every dataset of the test meta-dataset. A method only ever sees the test dataset's meta-features
and its candidate pool (the configurations the meta-dataset evaluated on it), never a performance.

Metric. With y higher-is-better (:mod:`metaprep.transfer.metadataset`: ``-ln ppl`` for NMTLC,
top-1 % for Quick-Tune), a method returns an ordered list π of the test pool P and

    normalized_regret@k = (max_P y - max_{i<=k} y(π_i)) / (max_P y - min_P y)

(0 = it found the pool's best configuration within its first k picks, 1 = the best it found is the
pool's worst). Mean and 95 % t-interval are over test datasets x seeds (``seeds`` only for the
methods that are random: the recommender and the GP are refitted per seed; the baselines are
deterministic and counted once per dataset).

Methods.
- ``recommender``: :class:`metaprep.transfer.recommender.Recommender` (deep-ensemble surrogate,
  greedy expected-best-of-k portfolio; Strangmann et al., 2024).
- ``random``: the exact expectation over uniformly random k-subsets of the pool,
  ``E[max of k] = sum_i y_(i) C(i-1, k-1) / C(n, k)`` with y_(1) <= ... <= y_(n).
- ``best_default`` and ``avg_rank``. Every dataset has its own candidate pool (Quick-Tune: disjoint
  pools; NMTLC: pools overlap only partly), so "the configuration that is best on average over the
  training datasets" is defined over the *test* pool: each test candidate x is looked up in each
  training dataset d as its nearest configuration NN_d(x) (Euclidean distance in the standardised
  configuration encoding of :mod:`metaprep.transfer.features`, fitted on training configurations;
  an exact match where the pools overlap). ``best_default`` orders the test pool by the mean over d
  of the min-max normalised performance of NN_d(x) (its first pick is "the best default");
  ``avg_rank`` by the mean over d of the rank quantile of NN_d(x) within pool d (the zero-shot
  average-rank portfolio of Wistuba et al., 2015). Ties are broken by the other score.
- ``quicktune_gp``: Quick-Tune's meta-trained deep-kernel GP (Arango et al., ICLR 2024;
  :class:`metaprep.bench.quicktune_gp.DeepKernelGP`), zero-shot: conditioned on training runs at the
  full budget, candidates ranked by posterior mean at the full budget with no observed curve.

Compute. The (fold, seed) fits run in ``min(2, cpus)`` spawned processes; ``--quick`` (tests, smoke
checks) trains 100 ensemble steps with 4 members and 30 GP iterations, serially. All method
hyperparameters are fixed a priori (the defaults of the surrogate classes); nothing is tuned on the
test datasets. The report adds per-dataset regrets (``per_dataset``: method -> dataset -> [@1, @5]).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import numpy as np

from metaprep.bench.quicktune_gp import DeepKernelGP
from metaprep.bench.report import result
from metaprep.errors import ConfigError
from metaprep.progress import Progress
from metaprep.transfer.features import DictEncoder
from metaprep.transfer.metadataset import MetaDataset, Pool, load_metadataset
from metaprep.transfer.recommender import Recommender
from metaprep.transfer.surrogate import minmax

KS = (1, 5)
METHODS = ("recommender", "random", "best_default", "avg_rank", "quicktune_gp")
FITTED = ("recommender", "quicktune_gp")  # fitted per (test dataset, seed): the units of the progress lines
DEFAULT_SEEDS = 3
MAX_WORKERS = 2


def normalized_regret(perf: np.ndarray, order: list[int] | np.ndarray, k: int) -> float:
    """``(max y - max of the first k picks) / (max y - min y)``; 0 for a constant pool."""
    lo, hi = float(np.min(perf)), float(np.max(perf))
    if hi - lo <= 0:
        return 0.0
    return (hi - float(np.max(perf[np.asarray(order[:k], dtype=int)]))) / (hi - lo)


def expected_random_regret(perf: np.ndarray, k: int) -> float:
    """Exact expected normalised regret of the best of k picks drawn uniformly without replacement."""
    y = np.sort(np.asarray(perf, dtype=float))
    n = len(y)
    k = min(k, n)
    lo, hi = y[0], y[-1]
    if hi - lo <= 0:
        return 0.0
    # P(the maximum of the subset is y_(i)) = C(i-1, k-1) / C(n, k), i = 1..n (1-based, ascending)
    log_p = np.array([_log_comb(i - 1, k - 1) for i in range(1, n + 1)]) - _log_comb(n, k)
    expected_best = float(np.sum(np.exp(log_p) * y))
    return (hi - expected_best) / (hi - lo)


def _log_comb(n: int, k: int) -> float:
    if k < 0 or k > n:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def rank_quantile(values: np.ndarray) -> np.ndarray:
    """Rank of each value scaled to [0, 1] (0 = worst, 1 = best), ties sharing their average rank."""
    n = len(values)
    ranks = np.empty(n)
    ranks[np.argsort(values, kind="stable")] = np.arange(n)
    _, inverse = np.unique(values, return_inverse=True)
    ranks = (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]
    return ranks / max(n - 1, 1)


def nearest_neighbour_scores(train: list[Pool], test: Pool) -> tuple[np.ndarray, np.ndarray]:
    """Per test candidate: mean normalised performance and mean rank quantile of its NN in each pool."""
    encoder = DictEncoder().fit([c for p in train for c in p.configs])
    xt = encoder.transform(test.configs)
    perf = np.zeros(len(xt))
    rank = np.zeros(len(xt))
    for pool in train:
        xd = encoder.transform(pool.configs)
        d2 = (xt ** 2).sum(1)[:, None] + (xd ** 2).sum(1)[None, :] - 2 * xt @ xd.T
        nn = np.argmin(d2, axis=1)
        quantile = rank_quantile(pool.performance)
        perf += minmax(pool.performance)[nn]
        rank += quantile[nn]
    return perf / len(train), rank / len(train)


def _order(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    return np.lexsort((-secondary, -primary))  # highest primary first, ties by secondary


def _folds(train: MetaDataset, test: MetaDataset | None) -> tuple[list[tuple[list[Pool], Pool]], list[str]]:
    skipped = []
    if test is None:
        pools = train.pools()
        folds = []
        for name, pool in pools.items():
            if len(pool.configs) < 2 or np.ptp(pool.performance) <= 0:
                skipped.append(name)
                continue
            folds.append(([p for n, p in pools.items() if n != name], pool))
        return folds, skipped
    if train.meta_feature_names != test.meta_feature_names:
        raise ConfigError(f"--test-meta has meta-features {test.meta_feature_names}, --train-meta has "
                          f"{train.meta_feature_names}; both meta-datasets must describe datasets alike")
    train_pools = list(train.pools().values())
    folds = []
    for name, pool in test.pools().items():
        if len(pool.configs) < 2 or np.ptp(pool.performance) <= 0:
            skipped.append(name)
            continue
        folds.append((train_pools, pool))
    return folds, skipped


def _fit_and_rank(train_pools: list[Pool], pool: Pool, seed: int, rec_kwargs: dict,
                  gp_kwargs: dict) -> dict[str, tuple[list[int], float]]:
    """One (fold, seed) task: the picks of the two fitted methods and their fit+rank seconds."""
    out = {}
    start = time.perf_counter()
    rec = Recommender.fit(train_pools, seed=seed, **rec_kwargs)
    picks = rec.rank(pool.meta_features, pool.configs, k=max(KS))
    index = {id(c): i for i, c in enumerate(pool.configs)}
    out["recommender"] = ([index[id(r.config)] for r in picks], time.perf_counter() - start)
    start = time.perf_counter()
    gp = DeepKernelGP.fit(train_pools, seed=seed, **gp_kwargs)
    mean, _ = gp.predict(pool.configs, pool.meta_features)
    out["quicktune_gp"] = (np.argsort(-mean, kind="stable")[: max(KS)].tolist(), time.perf_counter() - start)
    return out


def run(args: Any) -> dict:
    if not getattr(args, "train_meta", None):
        raise ConfigError("--train-meta is required for --suite config_transfer (a meta-dataset path: NMTLC "
                          ".jsonl, Quick-Tune folder, generic .csv/.jsonl or mlflow:<tracking-uri>)")
    train = load_metadataset(args.train_meta)
    test = load_metadataset(args.test_meta) if getattr(args, "test_meta", None) else None
    quick = bool(getattr(args, "quick", False))
    seeds = list(range(args.seeds if getattr(args, "seeds", None) else DEFAULT_SEEDS))
    # the benchmark ranks by performance only, so no cost surrogate is fitted (cost_steps=0)
    rec_kwargs = {"steps": 100, "members": 4, "cost_steps": 0} if quick else {"cost_steps": 0}
    gp_kwargs = {"iterations": 30, "context": 256} if quick else {}
    folds, skipped = _folds(train, test)
    if len(folds) == 0 or (test is None and len(train.pools()) < 2):
        raise ConfigError(f"{args.train_meta}: config_transfer needs at least two datasets with two or more "
                          "distinct configurations each")

    values: dict[tuple[str, int], list[float]] = {(m, k): [] for m in METHODS for k in KS}
    per_dataset: dict[str, dict[str, list[list[float]]]] = {m: {} for m in METHODS}
    seconds = dict.fromkeys(("recommender", "quicktune_gp", "baselines"), 0.0)

    def record(method: str, dataset: str, regrets: list[float]) -> None:
        for k, r in zip(KS, regrets, strict=True):
            values[(method, k)].append(r)
        per_dataset[method].setdefault(dataset, []).append(regrets)

    for train_pools, pool in folds:
        start = time.perf_counter()
        perf = pool.performance
        record("random", pool.dataset, [expected_random_regret(perf, k) for k in KS])
        mean_perf, mean_rank = nearest_neighbour_scores(train_pools, pool)
        for method, order in (("best_default", _order(mean_perf, mean_rank)),
                              ("avg_rank", _order(mean_rank, mean_perf))):
            record(method, pool.dataset, [normalized_regret(perf, order, k) for k in KS])
        seconds["baselines"] += time.perf_counter() - start

    # the fitted methods: one task per (fold, seed). Their training runs single-threaded
    # (surrogate.single_thread), so two worker processes are what uses two cores
    tasks = [(f, seed) for f in range(len(folds)) for seed in seeds]
    workers = 1 if quick else min(MAX_WORKERS, os.cpu_count() or 1, len(tasks))
    progress = Progress("config_transfer", (len(folds), "test dataset"), (len(seeds), "seed"))
    units = [f"dataset {folds[f][1].dataset} seed {seed} methods {'+'.join(FITTED)}" for f, seed in tasks]

    def finished(i: int, out: dict) -> dict:
        progress.done(units[i], ", ".join(f"{m} {secs:.1f}s" for m, (_, secs) in out.items()))
        return out

    outputs: list[dict] = [{}] * len(tasks)
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool_exec:
            futures = {pool_exec.submit(_fit_and_rank, *folds[f], seed, rec_kwargs, gp_kwargs): i
                       for i, (f, seed) in enumerate(tasks)}
            for fut in as_completed(futures):  # in the order they finish, for the progress lines
                outputs[futures[fut]] = finished(futures[fut], fut.result())
    else:
        for i, (f, seed) in enumerate(tasks):
            progress.start(units[i])
            outputs[i] = finished(i, _fit_and_rank(*folds[f], seed, rec_kwargs, gp_kwargs))
    progress.finish()
    for (f, _), out in zip(tasks, outputs, strict=True):
        pool = folds[f][1]
        for method, (order, secs) in out.items():
            record(method, pool.dataset, [normalized_regret(pool.performance, order, k) for k in KS])
            seconds[method] += secs

    setting = {"meta_dataset": train.name if test is None else f"{train.name}->{test.name}",
               "protocol": "LODO" if test is None else "train->test"}
    results = [result(m, f"normalized_regret@{k}", values[(m, k)], **setting) for m in METHODS for k in KS]
    return {
        "results": results,
        "per_dataset": {m: {d: np.mean(v, axis=0).round(4).tolist() for d, v in per.items()}
                        for m, per in per_dataset.items()},
        "datasets": [pool.dataset for _, pool in folds],
        "skipped_datasets": skipped,
        "seeds": len(seeds),
        "performance": (test or train).performance_desc,
        "workers": workers,
        "fit_seconds": {m: round(s, 2) for m, s in seconds.items()},
    }
