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
3. **Settings model**: :class:`~metaprep.transfer.adapt_settings.AdaptSettings.learn`, what ``jobs.learn_settings``
   registers: the transfer recommender fitted on those runs (a task's "dataset" is (task, shots), its
   meta-features :func:`~metaprep.train.adapt_task.task_meta_features`) and the rule (surrogate or best fixed
   setting) chosen by cross-validation over the training tasks.
4. **Held-out tasks** (the split's meta-test tasks, never adapted to in step 2), the user's support size
   (the protocol's ``shots``): query loss after adaptation with
   - ``recommended``: what ``jobs.adapt --settings recommended`` does (:meth:`AdaptSettings.choose`);
   - ``surrogate``: the recommender's top setting for the task's meta-features, whatever the rule;
   - ``default``: ``jobs.adapt``'s fixed defaults (the recipe's inner lr and inner optimizer, 10 steps);
   - ``best_default``: the one setting with the lowest mean regret over the training tasks;
   - ``oracle``: the best setting of the grid for that task, chosen on its own query set (a bound, not a
     method); ``regret`` = query loss − the oracle's;
   - ``oracle_crossfit``: the best setting for the task chosen on one half of its query set and scored on the
     other, both ways (cross-fitting). ``oracle`` is optimistic: picking the minimum of the grid's noisy losses on the
     same examples it is scored on finds noise as well as signal. ``oracle_crossfit`` is the best any per-task
     rule can do from the task's *own labelled data* once that selection noise is removed; where it is not
     below ``best_default``, per-task choice has nothing a recommender could learn at this grid's resolution.
   Every method is also reported as ``vs_best_default``: its query loss minus ``best_default``'s on the same
   task (paired; negative = better). A task's query loss is the mean of its two halves' losses.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator

from metaprep.bench.harness import (
    Fold,
    evaluate,
    make_config,
    method_batches,
    prepare,
    setup_suite,
    support_losses,
)
from metaprep.bench.report import mean_or_nan, result
from metaprep.errors import DataError
from metaprep.progress import Progress, say
from metaprep.tasks.base import Episode, fixed_episodes
from metaprep.train.adapt_task import DEFAULT_STEPS
from metaprep.transfer.adapt_settings import (
    EXPERIMENT,
    OPTIMIZERS,
    SHOTS,
    STEPS,
    AdaptSettings,
    adapt_grid,
    build_runs,
    setting_key,
    settings_grid,
)

MAX_TRAIN_TASKS = 20
QUICK = {"max_train_tasks": 6, "steps": (1, 2), "shots": (2,), "fit": {"steps": 200, "members": 4}}
METHODS = ("recommended", "surrogate", "default", "best_default", "oracle", "oracle_crossfit")
METRICS = ("query_loss", "regret", "vs_best_default")


def grid_and_default(proto, quick: bool) -> tuple[list[dict], dict]:
    """The (lr, optimizer, steps) candidates (the protocol's lr grid and inner lr), and ``jobs.adapt``'s default
    setting (always among them)."""
    steps = QUICK["steps"] if quick else STEPS
    default = {"lr": float(proto.inner_lr), "optimizer": "adam",  # the inner optimizer every suite prepares with
               "steps": float(DEFAULT_STEPS if not quick else max(steps))}
    return settings_grid(list(proto.lr_grid) + [default["lr"]], OPTIMIZERS, steps), default


def learn_from(runs, grid, label: str, uri: str | None, seed: int, quick: bool) -> AdaptSettings:
    """The settings model of ``runs``: logged to MLflow and the surrogate fitted on what MLflow gives back when
    ``uri``, else on the runs in memory."""
    metadataset = None
    if uri:
        from metaprep.registry.adapt_runs import log_adapt_runs
        from metaprep.transfer.formats import read_mlflow_adapt_runs

        log_adapt_runs(uri, runs, EXPERIMENT, tags={"prepared_model": label})
        metadataset = read_mlflow_adapt_runs(uri, EXPERIMENT, where=f"tags.prepared_model = '{label}'")
    return AdaptSettings.learn(runs, grid, label, seed=seed, metadataset=metadataset,
                               fit_kwargs=QUICK["fit"] if quick else None)


def _grid_on(model, tok, episodes, proto, batch_fn, grid, what: str, support_loss: list[float] | None = None):
    """:func:`adapt_grid` of ``episodes`` through the harness's chunked, protocol-precision adaptation; a line
    per (lr, optimizer). ``support_loss``: the episodes' support losses where the caller has them (episodes
    that share their support, e.g. :func:`query_halves`), else computed here."""
    def adapt_curve(lr: float, optimizer: str, steps: int) -> list[list[float]]:
        t0 = time.perf_counter()
        curve = evaluate(model, tok, episodes, proto, lr, batch_fn=batch_fn, optimizer=optimizer, steps=steps)[0]
        say("adapt_transfer", f"  {what}: lr {lr:g} {optimizer}, {steps} steps, {len(episodes)} tasks: mean query "
                              f"loss {mean_or_nan(curve[0]):.4f} -> {mean_or_nan(curve[-1]):.4f} "
                              f"({time.perf_counter() - t0:.0f} s)")
        return curve
    if support_loss is None:
        support_loss = support_losses(model, tok, episodes, proto, batch_fn)
    return adapt_grid(adapt_curve, support_loss, grid)


def query_halves(episodes: list[Episode]) -> tuple[list[Episode], list[Episode]]:
    """Each episode twice, with the same support and the two halves of its query set (the first
    ``len(query) // 2`` examples, then the rest)."""
    if any(len(ep.query) < 2 for ep in episodes):
        raise DataError("adapt_transfer: the held-out episodes need >= 2 query examples (query_size) to score a "
                        "per-task choice on examples it was not made on")
    return ([Episode(ep.task, ep.support, ep.query[: len(ep.query) // 2]) for ep in episodes],
            [Episode(ep.task, ep.support, ep.query[len(ep.query) // 2:]) for ep in episodes])


def crossfit_loss(half_a: dict[tuple, float], half_b: dict[tuple, float]) -> float:
    """The loss of a per-task choice scored out of sample: the setting best on half A scored on half B, and the
    one best on half B scored on half A, averaged. Never below the in-sample oracle of the averaged halves."""
    return (half_b[min(half_a, key=half_a.get)] + half_a[min(half_b, key=half_b.get)]) / 2


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
    grid, default = grid_and_default(proto, quick)
    shots_grid = QUICK["shots"] if quick else SHOTS
    max_train = QUICK["max_train_tasks"] if quick else MAX_TRAIN_TASKS
    uri = None if getattr(args, "no_mlflow", False) else os.environ.get("MLFLOW_TRACKING_URI")
    values: dict[str, dict[str, list[float]]] = {m: {metric: [] for metric in METRICS} for m in METHODS}
    picks: dict[str, Counter] = {"recommended": Counter(), "surrogate": Counter(), "best_default": Counter()}
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
            results = {k: _grid_on(model, tok, eps, proto, batch_fn, grid, f"training tasks, {k} shots")
                       for k, eps in episodes.items()}
            label = f"{method}-seed{seed}-{uuid.uuid4().hex[:8]}"
            runs = build_runs(train_tasks, episodes, tok, grid, results, label, "bench")
            t_runs = time.perf_counter()
            settings = learn_from(runs, grid, label, uri, seed, quick)
            t_fit = time.perf_counter()
            test_eps = fixed_episodes(test_tasks, proto.shots, proto.query_size, seed)
            half_a, half_b = query_halves(test_eps)
            support_loss = support_losses(model, tok, test_eps, proto, batch_fn)
            losses_a = _grid_on(model, tok, half_a, proto, batch_fn, grid, "held-out tasks, query half 1",
                                support_loss)[0]
            losses_b = _grid_on(model, tok, half_b, proto, batch_fn, grid, "held-out tasks, query half 2",
                                support_loss)[0]
            by_name = {t.name: t for t in test_tasks}
            from metaprep.train.adapt_task import task_meta_features

            for i, ep in enumerate(test_eps):
                meta = task_meta_features(by_name[ep.task], proto.shots, tok, support_loss[i])
                chosen = {"recommended": settings.choose(meta)[0],
                          "surrogate": settings.recommender.rank(meta, grid, k=1)[0].config,
                          "default": default, "best_default": settings.fixed}
                losses = {k: (losses_a[i][k] + losses_b[i][k]) / 2 for k in losses_a[i]}
                oracle, reference = min(losses.values()), losses[setting_key(settings.fixed)]
                scored = {name: losses[setting_key(setting)] for name, setting in chosen.items()}
                scored |= {"oracle": oracle, "oracle_crossfit": crossfit_loss(losses_a[i], losses_b[i])}
                for name, loss in scored.items():
                    values[name]["query_loss"].append(loss)
                    values[name]["regret"].append(loss - oracle)
                    values[name]["vs_best_default"].append(loss - reference)
                for name in picks:
                    picks[name][str(setting_key(chosen[name]))] += 1
            n_runs.append(len(runs))
            per_seed.append({"seed": seed, "prepared_model": label, "runs": len(runs), "train_tasks": len(train_tasks),
                             "test_tasks": len(test_eps), "best_default": settings.fixed, "rule": settings.rule,
                             "cross_validation": settings.cv, "prepare_s": round(t_prep - t0, 2),
                             "runs_s": round(t_runs - t_prep, 2), "fit_s": round(t_fit - t_runs, 2),
                             "logged_to_mlflow": bool(uri)})
            last = {m: mean_or_nan(values[m]["regret"][-len(test_eps):])
                    for m in ("recommended", "default", "best_default", "oracle_crossfit")}
            progress.done(unit, f"{len(runs)} adapt runs, rule {settings.rule} (cv regret surrogate "
                                f"{settings.cv['surrogate']:.4f}, fixed {settings.cv['fixed']:.4f}), regret "
                                + ", ".join(f"{m} {v:.4f}" for m, v in last.items()))
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
