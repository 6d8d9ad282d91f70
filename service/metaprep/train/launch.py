"""Launch a meta-training run: its MLflow run, the Ray Train fit, its final status and registration.

``jobs.meta_train`` is :func:`launch_meta_training`. Each sweep trial (:mod:`metaprep.tune.trial`)
runs the same pieces under its sweep's parent run, without registering: :func:`start_run` (the
MLflow run with the full configuration as params), :func:`fit` (``build_trainer`` + ``fit``, the run
marked ``FAILED`` if it raises), :attr:`FitResult.diverged` and :attr:`FitResult.learned_nothing`.
The sweep driver shares :func:`check_inputs`, :func:`init_ray`, :func:`check_cluster_fits`, :func:`storage_root`
and :func:`new_run_name`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaprep.config import MetaTrainConfig, flatten
from metaprep.errors import ConfigError, MetaprepError, TrainingDivergedError
from metaprep.runtime import quiet_env, use_loopback_ray, use_stack_token
from metaprep.train.storage import Storage, credentials_env

EXPORT_PARTS = ("base", "controller")  # what registration reads of the final checkpoint
RUN_FILE = "metaprep_run.json"  # {run_id, tracking_uri}: how --resume finds the MLflow run of a Ray run
STATUS_FILE = "metaprep_final.json"  # the final metrics, written by the rank-0 worker (a diverged run included)


def _say(message: str) -> None:
    print(message, flush=True)


def _names(tasks, most: int = 5) -> str:
    names = [t.name for t in tasks]
    return ", ".join(names[:most]) + (f", ... ({len(names) - most} more)" if len(names) > most else "") or "-"


STATE_ENV = "METAPREP_STATE_DIR"
CHECKOUT = Path(__file__).resolve().parents[3]  # the repository holding service/metaprep/train/launch.py


def state_dir() -> Path:
    """The one local state folder (Ray results of runs and sweeps by default; ``make up``'s servers keep their
    database, artifacts and logs there too), the same whichever folder a job is started from:

    1. ``$METAPREP_STATE_DIR`` (``make`` and ``cluster/stack.sh`` set it, and Ray workers get the driver's);
    2. else ``.state/`` of the project checkout the code runs from: the folder ``make up`` and the README use
       (a copy Ray unpacked for one job is no checkout: it is deleted with the job);
    3. else ``~/.metaprep`` (an installed package, a container image).
    """
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV]).expanduser()
    if (CHECKOUT / ".git").exists() and "runtime_resources" not in CHECKOUT.parts:
        return CHECKOUT / ".state"
    return Path.home() / ".metaprep"


STORAGE_ENV = "METAPREP_STORAGE_PATH"  # a cluster's shared storage, set once for every job (cluster/*.yaml)


def storage_root(cfg: MetaTrainConfig) -> Storage:
    """Where ``cfg``'s runs live: ``checkpoint.storage_path`` (a folder or a URI), else ``$METAPREP_STORAGE_PATH``,
    else the state folder's ``ray_results`` (one machine)."""
    return Storage.of(cfg.checkpoint.storage_path or os.environ.get(STORAGE_ENV) or state_dir() / "ray_results")


def new_run_name(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def check_inputs(cfg: MetaTrainConfig) -> tuple[Any, str]:
    """Load the task split and build the model once on the driver, so bad data or a bad model fails here
    with one line instead of in a worker. Returns the split and the data fingerprint (registry lineage)."""
    from metaprep.meta.build import build_learner, build_meta_model
    from metaprep.tasks.base import fingerprint
    from metaprep.train.loop import load_split

    split = load_split(cfg)
    _say(f"tasks ({cfg.tasks.family}): {len(split.train)} meta-train, {len(split.val)} meta-val, {len(split.test)} "
         f"meta-test; meta-val: {_names(split.val)}; meta-test: {_names(split.test)}")
    model, _ = build_meta_model(cfg)
    check_context(cfg, model.lm)
    build_learner(cfg, model, num_train_tasks=len(split.train))  # the algorithm's own state (Meta-LoRA adapters)
    return split, fingerprint(split.train + split.val + split.test)


def check_context(cfg: MetaTrainConfig, lm: Any) -> None:
    """``tasks.seq_len`` within the model's context (learned positions would index past their table in a worker)."""
    config = getattr(lm, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(context, int) and cfg.tasks.seq_len > context:
        raise ConfigError(f"tasks.seq_len: must be <= the model's context of {context} tokens "
                          f"({cfg.model.path}), got {cfg.tasks.seq_len}")


def check_cluster_fits(cfg: MetaTrainConfig, resources: dict[str, float], what: str = "the run") -> tuple[float, float]:
    """(cluster total, one run's need) of the resource the Train workers ask for; a need the cluster can never
    grant is refused here (Ray would otherwise wait for it forever). ``resources``: ``ray.cluster_resources()``."""
    d = cfg.distributed
    kind, need = ("GPU", d.num_workers) if d.use_gpu else ("CPU", d.num_workers * d.cpus_per_worker)
    total = float(resources.get(kind, 0.0))
    if total < need:
        raise ConfigError(f"distributed: {what} needs {need:g} {kind} ({d.num_workers} workers"
                          f"{'' if d.use_gpu else f' x {d.cpus_per_worker} CPUs'}) but the Ray cluster has "
                          f"{total:g}; lower distributed.num_workers / cpus_per_worker")
    return total, float(need)


def worker_runtime_env() -> dict:
    """The job-level runtime env of every Ray worker this driver starts (Train workers, Tune trials): the
    ``metaprep`` package shipped by Ray (``py_modules``: uploaded to the cluster once per content, unpacked on
    every node that runs a worker, so a node needs the image's packages but no copy of this checkout), the
    third-party output turned off (:func:`metaprep.runtime.quiet_env`), the storage credentials (Ray Train's
    controller and every worker open the run storage) and the state folder. A task's or actor's
    own ``env_vars`` (Ray Train's ``worker_runtime_env``) are merged into these."""
    import metaprep

    return {"py_modules": [str(Path(metaprep.__file__).resolve().parent)], "env_vars": {
        **quiet_env(), **credentials_env(), STATE_ENV: str(state_dir())}}


def without_the_jobs_own(env: dict) -> dict:
    """``env`` (a driver's runtime env) less the fields and env vars that the submitted job's own runtime env
    already sets for every worker (``ray job submit --runtime-env-json``): Ray refuses a driver runtime env that
    repeats any of them, and the user's choice is the one to keep."""
    try:
        job = (json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {})
    except (ValueError, AttributeError):
        return env
    out = {k: v for k, v in env.items() if k == "env_vars" or k not in job}
    out["env_vars"] = {k: v for k, v in env.get("env_vars", {}).items() if k not in (job.get("env_vars") or {})}
    return out


def init_ray(log_to_driver: bool) -> None:
    """Connect to ``$RAY_ADDRESS`` (or start a local Ray) unless connected; workers import ``service/``."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if use_loopback_ray(address) or not address:  # a cluster on this machine, or a new local one
        use_stack_token(state_dir())
    if address and address.startswith(("http://", "https://")):
        # the dashboard URL `make up` prints is for `ray job submit`; a driver finds the cluster itself
        # (ray.init("auto") would read the URL back from the environment and refuse it)
        os.environ.pop("RAY_ADDRESS")
        address = "auto"
    try:
        # Ray's INFO lines ("Started a local Ray instance") would sit on stderr beside a job's one-line error
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=without_the_jobs_own(worker_runtime_env()),
                 logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise MetaprepError(f"cannot connect to the Ray cluster ({str(exc).splitlines()[0]}); start it with "
                            f"`make up` or set RAY_ADDRESS") from None


def connect_ray(cfg: MetaTrainConfig, log_to_driver: bool) -> dict[str, float]:
    """:func:`init_ray`, then refuse a run whose workers the cluster can never place; returns its resources."""
    import ray

    init_ray(log_to_driver)
    resources = ray.cluster_resources()
    check_cluster_fits(cfg, resources)
    d = cfg.distributed
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if d.placement_strategy == "STRICT_SPREAD" and nodes < d.num_workers:
        _say(f"metaprep: distributed.placement_strategy=STRICT_SPREAD places one worker per node: "
             f"{d.num_workers} workers, {nodes} node(s) now; the run waits until the cluster has {d.num_workers}")
    return resources


@dataclass
class TrainingRun:
    """One Ray Train run (``storage/name``) and the MLflow run its workers log into."""

    cfg: MetaTrainConfig
    name: str
    storage: Storage  # the storage root; the run is its folder ``name``
    uri: str
    run_id: str
    client: Any  # metaprep.registry.client.RetryingClient

    def has_checkpoint(self) -> bool:
        return any(n.startswith("checkpoint_") for n in self.storage.names(self.name))


def start_run(cfg: MetaTrainConfig, uri: str, name: str, storage: Storage, *, experiment_id: str | None = None,
              run_name: str | None = None, tags: dict[str, str] | None = None) -> TrainingRun:
    """Create the MLflow run of a new training run (``experiment_id``: default ``cfg.tracking.experiment``),
    log the whole configuration as params and record the run id next to the Ray run (for ``--resume``)."""
    from metaprep.registry.client import experiment_id as find_experiment
    from metaprep.registry.client import log_params, mlflow_client

    client = mlflow_client(uri)
    experiment_id = experiment_id or find_experiment(uri, cfg.tracking.experiment)
    run_id = client.create_run(experiment_id, run_name=run_name or name, tags={
        "algorithm": cfg.algorithm, "ray_run_name": name, **(tags or {})}).info.run_id
    log_params(client, run_id, flatten(dataclasses.asdict(cfg)))
    run = TrainingRun(cfg, name, storage, uri, run_id, client)
    storage.write_json({"run_id": run_id, "tracking_uri": uri}, name, RUN_FILE)
    return run


def reopen_run(cfg: MetaTrainConfig, uri: str, name: str, storage: Storage) -> TrainingRun:
    """The stopped run ``name`` under ``storage``, to continue from its latest checkpoint."""
    from metaprep.registry.client import mlflow_client, run_exists

    try:
        record = storage.read_json(name, RUN_FILE)
    except ValueError:
        record = {}
    except OSError as exc:  # the storage itself: an endpoint down, no permission
        raise MetaprepError(f"--resume {name}: cannot read {storage.uri(name, RUN_FILE)} "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if record is None:
        raise MetaprepError(f"--resume {name}: no such run under {storage} (run names are printed at start "
                            f"and stored in the summary JSON)")
    try:
        run_id = str(record["run_id"])
    except (KeyError, TypeError):
        raise MetaprepError(f"--resume {name}: {storage.uri(name, RUN_FILE)} is unreadable or has no "
                            f"run_id") from None
    client = mlflow_client(uri)
    if not run_exists(client, run_id):
        raise MetaprepError(f"--resume {name}: its MLflow run {run_id} is not in the tracking store {uri}; "
                            f"resume against the store it was started with")
    return TrainingRun(cfg, name, storage, uri, run_id, client)


@dataclass
class FitResult:
    final: dict  # the worker loop's final metrics (meta_steps, meta_val_loss_start/_end/_curve, diverged_at)
    # the final checkpoint (the exported base/ and controller/), relative to the storage root; None when diverged
    export: str | None

    @property
    def diverged(self) -> bool:
        # only a completed run reports meta_val_loss_end; a diverged one reports where it stopped
        return "meta_val_loss_end" not in self.final or self.final.get("diverged_at") is not None

    @property
    def learned_nothing(self) -> str | None:
        """Why a completed run that meta-trained learned nothing (``None`` if it learned): every outer step left
        the weights unchanged, or meta-validation never moved by a finite amount (every evaluation equal or
        non-finite) — e.g. ``meta.inner_lr=1e12`` saturates every output at the uniform loss."""
        steps = self.final.get("meta_steps") or 0  # 0: the algorithm does not meta-train (finetune)
        if not steps:
            return None
        if self.final.get("no_update_steps", 0) >= steps:
            return f"all {steps} outer steps left the weights unchanged (meta-gradient norm 0)"
        curve = [v for _, v in self.final.get("meta_val_curve", [])]
        finite = {v for v in curve if math.isfinite(v)}
        if len(finite) <= 1:
            value = f"{next(iter(finite)):.6g}" if finite else "non-finite"
            return f"meta-val loss never changed ({value} at all {len(curve)} evaluations)"
        return None


def divergence(cfg: MetaTrainConfig, step: Any) -> str:
    """What went wrong in a diverged run, in one line."""
    return (f"meta-loss became NaN/inf at meta-step {step} (meta.inner_lr={cfg.meta.inner_lr}, "
            f"meta.outer_lr={cfg.meta.outer_lr})")


def fit(run: TrainingRun, callbacks: Sequence[Any] = ()) -> FitResult:
    """Build the Ray Train trainer of ``run`` (``callbacks`` added to its RunConfig) and fit it.

    If the fit raises, the MLflow run is marked ``FAILED`` and the error re-raised.
    """
    from metaprep.train.ray_job import build_trainer

    status = (run.name, STATUS_FILE)
    if run.storage.exists(*status):
        run.storage.fs.delete_file(run.storage.path(*status))
    trainer = build_trainer(run.cfg, run.name, run.storage, {"uri": run.uri, "run_id": run.run_id},
                            (run.storage.root, "/".join(status)))
    trainer.run_config.callbacks.extend(callbacks)
    try:
        ray_result = trainer.fit()
    except BaseException:
        run.client.set_terminated(run.run_id, "FAILED")
        raise
    # Ray returns the metrics of the last *checkpointed* report, and a diverged run's final report has no
    # checkpoint: the rank-0 worker wrote them to the run's storage, from whichever node it ran on
    final = run.storage.read_json(*status) or dict(ray_result.metrics or {})
    result = FitResult(final, None)
    if not result.diverged and ray_result.checkpoint is not None:
        result.export = run.storage.relative(ray_result.checkpoint.path)
    return result


def discard(run: TrainingRun, *, fresh: bool) -> None:
    """A run that failed for a reason the user must fix: its MLflow run ``FAILED`` and, when this job created
    it (not ``--resume``) and it holds no checkpoint to resume from, its Ray results folder removed."""
    run.client.set_terminated(run.run_id, "FAILED")
    if fresh and not run.has_checkpoint():
        with contextlib.suppress(OSError):
            run.storage.remove(run.name)


def user_error(exc: BaseException) -> MetaprepError | None:
    """Find a MetaprepError raised inside a Ray worker (wrapped in Ray's exception types)."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if isinstance(e, MetaprepError):
            return e
        for attr in ("cause", "__cause__", "__context__"):
            stack.append(getattr(e, attr, None))
        stack.extend(getattr(e, "worker_failures", {}).values() if hasattr(e, "worker_failures") else [])
    return None


def worker_crash(exc: BaseException) -> str | None:
    """One line for an unexpected exception inside a Ray Train worker (or Ray itself); None for the driver's own."""
    failures = getattr(exc, "worker_failures", None) or {}
    if failures:
        rank, error = min(failures.items(), key=lambda item: item[0])
        root = getattr(error, "cause", None) or error
        return f"Ray Train worker {rank} failed: {type(root).__name__}: {_first_line(root)}"
    if type(exc).__module__.split(".")[0] == "ray":
        return f"Ray Train failed: {type(exc).__name__}: {_first_line(exc)}"
    return None


def _first_line(exc: BaseException, limit: int = 300) -> str:
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def launch_meta_training(cfg: MetaTrainConfig, *, resume: str | None = None,
                         log: Callable[[str], None] = _say) -> dict:
    """Meta-train ``cfg`` on Ray Train, tracked in MLflow, and register ``NAME-base`` / ``NAME-controller``
    (alias ``candidate``) when ``cfg.registry.register``. Returns the run summary.

    ``resume``: the name of a stopped run, continued from its latest checkpoint into the same MLflow run.
    A worker's user error (bad data, failed checkpoint write) is raised as that one-line error; a run whose
    loss became NaN/inf raises :class:`TrainingDivergedError` and registers nothing.
    """
    from metaprep.registry.tracking import reachable_tracking_uri

    t0 = time.perf_counter()
    uri = reachable_tracking_uri(cfg.tracking.uri)  # fail in seconds, before any training
    _, data_fp = check_inputs(cfg)
    storage = storage_root(cfg)
    run = reopen_run(cfg, uri, resume, storage) if resume else None
    connect_ray(cfg, log_to_driver=True)  # a need the cluster can never grant is refused before any run exists
    run = run or start_run(cfg, uri, new_run_name(cfg.registry.name), storage)
    log(f"metaprep: run {run.name} (MLflow run {run.run_id}) -> {uri}")
    try:
        result = fit(run)
    except Exception as exc:  # Ray wraps worker errors; surface the user-facing cause as one line
        cause = exc if isinstance(exc, MetaprepError) else user_error(exc)
        crash = None if cause is not None else worker_crash(exc)
        if cause is None and crash is None:  # the driver itself failed: its traceback is the report
            run.client.set_terminated(run.run_id, "FAILED")
            raise
        discard(run, fresh=not resume)
        if cause is None:
            kept = (f"; continue from its last checkpoint with --resume {run.name}" if run.storage.exists(run.name)
                    else "")
            cause = MetaprepError(f"{crash} (its traceback is in the worker log above and in `ray job logs`); the "
                                  f"MLflow run {run.run_id} is marked FAILED{kept}")
        raise cause from None
    final = result.final
    if result.diverged:
        discard(run, fresh=not resume)
        raise TrainingDivergedError(f"{divergence(cfg, final.get('diverged_at'))}; lower the learning rates. "
                                    f"Nothing was registered.")
    if result.learned_nothing:
        discard(run, fresh=not resume)
        raise TrainingDivergedError(f"the run learned nothing: {result.learned_nothing} (meta.inner_lr="
                                    f"{cfg.meta.inner_lr}, meta.outer_lr={cfg.meta.outer_lr}); check the learning "
                                    f"rates. Nothing was registered.")
    summary = {"run_id": run.run_id, "run_name": run.name, "meta_steps": final["meta_steps"],
               "meta_val_loss_start": final["meta_val_loss_start"], "meta_val_loss_end": final["meta_val_loss_end"],
               "meta_val_curve": final["meta_val_curve"], "selected_step": final.get("selected_step"),
               "stopped_early_at_step": final.get("stopped_early_at_step"),
               "algorithm": cfg.algorithm,
               "reparam": cfg.reparam.kind, "data_fingerprint": data_fp}
    config = dataclasses.asdict(cfg)
    run.client.log_dict(run.run_id, config, "config.json")
    if cfg.registry.register:
        from metaprep.registry.register import register_prepared

        with run.storage.local_dir(result.export, only=EXPORT_PARTS) as export:  # a copy when the storage is remote
            uris = register_prepared(uri, run.run_id, export, cfg, final, data_fp, json.dumps(config))
        summary.update(base_uri=uris["base"], controller_uri=uris["controller"],
                       base_version=uris["base_version"], controller_version=uris["controller_version"])
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    run.client.log_metric(run.run_id, "wall_s", summary["wall_s"])
    run.client.set_terminated(run.run_id, "FINISHED")
    return summary
