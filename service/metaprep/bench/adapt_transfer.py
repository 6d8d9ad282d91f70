"""``adapt_transfer`` (issue 20, item 3): adaptation settings of a prepared model, learned from its own runs.

No configuration-transfer anchor (Quick-Tune, Arango et al. 2024; Strangmann et al. 2024; Ray Tune; Syne
Tune) recommends how to *adapt a meta-learned model*; metaprep has that model's history. Per seed:

1. **Prepare**: meta-train the protocol's last method (``--methods``; default ``mltd``) on the meta-training
   pool: the shared ConvAI2 persona split, or with ``--domains-dir`` the multidomain arrangement
   (``--test-domains`` held out).
2. **Meta-dataset**: adapt the prepared model to its own meta-train and meta-val tasks (up to
   ``MAX_TRAIN_TASKS``), from each support size of the shots grid, under every (lr, optimizer) of the settings
   grid, for up to the largest step count; every (task, shots, lr, optimizer, steps) is one adapt run of the
   contract (:mod:`metaprep.registry.adapt_runs`). With a tracking URI they are logged to MLflow (experiment
   ``metaprep-adapt-transfer``, tagged with the prepared model) and the surrogate learns from what MLflow gives
   back (``mlflow:`` meta-dataset, :func:`~metaprep.transfer.formats.read_mlflow_adapt_runs`); else from the
   same rows in memory.
3. **Surrogate**: the transfer recommender (:class:`~metaprep.transfer.recommender.Recommender`) fitted on
   those runs; a task's "dataset" is (task, shots), its meta-features
   :func:`~metaprep.train.adapt_task.task_meta_features` (size, lengths, zero-shot loss, shots).
4. **Held-out tasks** (the split's meta-test tasks, never adapted to in step 2), the user's support size
   (the protocol's ``shots``): query loss after adaptation with
   - ``recommended``: the recommender's top setting for the task's meta-features;
   - ``default``: ``jobs.adapt``'s fixed defaults (the recipe's inner lr and inner optimizer, 10 steps);
   - ``best_default``: the one setting with the lowest mean regret over the training tasks;
   - ``oracle``: the best setting of the grid for that task, chosen on its own query set (a bound, not a
     method); ``regret`` = query loss − the oracle's.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator

from metaprep.bench.harness import Fold, evaluate, make_config, method_batches, prepare, setup_suite
from metaprep.bench.report import mean_or_nan, result
from metaprep.errors import DataError
from metaprep.progress import Progress, say
from metaprep.registry.adapt_runs import AdaptRun
from metaprep.tasks.base import Episode, fixed_episodes

EXPERIMENT = "metaprep-adapt-transfer"
MAX_TRAIN_TASKS = 20
STEPS = (2, 5, 10, 20)
SHOTS = (4, 8)
OPTIMIZERS = ("adam", "sgd")
DEFAULT_STEPS = 10  # jobs.adapt --steps default
QUICK = {"max_train_tasks": 6, "steps": (1, 2), "shots": (2,)}
METHODS = ("recommended", "default", "best_default", "oracle")


def settings_grid(proto, quick: bool) -> tuple[list[dict], dict]:
    """The (lr, optimizer, steps) candidates, and ``jobs.adapt``'s default setting (always among them)."""
    steps = QUICK["steps"] if quick else STEPS
    default = {"lr": float(proto.inner_lr), "optimizer": "adam", "steps": float(DEFAULT_STEPS if not quick
                                                                               else max(steps))}
    lrs = sorted({float(v) for v in proto.lr_grid} | {default["lr"]})
    grid = [{"lr": lr, "optimizer": opt, "steps": float(s)} for lr in lrs for opt in OPTIMIZERS for s in steps]
    return grid, default


def _key(setting: dict) -> tuple:
    return setting["lr"], setting["optimizer"], int(setting["steps"])


def adapt_grid(model, tok, episodes: list[Episode], proto, batch_fn, grid: list[dict]
               ) -> tuple[list[dict[tuple, float]], list[float], dict]:
    """Every episode under every setting of ``grid``: per episode {setting key: query loss}, per episode the
    query loss before adapting, and ``{"curves": {(lr, optimizer): per-episode curve}, "seconds": {(lr,
    optimizer): seconds per task}}``. One adaptation per (lr, optimizer) gives every step count."""
    most = max(int(s["steps"]) for s in grid)
    losses: list[dict[tuple, float]] = [{} for _ in episodes]
    zero_shot: list[float] = [math.nan] * len(episodes)
    curves: dict[tuple, list[list[float]]] = {}
    seconds: dict[tuple, float] = {}
    for lr, opt in sorted({(s["lr"], s["optimizer"]) for s in grid}):
        t0 = time.perf_counter()
        curve, _ = evaluate(model, tok, episodes, proto, lr, batch_fn=batch_fn, optimizer=opt, steps=most)
        seconds[(lr, opt)] = (time.perf_counter() - t0) / max(1, len(episodes))
        curves[(lr, opt)] = curve
        for i in range(len(episodes)):
            zero_shot[i] = curve[0][i]
    for s in grid:
        curve = curves[(s["lr"], s["optimizer"])]
        for i in range(len(episodes)):  # a diverged setting is the worst, not a NaN that poisons min/mean
            losses[i][_key(s)] = _finite(curve[int(s["steps"])][i])
    per_task_curves = {k: [[c[step][i] for step in range(len(c))] for i in range(len(episodes))]
                       for k, c in curves.items()}
    return losses, zero_shot, {"seconds": seconds, "curves": per_task_curves}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 1e9


def build_runs(tasks, episodes_by_shots: dict[int, list[Episode]], tok, grid, results: dict[int, tuple],
               label: str) -> list[AdaptRun]:
    """The adapt runs (contract rows) of the training episodes: one per (task, shots, setting)."""
    from metaprep.train.adapt_task import task_meta_features

    by_name = {t.name: t for t in tasks}
    runs = []
    for shots, episodes in episodes_by_shots.items():
        losses, zero_shot, info = results[shots]
        for i, ep in enumerate(episodes):
            meta = task_meta_features(by_name[ep.task], shots, tok, zero_shot[i])
            for s in grid:
                curve = info["curves"][(s["lr"], s["optimizer"])][i][: int(s["steps"]) + 1]
                cost = info["seconds"][(s["lr"], s["optimizer"])] * s["steps"] / max(int(x["steps"]) for x in grid)
                # a task seen from `shots` examples by one prepared model: meta-features constant per id, so the
                # runs of every prepared model can share an experiment (and `jobs.recommend --train-meta mlflow:`)
                runs.append(AdaptRun(task=f"{ep.task}@{shots}:{label}", config=dict(s), meta_features=meta,
                                     curve=[_finite(v) for v in curve], final_loss=losses[i][_key(s)],
                                     cost_s=cost, extra_params={"prepared_model": label}))
    return runs


def learn_from(runs: list[AdaptRun], label: str, uri: str | None):
    """The meta-dataset of ``runs``: logged to MLflow and read back from it when ``uri``, else in memory."""
    from metaprep.transfer.formats import adapt_runs_metadataset, read_mlflow_adapt_runs

    if uri:
        from metaprep.registry.adapt_runs import log_adapt_runs

        log_adapt_runs(uri, runs, EXPERIMENT, tags={"prepared_model": label})
        return read_mlflow_adapt_runs(uri, EXPERIMENT, where=f"tags.prepared_model = '{label}'")
    return adapt_runs_metadataset(runs, "memory", f"memory:{label}")


def best_default(runs: list[AdaptRun], grid: list[dict]) -> dict:
    """The setting with the lowest mean regret (loss − the best loss of that training task and shots)."""
    by_dataset: dict[str, dict[tuple, float]] = {}
    for r in runs:
        by_dataset.setdefault(r.task, {})[_key(r.config)] = r.final_loss
    regret = {_key(s): mean_or_nan([d[_key(s)] - min(d.values()) for d in by_dataset.values()]) for s in grid}
    return next(s for s in grid if _key(s) == min(regret, key=regret.get))


@contextlib.contextmanager
def _fold(args: argparse.Namespace, root) -> Iterator[Fold]:
    if getattr(args, "domains_dir", None):
        from metaprep.bench.lm_suites import multidomain_fold

        with multidomain_fold(args, root) as (fold, _):
            yield fold
    else:
        yield Fold("convai2", {"family": "persona", "data_dir": str(root)})


def run(args: argparse.Namespace) -> dict:
    quick = bool(getattr(args, "quick", False))
    suite = "multidomain" if getattr(args, "domains_dir", None) else "persona"
    root, model_path, proto = setup_suite(args, suite)
    method = proto.methods[-1]
    grid, default = settings_grid(proto, quick)
    shots_grid = QUICK["shots"] if quick else SHOTS
    max_train = QUICK["max_train_tasks"] if quick else MAX_TRAIN_TASKS
    uri = None if getattr(args, "no_mlflow", False) else os.environ.get("MLFLOW_TRACKING_URI")
    values: dict[str, dict[str, list[float]]] = {m: {"query_loss": [], "regret": []} for m in METHODS}
    picks: dict[str, Counter] = {"recommended": Counter(), "best_default": Counter()}
    per_seed, n_runs = [], []
    with _fold(args, root) as fold:
        from metaprep.train.loop import load_split

        fold.split = fold.split or load_split(make_config(method, 0, proto, fold, model_path))
        need = max(shots_grid) + proto.query_size
        pool = [t for t in fold.split.train + fold.split.val if len(t.examples) >= need]
        test_tasks = fold.test if fold.test is not None else fold.split.test
        test_tasks = [t for t in test_tasks if len(t.examples) >= proto.shots + proto.query_size]
        test_tasks = test_tasks[: proto.test_tasks or None]
        if len(pool) < 2 or not test_tasks:
            raise DataError(f"adapt_transfer: needs >= 2 training tasks with {need} examples and >= 1 test task; "
                            f"got {len(pool)} and {len(test_tasks)}")
        progress = Progress("adapt_transfer", (proto.seeds, "seed"))
        for seed in range(proto.seeds):
            unit = f"seed {seed} ({method}, {len(grid)} settings)"
            progress.start(unit)
            t0 = time.perf_counter()
            model, tok, _ = prepare(method, seed, proto, fold, model_path)
            batch_fn = method_batches(method, proto, fold, model_path)
            t_prep = time.perf_counter()
            train_tasks = random.Random(seed).sample(pool, min(max_train, len(pool)))
            episodes = {k: fixed_episodes(train_tasks, k, proto.query_size, seed) for k in shots_grid}
            results = {k: adapt_grid(model, tok, eps, proto, batch_fn, grid) for k, eps in episodes.items()}
            label = f"{method}-seed{seed}-{uuid.uuid4().hex[:8]}"
            runs = build_runs(train_tasks, episodes, tok, grid, results, label)
            t_runs = time.perf_counter()
            from metaprep.transfer.recommender import Recommender

            recommender = Recommender.fit(learn_from(runs, label, uri), seed=seed)
            t_fit = time.perf_counter()
            fixed = best_default(runs, grid)
            test_eps = fixed_episodes(test_tasks, proto.shots, proto.query_size, seed)
            losses, zero_shot, _ = adapt_grid(model, tok, test_eps, proto, batch_fn, grid)
            by_name = {t.name: t for t in test_tasks}
            from metaprep.train.adapt_task import task_meta_features

            for i, ep in enumerate(test_eps):
                meta = task_meta_features(by_name[ep.task], proto.shots, tok, zero_shot[i])
                top = recommender.rank(meta, candidates=grid, k=1)[0].config
                oracle = min(losses[i].values())
                chosen = {"recommended": top, "default": default, "best_default": fixed}
                for name, setting in chosen.items():
                    loss = losses[i][_key(setting)]
                    values[name]["query_loss"].append(loss)
                    values[name]["regret"].append(loss - oracle)
                values["oracle"]["query_loss"].append(oracle)
                values["oracle"]["regret"].append(0.0)
                picks["recommended"][str(_key(top))] += 1
            picks["best_default"][str(_key(fixed))] += len(test_eps)
            n_runs.append(len(runs))
            per_seed.append({"seed": seed, "prepared_model": label, "runs": len(runs), "train_tasks": len(train_tasks),
                             "test_tasks": len(test_eps), "best_default": fixed,
                             "prepare_s": round(t_prep - t0, 2), "runs_s": round(t_runs - t_prep, 2),
                             "fit_s": round(t_fit - t_runs, 2), "logged_to_mlflow": bool(uri)})
            rec = mean_or_nan(values["recommended"]["regret"][-len(test_eps):])
            progress.done(unit, f"{len(runs)} adapt runs, regret recommended {rec:.4f}, default "
                                f"{mean_or_nan(values['default']['regret'][-len(test_eps):]):.4f}")
            del model
        progress.finish()
    setting = {"model": os.path.basename(model_path.rstrip("/")), "prepared": method, "shots": proto.shots}
    rows = [result(m, metric, v, **setting) for m in METHODS for metric, v in values[m].items()]
    say("adapt_transfer", f"adapt runs per prepared model: {', '.join(map(str, n_runs))}")
    return {"results": rows, "settings_grid": grid, "default_setting": default, "shots_grid": list(shots_grid),
            "picks": {k: dict(v) for k, v in picks.items()}, "seeds": per_seed,
            "protocol": {"suite_data": suite, "method": method, "quick": quick, "meta_steps": proto.meta_steps,
                         "query_size": proto.query_size, "max_train_tasks": max_train,
                         "experiment": EXPERIMENT if uri else None}}
