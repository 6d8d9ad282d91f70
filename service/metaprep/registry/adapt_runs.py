"""The adapt-run contract: what one adaptation (``jobs.adapt``) logs to MLflow, and how it is read back.

Every adaptation is a run of the experiment :data:`ADAPT_EXPERIMENT`: these runs are the meta-dataset
the configuration recommender learns from (:func:`metaprep.transfer.formats.read_mlflow_adapt_runs`).
Per run:

- params ``config.*``: the adaptation configuration (``config.lr``, ``config.steps``, ``config.shots``,
  ``config.rank``, ``config.reparam``, ...); params (or tags) ``meta_feature.*``: numeric task
  meta-features; param (or tag) ``task``, else tag ``dataset``: the task's id;
- metric ``query_loss`` at ``step`` = adaptation step (the learning curve), ``final_query_loss`` and
  ``cost_s`` (seconds);
- free-form extras (params ``base``/``controller``, other metrics, artifacts) that readers ignore.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaprep.errors import DataError

ADAPT_EXPERIMENT = "metaprep-adapt"
CONFIG = "config."
META_FEATURE = "meta_feature."
CURVE = "query_loss"
FINAL = "final_query_loss"
COST = "cost_s"


@dataclass
class AdaptRun:
    """One adaptation run in the contract's terms (values as logged: readers parse them)."""

    task: str | None  # the task (dataset) id; None: the reader derives one
    config: dict[str, Any]  # without the ``config.`` prefix
    meta_features: dict[str, Any]
    curve: list[float]  # query loss per adaptation step (finite values, step order)
    final_loss: float | None = None
    cost_s: float | None = None
    run_id: str = ""
    extra_params: dict[str, Any] = field(default_factory=dict)
    extra_metrics: dict[str, float] = field(default_factory=dict)


def log_adapt_run(uri: str, run: AdaptRun, run_name: str,
                  artifacts: dict[str, Callable[[Path], None]] | None = None) -> str:
    """Log ``run`` to :data:`ADAPT_EXPERIMENT`, plus ``artifacts`` (file name -> a function writing that
    file); returns the run id."""
    import mlflow

    from metaprep.registry.client import experiment_id

    experiment_id(uri, ADAPT_EXPERIMENT)
    with mlflow.start_run(run_name=run_name[:200]) as active:
        mlflow.log_params({**{CONFIG + k: v for k, v in run.config.items()}, **run.extra_params, "task": run.task})
        for key, value in run.meta_features.items():
            mlflow.log_param(META_FEATURE + key, f"{value:.6g}")
        for step, value in enumerate(run.curve):
            mlflow.log_metric(CURVE, value, step=step)
        mlflow.log_metrics({FINAL: run.final_loss, COST: run.cost_s, **run.extra_metrics})
        with tempfile.TemporaryDirectory() as tmp:
            for name, write in (artifacts or {}).items():
                path = Path(tmp) / name
                write(path)
                mlflow.log_artifact(str(path))
        return active.info.run_id


def log_adapt_runs(uri: str, runs: list[AdaptRun], experiment: str = ADAPT_EXPERIMENT,
                   tags: dict[str, str] | None = None) -> list[str]:
    """Log many adapt runs at once (three REST calls a run: create, one batch of params and metrics, end), the
    same contract as :func:`log_adapt_run`; ``tags`` on every run. Returns the run ids."""
    import time

    from mlflow.entities import Metric, Param

    from metaprep.registry.client import ensure_experiment, mlflow_client

    client = mlflow_client(uri)  # a client of its own: the process's fluent tracking URI stays as it is
    exp = ensure_experiment(client, experiment)
    ids = []
    for run in runs:
        now = int(time.time() * 1000)
        created = client.create_run(exp, run_name=f"{run.task}-{len(ids)}"[:200], tags=dict(tags or {}))
        params = {**{CONFIG + k: v for k, v in run.config.items()}, **run.extra_params, "task": run.task,
                  **{META_FEATURE + k: f"{v:.6g}" for k, v in run.meta_features.items()}}
        metrics = [Metric(CURVE, float(v), now, step) for step, v in enumerate(run.curve)]
        metrics += [Metric(k, float(v), now, 0) for k, v in
                    {FINAL: run.final_loss, COST: run.cost_s, **run.extra_metrics}.items() if v is not None]
        client.log_batch(created.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
        client.set_terminated(created.info.run_id, "FINISHED")
        ids.append(created.info.run_id)
    return ids


def read_adapt_runs(tracking_uri: str, experiment: str = ADAPT_EXPERIMENT, where: str = "") -> Iterator[AdaptRun]:
    """Every FINISHED run of ``experiment`` that has ``config.*`` params (and matches the MLflow search filter
    ``where``, e.g. ``tags.prepared_model = 'X'``), in the contract's terms."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from metaprep.registry.tracking import check_scheme, sqlite_path

    check_scheme(tracking_uri, "meta-dataset", DataError)
    db = sqlite_path(tracking_uri, "meta-dataset", DataError)
    if db is not None and not db.is_file():  # MLflow would create the folder and an empty store
        raise DataError(f"{tracking_uri}: no MLflow database at {db} (a sqlite store written by jobs.adapt)")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        exp = client.get_experiment_by_name(experiment)
    except MlflowException as exc:
        raise DataError(f"{tracking_uri}: cannot read the MLflow store ({exc.message.splitlines()[0]})") from None
    if exp is None:
        raise DataError(f"{tracking_uri}: no MLflow experiment named {experiment!r} (adapt runs are logged "
                        f"to {ADAPT_EXPERIMENT!r})")
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'" + (f" and {where}" if where
                                                                                          else ""),
                                  max_results=1000, page_token=token)
        for found in page:
            run = _adapt_run(client, found)
            if run is not None:
                yield run
        token = page.token
        if not token:
            break


def _adapt_run(client: Any, run: Any) -> AdaptRun | None:
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    config = {k[len(CONFIG):]: v for k, v in params.items() if k.startswith(CONFIG)}
    if not config:
        return None
    meta = {k: v for k, v in tags.items() if k.startswith(META_FEATURE)}
    meta.update({k: v for k, v in params.items() if k.startswith(META_FEATURE)})
    history = sorted(client.get_metric_history(run.info.run_id, CURVE), key=lambda m: (m.step, m.timestamp))

    def finite(key: str) -> float | None:
        value = metrics.get(key)
        return float(value) if value is not None and math.isfinite(value) else None

    return AdaptRun(task=params.get("task") or tags.get("task") or tags.get("dataset"), config=config,
                    meta_features={k[len(META_FEATURE):]: v for k, v in meta.items()},
                    curve=[float(m.value) for m in history if math.isfinite(m.value)],
                    final_loss=finite(FINAL), cost_s=finite(COST), run_id=run.info.run_id)
