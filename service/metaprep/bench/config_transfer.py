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
- ``surrogate``: the same fitted recommender ranking without its guard (``rank(guarded=False)``): the
  surrogate's own portfolio. ``recommender`` differs from it only where the guard put the best default
  first (:mod:`metaprep.transfer.guard`, cross-validated on the training datasets of the fold).
- ``best_default`` and ``avg_rank`` (:mod:`metaprep.transfer.defaults`): the test pool ordered by the
  mean over training datasets d of the normalised performance (``best_default``, its first pick "the
  best default") or the rank quantile (``avg_rank``, Wistuba et al., 2015) of each candidate's
  nearest configuration in pool d.
- ``quicktune_gp``: Quick-Tune's meta-trained deep-kernel GP (Arango et al., ICLR 2024;
  :class:`metaprep.bench.quicktune_gp.DeepKernelGP`), zero-shot: conditioned on training runs at the
  full budget, candidates ranked by posterior mean at the full budget with no observed curve.

Compute. The (fold, seed) fits run in ``min(2, cpus)`` spawned processes; ``--quick`` (tests, smoke
checks) trains 100 ensemble steps with 4 members and 30 GP iterations, serially. All method
hyperparameters are fixed a priori (the defaults of the surrogate classes); nothing is tuned on the
test datasets. The recommender's time includes its guard's ``GUARD_FOLDS`` extra fits. The report adds
per-dataset regrets (``per_dataset``: method -> dataset -> [@1, @5]), the guard's first-pick decision
per test dataset and seed (``guard``) and each fitted method's regret minus best_default's, paired by test
dataset with seeds averaged first (``paired_vs_best_default``: mean, 95 % t-interval, wins, losses and ties).
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
from metaprep.bench.report import mean_ci95, result
from metaprep.errors import ConfigError
from metaprep.progress import Progress
from metaprep.transfer.defaults import default_scores, normalized_regret, order_by
from metaprep.transfer.metadataset import MetaDataset, Pool, load_metadataset
from metaprep.transfer.recommender import Recommender

KS = (1, 5)
METHODS = ("recommender", "surrogate", "random", "best_default", "avg_rank", "quicktune_gp")
FITTED = ("recommender", "quicktune_gp")  # fitted per (test dataset, seed): the units of the progress lines
DEFAULT_SEEDS = 3
MAX_WORKERS = 2
TIE = 1e-9  # regrets closer than this count as a tie in the paired comparison


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
                  gp_kwargs: dict) -> tuple[dict[str, tuple[list[int], float]], dict | None]:
    """One (fold, seed) task: the picks of the fitted methods with their fit+rank seconds, and the guard's
    decision (None when the fold has too few datasets for one)."""
    out = {}
    start = time.perf_counter()
    rec = Recommender.fit(train_pools, seed=seed, **rec_kwargs)
    picks, decision = rec.rank_checked(pool.meta_features, pool.configs, k=max(KS))
    index = {id(c): i for i, c in enumerate(pool.configs)}
    out["recommender"] = ([index[id(r.config)] for r in picks], time.perf_counter() - start)
    unguarded = rec.rank(pool.meta_features, pool.configs, k=max(KS), guarded=False)
    out["surrogate"] = ([index[id(r.config)] for r in unguarded], 0.0)  # the same fit, without its guard
    first = out["recommender"][0][0]
    start = time.perf_counter()
    gp = DeepKernelGP.fit(train_pools, seed=seed, **gp_kwargs)
    mean, _ = gp.predict(pool.configs, pool.meta_features)
    out["quicktune_gp"] = (np.argsort(-mean, kind="stable")[: max(KS)].tolist(), time.perf_counter() - start)
    return out, (None if decision is None else {
        "pick": decision.pick, "delta": round(decision.delta, 4), "same_as_surrogate": decision.same_as_surrogate,
        "guard_on": decision.check["active"], "self_check": {k: round(v, 4) for k, v in decision.check.items()
                                                             if k != "active"},
        "regret@1": round(normalized_regret(pool.performance, [first], 1), 6)})


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
        mean_perf, mean_rank = default_scores(train_pools, pool.configs)
        for method, order in (("best_default", order_by(mean_perf, mean_rank)),
                              ("avg_rank", order_by(mean_rank, mean_perf))):
            record(method, pool.dataset, [normalized_regret(perf, order, k) for k in KS])
        seconds["baselines"] += time.perf_counter() - start

    # the fitted methods: one task per (fold, seed). Their training runs single-threaded
    # (surrogate.single_thread), so two worker processes are what uses two cores
    tasks = [(f, seed) for f in range(len(folds)) for seed in seeds]
    workers = 1 if quick else min(MAX_WORKERS, os.cpu_count() or 1, len(tasks))
    progress = Progress("config_transfer", (len(folds), "test dataset"), (len(seeds), "seed"))
    units = [f"dataset {folds[f][1].dataset} seed {seed} methods {'+'.join(FITTED)}" for f, seed in tasks]

    def finished(i: int, result_: tuple[dict, dict | None]) -> tuple[dict, dict | None]:
        out, decision = result_
        guard = (f"; first pick: {decision['pick']} (delta {decision['delta']:+.3f}"
                 f"{'' if decision['guard_on'] else ', guard off'})") if decision else ""
        progress.done(units[i], ", ".join(f"{m} {out[m][1]:.1f}s" for m in FITTED) + guard)
        return result_

    outputs: list[tuple[dict, dict | None]] = [({}, None)] * len(tasks)
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
    guard: dict[str, list] = {}
    for (f, _), (out, decision) in zip(tasks, outputs, strict=True):
        pool = folds[f][1]
        guard.setdefault(pool.dataset, []).append(decision)
        for method, (order, secs) in out.items():
            record(method, pool.dataset, [normalized_regret(pool.performance, order, k) for k in KS])
            if method in seconds:  # "surrogate" is the recommender's own fit, ranked without its guard
                seconds[method] += secs

    setting = {"meta_dataset": train.name if test is None else f"{train.name}->{test.name}",
               "protocol": "LODO" if test is None else "train->test"}
    results = [result(m, f"normalized_regret@{k}", values[(m, k)], **setting) for m in METHODS for k in KS]
    names = [pool.dataset for _, pool in folds]
    paired = {}
    for m in ("recommender", "surrogate", "quicktune_gp"):  # minus best_default, paired by test dataset
        for i, k in enumerate(KS):
            diffs = [float(np.mean([r[i] for r in per_dataset[m][d]]) - per_dataset["best_default"][d][0][i])
                     for d in names]
            mean, ci = mean_ci95(diffs)
            paired[f"{m}-best_default@{k}"] = {
                "mean": round(mean, 5), "ci95": round(ci, 5), "n": len(diffs),  # wins: lower regret (1e-9 apart)
                "wins": sum(x < -TIE for x in diffs), "losses": sum(x > TIE for x in diffs),
                "ties": sum(abs(x) <= TIE for x in diffs)}
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
        "guard": guard,  # per test dataset, per seed: the recommender's first-pick decision
        # regret difference to best_default per test dataset (seeds averaged first): n = test datasets
        "paired_vs_best_default": paired,
    }
