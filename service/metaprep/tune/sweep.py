"""Hyperparameter sweeps of meta-training on Ray Tune, one Ray Train run per trial: the driver.

Each trial is :func:`metaprep.tune.trial.sweep_trial` (one meta-training, launched like
``jobs.meta_train``). The trial function only drives the run, so it requests no CPU of its own;
``max_concurrent_trials`` is the number of trials whose Train workers fit on the cluster at once.
ASHA stops poor trials on the meta-validation loss (see :mod:`metaprep.tune.trial` for how it sees it).

MLflow: one parent run per sweep (search space, plot, summary), one child run per trial (tag
``mlflow.parentRunId``; the full trial configuration as params; the workers log the per-step
``meta_loss`` / ``meta_val_loss`` curves into it; tag ``sweep.status`` = completed | diverged |
early_stopped | failed). A trial whose loss becomes NaN/inf ends normally with status ``diverged``
and metric ``inf``; other trial errors are Tune trial errors; neither stops the sweep.

The best completed trial's export is registered (``NAME-base`` / ``NAME-controller``, alias
``candidate``). ``champion`` moves to it only if it beats the current champion on the same
meta-validation episodes (:func:`metaprep.registry.promotion.compare_and_promote`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaprep.config import MetaTrainConfig, flatten
from metaprep.errors import ConfigError
from metaprep.registry.promotion import tag_json
from metaprep.train.storage import Storage
from metaprep.tune.space import METRIC, SweepSpec, trial_config

STATUSES = ("completed", "diverged", "early_stopped", "failed")
TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes reserved for each trial's driver process (it needs no CPU)


def sweep_recipe(path: str | Path, overrides: list[str] | None = None, num_samples: int | None = None,
                 log=print) -> dict:
    """Read the sweep recipe at ``path`` and run it (what ``jobs.sweep`` does); returns the summary."""
    from metaprep.tune.recipe import load_sweep_recipe

    cfg, base, spec = load_sweep_recipe(path, overrides, num_samples)
    return run_sweep(cfg, base, spec, log)


def max_concurrent_trials(resources: dict[str, float], cfg: MetaTrainConfig, spec: SweepSpec) -> int:
    """Trials whose Train workers fit on the cluster at once (at least 1, at most ``num_samples``)."""
    from metaprep.train.launch import check_cluster_fits

    total, per_trial = check_cluster_fits(cfg, resources, "a trial")
    n = max(1, int(total // per_trial))
    if spec.max_concurrent:
        n = min(n, spec.max_concurrent)
    return min(n, spec.num_samples)


@dataclass
class TrialOutcome:
    trial_id: str
    status: str
    params: dict
    metric: float | None  # last meta-val loss reported (None: never reached an evaluation)
    meta_step: int | None
    run_id: str | None
    export_path: str | None = None
    error: str | None = None
    final: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"trial_id": self.trial_id, "status": self.status, "config": self.params,
                "metric": self.metric, "meta_step": self.meta_step, "run_id": self.run_id, "error": self.error}


def _json_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _outcomes(grid, child_runs: dict[str, Any]) -> list[TrialOutcome]:
    out = []
    for result in grid:
        trial_id = Path(result.path).name  # trial_dirname_creator names trial folders by trial id
        m = dict(result.metrics or {})
        if result.error is not None:
            status = "failed"
        elif m.get("status") in ("completed", "diverged"):
            status = m["status"]
        else:
            status = "early_stopped"  # the scheduler stopped it between meta-validations
        run = child_runs.get(trial_id)
        error = None
        if result.error is not None:
            lines = str(result.error).strip().splitlines() or [""]
            error = f"{result.error.__class__.__name__}: {lines[-1][:300]}"
        elif status == "diverged":
            error = f"meta-loss became NaN/inf at meta-step {m.get('diverged_at')}"
        params = {k: v for k, v in (result.config or {}).items()}
        out.append(TrialOutcome(trial_id, status, params, _json_float(m.get(METRIC)), m.get("meta_step"),
                                m.get("mlflow_run_id") or (run.info.run_id if run else None),
                                m.get("export_path"), error, m))
    return sorted(out, key=lambda t: t.trial_id)


def _reconcile_child_run(client, run, trial: TrialOutcome) -> None:
    """Make a trial's MLflow child run agree with the driver's verdict on it.

    The driver's status is authoritative: a trial ASHA stops is killed mid-``fit``, and the kill can reach
    the trial's own ``except`` branch first, which tags the run ``failed`` just before the process dies.
    Runs Tune killed before any bookkeeping are still ``RUNNING`` and are closed here.
    """
    if run is None:
        return
    run_id, tags = run.info.run_id, run.data.tags
    if tags.get("sweep.status") != trial.status:
        client.set_tag(run_id, "sweep.status", trial.status)
    if trial.status == "early_stopped" and "sweep.error" in tags:
        client.delete_tag(run_id, "sweep.error")  # the scheduler's kill, not an error of the trial
    elif trial.error and tags.get("sweep.error") is None:
        client.set_tag(run_id, "sweep.error", trial.error[:4000])
    wanted = {"completed": "FINISHED", "early_stopped": "KILLED"}.get(trial.status, "FAILED")
    if run.info.status != wanted:
        client.set_terminated(run_id, wanted)


def _searcher(spec: SweepSpec, max_concurrent: int = 0):
    """The search algorithm; random search limits concurrency itself (Tune's ``max_concurrent_trials``
    only wraps ``Searcher`` instances, and ignores it for a ``BasicVariantGenerator``)."""
    if spec.searcher == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(points_to_evaluate=[dict(p) for p in spec.initial] or None,
                                     random_state=spec.seed, max_concurrent=max_concurrent)
    if spec.searcher == "optuna":
        try:
            import optuna  # noqa: F401  (OptunaSearch imports lazily; fail here with a clear message)
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ConfigError("sweep.searcher: 'optuna' needs the optuna package (pip install optuna); "
                              "or use searcher: random") from None
        return OptunaSearch(metric=METRIC, mode=spec.mode, points_to_evaluate=[dict(p) for p in spec.initial] or None,
                            seed=spec.seed)
    try:
        from metaprep.transfer.searcher import PortfolioSearcher
    except ImportError as exc:
        raise ConfigError(f"sweep.searcher: transfer searcher not available ({exc})") from None
    # The space is given at construction, so Tune's param_space must stay empty (see PortfolioSearcher).
    return PortfolioSearcher([dict(p) for p in spec.portfolio], space=spec.tune_space(), metric=METRIC,
                             mode=spec.mode, seed=spec.seed, only_space_keys=True)


def _absolute_paths(base: dict) -> dict:
    """Relative data/model paths of the recipe made absolute: Tune runs each trial in its own folder."""
    for section, key in (("model", "path"), ("tasks", "path"), ("tasks", "data_dir")):
        value = base.get(section, {}).get(key)
        if not isinstance(value, str) or value in ("", "tiny") or ":" in value:  # keywords and pypi:/URIs
            continue
        if not os.path.isabs(value) and Path(value).exists():
            base[section][key] = str(Path(value).resolve())
    return base


def run_sweep(cfg: MetaTrainConfig, base: dict, spec: SweepSpec, log=print) -> dict:
    """Run the sweep on the connected (or local) Ray cluster and return the summary dict.

    ``best_config`` is None when no trial completed with a finite metric (nothing is registered then).
    """
    t0 = time.perf_counter()
    from metaprep.registry.client import experiment_id, log_params, mlflow_client
    from metaprep.registry.tracking import reachable_tracking_uri
    from metaprep.train.launch import check_inputs, init_ray, new_run_name, storage_root
    from metaprep.tune.portfolio import resolve_initial_points

    spec = resolve_initial_points(spec, cfg.tracking.uri)  # a surrogate that does not fit fails first
    uri = reachable_tracking_uri(cfg.tracking.uri)
    split, data_fp = check_inputs(cfg)  # a bad recipe fails here, not in N trials
    _searcher(spec)  # a missing optional searcher fails here, before any run is created
    base = _absolute_paths(copy.deepcopy(base))
    init_ray(log_to_driver=False)
    import ray

    concurrent = max_concurrent_trials(ray.cluster_resources(), cfg, spec)  # refuses a trial that can never fit
    sweep_name = new_run_name(f"{cfg.registry.name}-sweep")
    client = mlflow_client(uri)
    exp_id = experiment_id(uri, cfg.tracking.experiment)
    parent = client.create_run(exp_id, run_name=sweep_name, tags={
        "sweep": "true", "sweep.name": sweep_name, "sweep.searcher": spec.searcher, "sweep.metric": METRIC,
        "algorithm": cfg.algorithm, "ray_run_name": sweep_name}).info.run_id
    log(f"metaprep: sweep {sweep_name} (MLflow parent run {parent}) -> {uri}")
    try:
        params = {f"base.{k}": v for k, v in flatten(base).items() if k not in spec.space}
        params.update({"sweep.num_samples": spec.num_samples, "sweep.searcher": spec.searcher,
                       "sweep.seed": spec.seed, "sweep.max_concurrent_trials": concurrent,
                       "sweep.asha": tag_json(dataclasses.asdict(spec.asha)),
                       **{f"sweep.space.{k}": tag_json(p.to_dict()) for k, p in spec.space.items()}})
        if spec.recommender is not None:
            params["sweep.recommender.surrogate"] = spec.recommender.surrogate
        log_params(client, parent, params)
        client.log_dict(parent, spec.to_dict(), "sweep.json")
        client.log_dict(parent, base, "base_config.json")
        if spec.recommender is not None:  # the transfer recommender's portfolio, with its predictions
            client.log_dict(parent, {**dataclasses.asdict(spec.recommender), "portfolio": spec.recommended},
                            "recommended_portfolio.json")
            log("metaprep: recommended portfolio (predicted normalised performance): " + "; ".join(
                f"{' '.join(f'{k}={_fmt(v)}' for k, v in r['params'].items())} ({r['predicted_performance']:.3f})"
                for r in spec.recommended))
        storage = storage_root(cfg)
        ctx = {"base": base, "uri": uri, "experiment_id": exp_id, "parent_run_id": parent,
               "sweep_name": sweep_name, "train_storage": storage.uri(sweep_name, "train")}
        grid = _tune(cfg, spec, concurrent, ctx, storage, log)
        summary, best = _summarise(grid, spec, client, ctx, storage.child(sweep_name), log)
        summary.update(max_concurrent_trials=concurrent, data_fingerprint=data_fp)
        if best is not None and cfg.registry.register:
            summary.update(_register_best(best, base, split, data_fp, client, ctx, log))
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    for k in ("n_trials", "n_failed", "n_diverged", "n_early_stopped", "wall_s"):
        client.log_metric(parent, k, summary[k])
    client.log_dict(parent, summary, "sweep_summary.json")
    client.set_terminated(parent, "FINISHED" if summary["best_config"] is not None else "FAILED")
    return summary


def asha_scheduler(cfg: MetaTrainConfig, spec: SweepSpec):
    """ASHA on ``meta_step`` (None when it is off) and the line that says when it stops trials, or why it is off."""
    if not spec.asha.enabled:
        return None, (f"metaprep: ASHA off: {spec.asha.off_reason or 'disabled'}; every trial runs all "
                      f"{cfg.meta.meta_steps} meta-steps")
    from ray.tune.schedulers import ASHAScheduler

    grace = min(spec.asha.grace_period or cfg.meta.eval_every, cfg.meta.meta_steps)
    rf = spec.asha.reduction_factor
    rungs, step = [], float(grace)
    while step < cfg.meta.meta_steps:  # ASHA's rungs: grace_period * reduction_factor^k below max_t
        rungs, step = rungs + [f"{step:g}"], step * rf
    scheduler = ASHAScheduler(time_attr="meta_step", max_t=cfg.meta.meta_steps, grace_period=grace,
                              reduction_factor=rf)
    return scheduler, (f"metaprep: ASHA on: at meta-step {', '.join(rungs) or grace} a trial whose {METRIC} is "
                       f"not in the best 1/{rf:g} so far is stopped early")


def _tune(cfg: MetaTrainConfig, spec: SweepSpec, concurrent: int, ctx: dict, storage: Storage, log):
    """Run the trials (:func:`~metaprep.tune.trial.sweep_trial`) on Ray Tune; returns Tune's ResultGrid."""
    from ray import tune
    from ray.tune.search import Searcher

    from metaprep.tune.progress import SweepProgress
    from metaprep.tune.trial import sweep_trial

    search_alg = _searcher(spec, concurrent)
    scheduler, asha_line = asha_scheduler(cfg, spec)
    sweep_name = ctx["sweep_name"]
    log(f"metaprep: {spec.num_samples} trials, up to {concurrent} at once, searcher {spec.searcher}; "
        f"Tune results under {storage.uri(sweep_name)}")
    log(asha_line)
    # The trial function only drives its Train run: no CPU (Tune refuses an empty request, so it reserves a
    # little memory), or trial drivers would hold the CPUs their own Train workers wait for.
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, ctx=ctx),
                                    {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    tuner = tune.Tuner(
        trainable,
        param_space={} if spec.searcher == "transfer" else spec.tune_space(),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=spec.mode, search_alg=search_alg, scheduler=scheduler,
            num_samples=spec.num_samples,
            max_concurrent_trials=concurrent if isinstance(search_alg, Searcher) else None,
            trial_name_creator=lambda t: f"trial-{t.trial_id}", trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=sweep_name, storage_path=storage.ray_storage[0],
                                  storage_filesystem=storage.ray_storage[1], verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[SweepProgress(spec.num_samples, log)]),
    )
    return tuner.fit()


def _summarise(grid, spec: SweepSpec, client, ctx: dict, folder: Storage, log) -> tuple[dict, TrialOutcome | None]:
    """Each trial's outcome (its child run made to agree with it), the plot and the best completed trial:
    the summary dict and that trial (None when no trial completed)."""
    import ray

    from metaprep.tune.plot import plot_sweep

    parent = ctx["parent_run_id"]
    children = {r.data.tags.get("sweep.trial_id"): r for r in client.search_runs(
        [ctx["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=10000)}
    trials = _outcomes(grid, children)
    for t in trials:
        _reconcile_child_run(client, children.get(t.trial_id), t)
    for t in trials:
        shown = "-" if t.metric is None else f"{t.metric:.4f}"
        log(f"  {t.trial_id}  {t.status:<13} {METRIC}={shown:<8} "
            + " ".join(f"{k}={_fmt(v)}" for k, v in t.params.items()) + (f"  ({t.error})" if t.error else ""))

    # next to the Tune results when they are on this machine; else only in MLflow (from a temporary folder)
    plot_dir = Path(folder.path()) if folder.is_local else Path(tempfile.mkdtemp(prefix="metaprep-sweep-"))
    plot = plot_sweep(trials, spec, plot_dir / "sweep_lr.png")
    plot_artifact = None
    if plot is not None:
        client.log_artifact(parent, str(plot))
        plot_artifact = f"{client.get_run(parent).info.artifact_uri}/{plot.name}"
        log(f"metaprep: sweep plot {plot if folder.is_local else '(MLflow only)'} (MLflow artifact {plot_artifact})")
    if not folder.is_local:
        shutil.rmtree(plot_dir, ignore_errors=True)
        plot = None

    completed = [t for t in trials if t.status == "completed" and t.metric is not None and t.export_path]
    best = min(completed, key=lambda t: t.metric) if completed else None
    count = {s: sum(t.status == s for t in trials) for s in STATUSES}
    if best is not None:
        client.set_tag(parent, "sweep.best_trial", best.trial_id)
        client.set_tag(parent, "sweep.best_run_id", best.run_id or "")
        client.set_tag(parent, "sweep.best_config", tag_json(best.params))
        client.log_metric(parent, "best_" + METRIC, best.metric)
    summary = {
        "sweep_name": ctx["sweep_name"], "parent_run_id": parent, "experiment_id": ctx["experiment_id"],
        "n_trials": len(trials), "n_failed": count["failed"] + count["diverged"],  # errored + diverged
        "n_completed": count["completed"], "n_diverged": count["diverged"], "n_errored": count["failed"],
        "n_early_stopped": count["early_stopped"],
        "best_config": best.params if best else None, "best_metric": best.metric if best else None,
        "best_trial": best.trial_id if best else None, "best_run_id": best.run_id if best else None,
        "metric": METRIC, "mode": spec.mode, "registered_version": None,
        "searcher": spec.searcher, "asha": spec.asha.enabled, "asha_off_reason": spec.asha.off_reason,
        "plot": str(plot) if plot else None, "plot_artifact": plot_artifact,
        "ray_job_id": ray.get_runtime_context().get_job_id(), "storage": folder.root,
        "trials": [t.to_dict() for t in trials]}
    return summary, best


def _register_best(best: TrialOutcome, base: dict, split, data_fp: str, client, ctx: dict, log) -> dict:
    """Register the best trial's export (alias ``candidate``) and let it challenge the champion."""
    from metaprep.registry.promotion import compare_and_promote, verdict
    from metaprep.registry.register import KINDS, register_prepared
    from metaprep.train.launch import EXPORT_PARTS

    uri, parent = ctx["uri"], ctx["parent_run_id"]
    best_cfg = trial_config(base, best.params)
    final = {"meta_steps": best.final.get("meta_steps_done") or best_cfg.meta.meta_steps,
             "meta_val_loss_start": best.final.get("meta_val_loss_start", math.nan),
             "meta_val_loss_end": best.metric}
    with Storage(ctx["train_storage"]).local_dir(best.export_path, only=EXPORT_PARTS) as export:  # a copy if remote
        uris = register_prepared(uri, best.run_id, export, best_cfg, final, data_fp,
                                 json.dumps(dataclasses.asdict(best_cfg)))
        for kind in KINDS:
            client.set_model_version_tag(f"{best_cfg.registry.name}-{kind}", uris[f"{kind}_version"], "sweep",
                                         ctx["sweep_name"])
        comparison = compare_and_promote(uri, best_cfg, split, uris, export)
    promoted = bool(comparison["promoted"])
    log(f"metaprep: registered {best_cfg.registry.name}-base/-controller v{uris['base_version']} (alias candidate, "
        f"trial {best.trial_id}); {verdict(comparison)}")
    log(f"metaprep: meta-val episodes {comparison['metric']}; rule and history: python -m jobs.promote "
        f"--name {best_cfg.registry.name}")
    client.set_tag(parent, "sweep.registered_version", uris["base_version"])
    client.set_tag(parent, "sweep.promoted", str(promoted).lower())
    return {"registered_version": uris["base_version"], "base_uri": uris["base"], "controller_uri": uris["controller"],
            "controller_version": uris["controller_version"], "promoted": promoted,
            "champion_comparison": comparison}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
