"""Hyperparameter sweeps of meta-training on Ray Tune, one Ray Train run per trial.

Train-in-Tune (Ray Train V2): every trial is a Tune *function* (:func:`sweep_trial`) that builds the
same ``TorchTrainer`` as ``jobs.meta_train`` (:func:`metaprep.train.ray_job.build_trainer`) for its
sampled configuration and fits it; ``Tuner(trainer)`` is deprecated. The trial function only drives
the run, so it requests no CPU of its own; ``max_concurrent_trials`` is the number of trials whose
Train workers fit on the cluster at once.

How ASHA sees the meta-validation loss during training: a trial checkpoints at every
meta-validation (``checkpoint.every = meta.eval_every``) and the worker loop writes its history,
meta-val losses included, into each checkpoint (``trainer_state.json``).
:class:`MetaValReportCallback`, a Train ``UserCallback`` derived from Ray's ``TuneReportCallback``,
runs on the Train controller after each such report, reads that file from the persisted checkpoint
and forwards ``{meta_step, meta_val_loss}`` to the trial's Tune session. ASHA's time axis is
``meta_step``; its last rung lies below ``meta.meta_steps``, and the trial function reports the final
result itself once MLflow bookkeeping is done (a scheduler STOP on that report cannot cut it short).

MLflow: one parent run per sweep (search space, plot, summary), one child run per trial (tag
``mlflow.parentRunId``; the full trial configuration as params; the workers log the per-step
``meta_loss`` / ``meta_val_loss`` curves into it; tag ``sweep.status`` = completed | diverged |
early_stopped | failed). A trial whose loss becomes NaN/inf ends normally with status ``diverged``
and metric ``inf``; other trial errors are Tune trial errors; neither stops the sweep.

The best completed trial's export is registered (``NAME-base`` / ``NAME-controller``, alias
``candidate``). ``champion`` moves to it only if it beats the current champion on the same
meta-validation episodes: both models are evaluated here with the same code on the sweep recipe's
meta-val tasks (each with its own prepared inner-loop settings), the champion's score is recorded
as its version tag ``score.<metric key>`` and :func:`~metaprep.registry.register.promote_if_better`
records both scores (``champion_comparison``) and moves the alias.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from metaprep.config import MetaTrainConfig, apply_overrides, flatten, from_dict, load_yaml
from metaprep.errors import ConfigError, MetaprepError
from metaprep.tune.space import DEFAULT_SWEEP, METRIC, SweepSpec, parse_sweep, trial_config

STATUSES = ("completed", "diverged", "early_stopped", "failed")
TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes reserved for each trial's driver process (it needs no CPU)
_STATE_FILE = "trainer_state.json"  # written by metaprep.train.loop into every checkpoint


# --------------------------------------------------------------------------- recipe

def load_sweep_recipe(path: str | Path, overrides: list[str] | None = None,
                      num_samples: int | None = None) -> tuple[MetaTrainConfig, dict, SweepSpec]:
    """Read a recipe with an optional ``sweep:`` section.

    Returns the validated base configuration, the nested base recipe (what trials start from) and
    the sweep spec (:data:`~metaprep.tune.space.DEFAULT_SWEEP` when the recipe has none).
    ``--set sweep.KEY=VALUE`` overrides reach the sweep section like any other key.
    """
    data, lines = load_yaml(path)
    data = apply_overrides(data, list(overrides or []))
    raw_sweep = data.pop("sweep", None)
    cfg = from_dict(MetaTrainConfig, data, str(path), lines).validate()
    base = dataclasses.asdict(cfg)
    if num_samples is not None:
        raw_sweep = copy.deepcopy(DEFAULT_SWEEP) if raw_sweep is None else raw_sweep
        if isinstance(raw_sweep, dict):  # otherwise parse_sweep reports the malformed section
            raw_sweep = {**raw_sweep, "num_samples": num_samples}
    spec = parse_sweep(raw_sweep, base, str(path), lines, tracking_uri=cfg.tracking.uri)
    if spec.asha.enabled and cfg.meta.eval_every >= cfg.meta.meta_steps:
        # no meta-validation before the last step: nothing for ASHA to compare early
        spec.asha.enabled = False
    return cfg, base, spec


def max_concurrent_trials(resources: dict[str, float], cfg: MetaTrainConfig, spec: SweepSpec) -> int:
    """Trials whose Train workers fit on the cluster at once (at least 1, at most ``num_samples``)."""
    d = cfg.distributed
    kind, per_trial = ("GPU", d.num_workers) if d.use_gpu else ("CPU", d.num_workers * d.cpus_per_worker)
    total = float(resources.get(kind, 0.0))
    if total < per_trial:
        raise ConfigError(f"distributed: a trial needs {per_trial:g} {kind} ({d.num_workers} workers"
                          f"{'' if d.use_gpu else f' x {d.cpus_per_worker} CPUs'}) but the Ray cluster has "
                          f"{total:g}; lower distributed.num_workers / cpus_per_worker")
    n = max(1, int(total // per_trial))
    if spec.max_concurrent:
        n = min(n, spec.max_concurrent)
    return min(n, spec.num_samples)


# --------------------------------------------------------------------------- MLflow
# Client errors that a retry cannot fix (the rest: transport errors, a restarting server, 5xx).
_NO_RETRY = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
             "PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_STATE"}


class _Retrying:
    """An MlflowClient whose calls are retried with backoff for ``timeout_s`` (a trial must not die of a blip)."""

    def __init__(self, client, timeout_s: float = 120.0):
        self._client, self._timeout_s = client, timeout_s

    def __getattr__(self, name: str):
        method = getattr(self._client, name)

        def call(*args, **kwargs):
            from mlflow.exceptions import MlflowException

            deadline, delay = time.monotonic() + self._timeout_s, 1.0
            while True:
                try:
                    return method(*args, **kwargs)
                except MlflowException as exc:
                    if exc.error_code in _NO_RETRY or time.monotonic() > deadline:
                        raise
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(delay)
                delay = min(delay * 2, 15.0)

        return call


def mlflow_client(uri: str) -> _Retrying:
    from mlflow.tracking import MlflowClient

    return _Retrying(MlflowClient(tracking_uri=uri))


# --------------------------------------------------------------------------- inside a trial

def _finite_or_inf(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.inf
    return v if math.isfinite(v) else math.inf


class MetaValReportCallback(TuneReportCallback):
    """Forward the meta-val loss of every intermediate checkpoint to the trial's Tune session.

    Runs on the Ray Train controller; must be constructed inside a Tune trial. The final report of a
    diverged run carries no checkpoint, so Train V2's ``Result.metrics`` (the latest *checkpointed*
    report) never shows it: its meta-step is recorded on the trial's MLflow run instead.
    """

    def __init__(self, mlflow_run_id: str, tracking_uri: str):
        super().__init__()
        self.mlflow_run_id = mlflow_run_id
        self.tracking_uri = tracking_uri

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        m = metrics[0] if metrics else {}
        if "meta_val_loss_end" in m:  # the final report: the Tune function reports it after fit()
            if m.get("diverged_at") is not None:
                self._record_divergence(m["diverged_at"])
            return
        if checkpoint is None or "meta_step" not in m:
            return
        try:
            with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{_STATE_FILE}") as f:
                history = json.loads(f.read().decode())["history"]["meta_val_loss"]
        except (OSError, KeyError, ValueError):
            return  # no meta-val state in this checkpoint: nothing to compare
        step, value = history[-1]
        if step != m["meta_step"]:
            return
        self._training_actor_item_queue.put({
            "meta_step": int(step), METRIC: _finite_or_inf(value), "meta_loss": _finite_or_inf(m.get("meta_loss")),
            "mlflow_run_id": self.mlflow_run_id, "checkpoint_path": checkpoint.path})

    def _record_divergence(self, step: int) -> None:
        try:
            mlflow_client(self.tracking_uri).set_tag(self.mlflow_run_id, "sweep.diverged_at", str(step))
        except Exception:  # noqa: BLE001 - bookkeeping only: the trial still ends as diverged
            pass


def sweep_trial(params: dict, ctx: dict) -> None:
    """Tune function: meta-train one sampled configuration on Ray Train and report its meta-val loss."""
    import ray.tune
    from mlflow.entities import Param

    from metaprep.train.ray_job import build_trainer

    tctx = ray.tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    cfg = trial_config(ctx["base"], params, source=f"trial {trial_id}")
    client = mlflow_client(ctx["uri"])
    run_id = client.create_run(ctx["experiment_id"], run_name=trial_name, tags={
        "mlflow.parentRunId": ctx["parent_run_id"], "sweep.name": ctx["sweep_name"], "sweep.trial_id": trial_id,
        "sweep.status": "running", "sweep.params": json.dumps(params, sort_keys=True),
        "algorithm": cfg.algorithm}).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in flatten(dataclasses.asdict(cfg)).items()])

    trainer = build_trainer(cfg, f"{ctx['sweep_name']}-{trial_id}", ctx["train_storage"],
                            {"uri": ctx["uri"], "run_id": run_id})
    # build_trainer is shared with jobs.meta_train; the Tune-only callback is attached to its RunConfig here.
    trainer.run_config.callbacks.append(MetaValReportCallback(run_id, ctx["uri"]))
    try:
        result = trainer.fit()
    except BaseException as exc:
        reason = f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        client.set_tag(run_id, "sweep.status", "failed")
        client.set_tag(run_id, "sweep.error", reason[:4000])
        client.set_terminated(run_id, "FAILED")
        raise
    final = result.metrics or {}
    # Only an exported (checkpointed) final report reaches Result.metrics; a run that ends without one diverged.
    diverged = "meta_val_loss_end" not in final or final.get("diverged_at") is not None
    status = "diverged" if diverged else "completed"
    metric = math.inf if diverged else _finite_or_inf(final["meta_val_loss_end"])
    diverged_at = None
    if diverged:
        tag = client.get_run(run_id).data.tags.get("sweep.diverged_at")
        diverged_at = final.get("diverged_at") if final.get("diverged_at") is not None else tag
        diverged_at = int(diverged_at) if str(diverged_at).isdigit() else None
        client.set_tag(run_id, "sweep.error", f"meta-loss became NaN/inf at meta-step {diverged_at} "
                                              f"(meta.inner_lr={cfg.meta.inner_lr}, meta.outer_lr={cfg.meta.outer_lr})")
    else:
        client.log_metric(run_id, "meta_val_loss_final", metric)
    client.set_tag(run_id, "sweep.status", status)
    client.set_terminated(run_id, "FAILED" if diverged else "FINISHED")
    ray.tune.report({
        "meta_step": cfg.meta.meta_steps, METRIC: metric, "status": status, "mlflow_run_id": run_id,
        "diverged_at": diverged_at, "meta_steps_done": final.get("meta_steps"),
        "meta_val_loss_start": _finite_or_inf(final.get("meta_val_loss_start")),
        "meta_val_loss_end": metric,
        "export_path": result.checkpoint.path if (result.checkpoint and not diverged) else None})


# --------------------------------------------------------------------------- driver

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


def plot_sweep(trials: list[TrialOutcome], spec: SweepSpec, path: Path) -> Path | None:
    """Scatter of the two swept learning rates (or the first two numeric keys), coloured by meta-val loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [k for k, p in spec.space.items() if p.numeric]
    axes = [k for k in ("meta.inner_lr", "meta.outer_lr") if k in spec.space] or numeric[:2]
    axes += [k for k in numeric if k not in axes][: 2 - len(axes)]
    if not axes or not trials:
        return None
    xk = axes[0]
    yk = axes[1] if len(axes) > 1 else None

    def coord(t: TrialOutcome, k: str | None, i: int) -> float:
        return float(t.params.get(k, math.nan)) if k else float(i)

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    scored = [(i, t) for i, t in enumerate(trials) if t.metric is not None and t.status in ("completed",
                                                                                           "early_stopped")]
    sc = None
    if scored:
        values = [t.metric for _, t in scored]
        for status, marker in (("completed", "o"), ("early_stopped", "s")):
            pts = [(i, t) for i, t in scored if t.status == status]
            if pts:
                sc = ax.scatter([coord(t, xk, i) for i, t in pts], [coord(t, yk, i) for i, t in pts],
                                c=[t.metric for _, t in pts], cmap="viridis_r", vmin=min(values), vmax=max(values),
                                marker=marker, s=70, edgecolors="k", linewidths=0.5,
                                label="completed" if status == "completed" else "stopped early (ASHA)")
    for status, marker, color in (("diverged", "x", "red"), ("failed", "X", "grey")):
        pts = [(i, t) for i, t in enumerate(trials) if t.status == status]
        if pts:
            ax.scatter([coord(t, xk, i) for i, t in pts], [coord(t, yk, i) for i, t in pts], marker=marker,
                       c=color, s=70, label=status)
    best = [t for _, t in scored if t.status == "completed"]
    if best:
        b = min(best, key=lambda t: t.metric)
        ax.scatter([coord(b, xk, trials.index(b))], [coord(b, yk, trials.index(b))], marker="*", s=320,
                   facecolors="none", edgecolors="crimson", linewidths=1.5, label="best")
    if sc is not None:
        fig.colorbar(sc, ax=ax, label=f"{METRIC} (lower is better)")
    ax.set_xlabel(xk)
    ax.set_ylabel(yk or "trial")
    if spec.space[xk].numeric and all(float(v) > 0 for v in spec.space[xk].probe_values()):
        ax.set_xscale("log")
    if yk and spec.space[yk].numeric and all(float(v) > 0 for v in spec.space[yk].probe_values()):
        ax.set_yscale("log")
    ax.set_title(f"sweep: {len(trials)} trials")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


def val_set_key(cfg: MetaTrainConfig, split) -> str:
    """Names the meta-validation episodes (tasks, shots, query size, seed): scores are comparable iff equal."""
    from metaprep.tasks.base import fingerprint

    ident = json.dumps([fingerprint(split.val[: cfg.meta.eval_tasks]), cfg.tasks.shots, cfg.tasks.query_size,
                        cfg.tasks.seq_len, cfg.seed])
    return f"{METRIC}.valset-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def score_prepared(base_dir: Path, ctrl_dir: Path, cfg: MetaTrainConfig, split) -> float:
    """Meta-val loss of a prepared model on the recipe's meta-val episodes, adapted with its own inner settings."""
    import torch

    from metaprep.registry.artifacts import load_prepared
    from metaprep.tasks.base import fixed_episodes, make_batch
    from metaprep.train.loop import evaluate

    model, loaded, own = load_prepared(base_dir, ctrl_dir)
    eps = fixed_episodes(split.val[: cfg.meta.eval_tasks], cfg.tasks.shots, cfg.tasks.query_size, cfg.seed)
    support = make_batch(eps, "support", loaded.tokenizer, cfg.tasks.seq_len)
    query = make_batch(eps, "query", loaded.tokenizer, cfg.tasks.seq_len)
    torch.manual_seed(cfg.seed)
    return float(evaluate(model, own, support, query))


def compare_and_promote(uri: str, cfg: MetaTrainConfig, split, uris: dict, export: Path) -> dict:
    """Score candidate and champion on the same meta-val episodes; move ``champion`` if the candidate wins."""
    from mlflow.exceptions import MlflowException

    from metaprep.registry.register import promote_if_better
    from metaprep.registry.resolve import resolve_artifact

    client = mlflow_client(uri)
    name = cfg.registry.name
    key = val_set_key(cfg, split)
    version = uris["base_version"]
    candidate = score_prepared(export / "base", export / "controller", cfg, split)
    try:
        champion = client.get_model_version_by_alias(f"{name}-base", "champion")
    except MlflowException:
        champion = None
    record: dict[str, Any] = {"metric": key, "candidate": candidate, "candidate_version": version,
                              "champion": None, "champion_version": champion.version if champion else None}
    if champion is not None:
        try:
            champ_score = score_prepared(resolve_artifact(f"models:/{name}-base@champion", uri),
                                         resolve_artifact(f"models:/{name}-controller@champion", uri), cfg, split)
        except Exception as exc:  # noqa: BLE001 - any load/eval failure: keep the champion, record why
            reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
            record.update(promoted=False, error=f"champion could not be evaluated ({reason})")
            for kind in ("base", "controller"):
                client.set_model_version_tag(f"{name}-{kind}", uris[f"{kind}_version"], "champion_comparison",
                                             json.dumps(record))
            return record
        record["champion"] = champ_score
        for kind in ("base", "controller"):  # the champion's score on these episodes, for promote_if_better
            client.set_model_version_tag(f"{name}-{kind}", champion.version, f"score.{key}", f"{champ_score:.6g}")
    if uris["base_version"] != uris["controller_version"]:
        # promote_if_better tags and moves one version number in both models; refuse to touch a wrong version
        record.update(promoted=False, error=f"base version {uris['base_version']} != controller version "
                                            f"{uris['controller_version']}; champion not moved")
        for kind in ("base", "controller"):
            client.set_model_version_tag(f"{name}-{kind}", uris[f"{kind}_version"], "champion_comparison",
                                         json.dumps(record))
        return record
    record["promoted"] = promote_if_better(uri, name, version, candidate, metric=key)
    return record


def _absolute_paths(base: dict) -> dict:
    """Relative data/model paths of the recipe made absolute: Tune runs each trial in its own folder."""
    for section, key in (("model", "path"), ("tasks", "path"), ("tasks", "data_dir")):
        value = base.get(section, {}).get(key)
        if not isinstance(value, str) or value in ("", "tiny") or ":" in value:  # keywords and pypi:/URIs
            continue
        if not os.path.isabs(value) and Path(value).exists():
            base[section][key] = str(Path(value).resolve())
    return base


def run_sweep(cfg: MetaTrainConfig, base: dict, spec: SweepSpec, state_dir: Path, log=print) -> dict:
    """Run the sweep on the connected (or local) Ray cluster and return the summary dict.

    ``best_config`` is None when no trial completed with a finite metric (nothing is registered then).
    """
    t0 = time.perf_counter()
    from metaprep.registry.tracking import check_reachable, tracking_uri

    uri = tracking_uri(cfg.tracking.uri)
    check_reachable(uri)

    # Validate data and model once on the driver: a bad recipe fails here, not in N trials.
    from metaprep.meta.build import build_meta_model
    from metaprep.tasks.base import fingerprint
    from metaprep.train.loop import load_split

    split = load_split(cfg)
    build_meta_model(cfg, num_train_tasks=len(split.train))
    data_fp = fingerprint(split.train + split.val + split.test)
    _searcher(spec)  # a missing optional searcher fails here, before any run is created
    base = _absolute_paths(copy.deepcopy(base))

    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False, runtime_env={"env_vars": {
                "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
                # MLflow's telemetry thread edits os.environ while request threads read it (a KeyError
                # '_MLFLOW_TELEMETRY_SESSION_ID' failed a trial's log_batch); it has no network here anyway.
                "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true")}})
        except ConnectionError as exc:
            raise MetaprepError(f"cannot connect to the Ray cluster ({str(exc).splitlines()[0]}); start it with "
                                f"`make up` or set RAY_ADDRESS") from None
    concurrent = max_concurrent_trials(ray.cluster_resources(), cfg, spec)

    import mlflow
    from mlflow.entities import Param

    storage = Path(cfg.checkpoint.storage_path or state_dir / "ray_results").resolve()
    sweep_name = f"{cfg.registry.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    client = mlflow_client(uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment(cfg.tracking.experiment)
    parent = client.create_run(exp.experiment_id, run_name=sweep_name, tags={
        "sweep": "true", "sweep.name": sweep_name, "sweep.searcher": spec.searcher, "sweep.metric": METRIC,
        "algorithm": cfg.algorithm, "ray_run_name": sweep_name}).info.run_id
    log(f"metaprep: sweep {sweep_name} (MLflow parent run {parent}) -> {uri}")
    try:
        params = {f"base.{k}": v for k, v in flatten(base).items() if k not in spec.space}
        params.update({"sweep.num_samples": spec.num_samples, "sweep.searcher": spec.searcher,
                       "sweep.seed": spec.seed, "sweep.max_concurrent_trials": concurrent,
                       "sweep.asha": json.dumps(dataclasses.asdict(spec.asha)),
                       **{f"sweep.space.{k}": json.dumps(p.to_dict()) for k, p in spec.space.items()}})
        if spec.recommender is not None:
            params["sweep.recommender.surrogate"] = spec.recommender.surrogate
        client.log_batch(parent, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        client.log_dict(parent, spec.to_dict(), "sweep.json")
        client.log_dict(parent, base, "base_config.json")
        if spec.recommender is not None:  # the transfer recommender's portfolio, with its predictions
            client.log_dict(parent, {**dataclasses.asdict(spec.recommender), "portfolio": spec.recommended},
                            "recommended_portfolio.json")
            log("metaprep: recommended portfolio (predicted normalised performance): " + "; ".join(
                f"{' '.join(f'{k}={_fmt(v)}' for k, v in r['params'].items())} ({r['predicted_performance']:.3f})"
                for r in spec.recommended))
        summary = _tune_and_register(cfg, base, spec, concurrent, split, data_fp, uri, client,
                                     exp.experiment_id, parent, sweep_name, storage, log)
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    for k in ("n_trials", "n_failed", "n_diverged", "n_early_stopped", "wall_s"):
        client.log_metric(parent, k, summary[k])
    client.log_dict(parent, summary, "sweep_summary.json")
    client.set_terminated(parent, "FINISHED" if summary["best_config"] is not None else "FAILED")
    return summary


def _tune_and_register(cfg: MetaTrainConfig, base: dict, spec: SweepSpec, concurrent: int, split, data_fp: str,
                       uri: str, client, experiment_id: str, parent: str, sweep_name: str, storage: Path,
                       log) -> dict:
    import ray
    from ray import tune
    from ray.tune.search import Searcher

    search_alg = _searcher(spec, concurrent)

    ctx = {"base": base, "uri": uri, "experiment_id": experiment_id, "parent_run_id": parent,
           "sweep_name": sweep_name, "train_storage": str(storage / sweep_name / "train")}
    scheduler = None
    if spec.asha.enabled:
        from ray.tune.schedulers import ASHAScheduler

        grace = min(spec.asha.grace_period or cfg.meta.eval_every, cfg.meta.meta_steps)
        scheduler = ASHAScheduler(time_attr="meta_step", max_t=cfg.meta.meta_steps, grace_period=grace,
                                  reduction_factor=spec.asha.reduction_factor)
    log(f"metaprep: {spec.num_samples} trials, up to {concurrent} at once, searcher {spec.searcher}, "
        f"ASHA {'on' if scheduler else 'off'}; Tune results under {storage / sweep_name}")
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
        run_config=tune.RunConfig(name=sweep_name, storage_path=str(storage), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    grid = tuner.fit()

    children = {r.data.tags.get("sweep.trial_id"): r for r in client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=10000)}
    trials = _outcomes(grid, children)
    for t in trials:
        _reconcile_child_run(client, children.get(t.trial_id), t)
    for t in trials:
        shown = "-" if t.metric is None else f"{t.metric:.4f}"
        log(f"  {t.trial_id}  {t.status:<13} {METRIC}={shown:<8} "
            + " ".join(f"{k}={_fmt(v)}" for k, v in t.params.items()) + (f"  ({t.error})" if t.error else ""))

    plot = plot_sweep(trials, spec, storage / sweep_name / "sweep_lr.png")
    if plot is not None:
        client.log_artifact(parent, str(plot))

    completed = [t for t in trials if t.status == "completed" and t.metric is not None and t.export_path]
    best = min(completed, key=lambda t: t.metric) if completed else None
    count = {s: sum(t.status == s for t in trials) for s in STATUSES}
    summary: dict[str, Any] = {
        "sweep_name": sweep_name, "parent_run_id": parent, "experiment_id": experiment_id,
        "n_trials": len(trials), "n_failed": count["failed"] + count["diverged"],  # errored + diverged
        "n_completed": count["completed"], "n_diverged": count["diverged"], "n_errored": count["failed"],
        "n_early_stopped": count["early_stopped"],
        "best_config": best.params if best else None, "best_metric": best.metric if best else None,
        "best_trial": best.trial_id if best else None, "best_run_id": best.run_id if best else None,
        "metric": METRIC, "mode": spec.mode, "registered_version": None, "max_concurrent_trials": concurrent,
        "searcher": spec.searcher, "asha": scheduler is not None, "data_fingerprint": data_fp,
        "ray_job_id": ray.get_runtime_context().get_job_id(), "storage": str(storage / sweep_name),
        "trials": [t.to_dict() for t in trials]}
    if best is None:
        return summary
    client.set_tag(parent, "sweep.best_trial", best.trial_id)
    client.set_tag(parent, "sweep.best_run_id", best.run_id or "")
    client.set_tag(parent, "sweep.best_config", json.dumps(best.params, sort_keys=True))
    client.log_metric(parent, "best_" + METRIC, best.metric)
    if not cfg.registry.register:
        return summary

    from metaprep.registry.register import register_prepared

    best_cfg = trial_config(base, best.params)
    final = {"meta_steps": best.final.get("meta_steps_done") or best_cfg.meta.meta_steps,
             "meta_val_loss_start": best.final.get("meta_val_loss_start", math.nan),
             "meta_val_loss_end": best.metric}
    export = Path(best.export_path)
    uris = register_prepared(uri, best.run_id, export, best_cfg, final, data_fp,
                             json.dumps(dataclasses.asdict(best_cfg)))
    for kind in ("base", "controller"):
        client.set_model_version_tag(f"{cfg.registry.name}-{kind}", uris[f"{kind}_version"], "sweep", sweep_name)
    comparison = compare_and_promote(uri, best_cfg, split, uris, export)
    summary.update(registered_version=uris["base_version"], base_uri=uris["base"],
                   controller_uri=uris["controller"], controller_version=uris["controller_version"],
                   promoted=bool(comparison.get("promoted")), champion_comparison=comparison)
    client.set_tag(parent, "sweep.registered_version", uris["base_version"])
    client.set_tag(parent, "sweep.promoted", str(bool(comparison.get("promoted"))).lower())
    return summary


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
