"""Inside one sweep trial: a Tune function that runs one meta-training on Ray Train.

Train-in-Tune (Ray Train V2): every trial is a Tune *function* (:func:`sweep_trial`) that runs the
same launch pieces as ``jobs.meta_train`` (:mod:`metaprep.train.launch`: the MLflow run, the
``TorchTrainer``, its final status) for its sampled configuration, as a child of the sweep's parent
run and without registering; ``Tuner(trainer)`` is deprecated.

How ASHA sees the meta-validation loss during training: a trial checkpoints at every
meta-validation (``checkpoint.every = meta.eval_every``) and the worker loop writes its history,
meta-val losses included, into each checkpoint (``trainer_state.json``).
:class:`MetaValReportCallback`, a Train ``UserCallback`` derived from Ray's ``TuneReportCallback``,
runs on the Train controller after each such report, reads that file from the persisted checkpoint
and forwards ``{meta_step, meta_val_loss}`` to the trial's Tune session. ASHA's time axis is
``meta_step``; its last rung lies below ``meta.meta_steps``, and the trial function reports the final
result itself once MLflow bookkeeping is done (a scheduler STOP on that report cannot cut it short).
"""

from __future__ import annotations

import json
import math
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from metaprep.registry.client import mlflow_client
from metaprep.registry.promotion import tag_json
from metaprep.train.storage import Storage
from metaprep.tune.space import METRIC, trial_config

_STATE_FILE = "trainer_state.json"  # written by metaprep.train.loop into every checkpoint


def finite_or_inf(value: Any) -> float:
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
            "meta_step": int(step), METRIC: finite_or_inf(value), "meta_loss": finite_or_inf(m.get("meta_loss")),
            "mlflow_run_id": self.mlflow_run_id, "checkpoint_path": checkpoint.path})

    def _record_divergence(self, step: int) -> None:
        try:
            mlflow_client(self.tracking_uri).set_tag(self.mlflow_run_id, "sweep.diverged_at", str(step))
        except Exception:  # noqa: BLE001 - bookkeeping only: the trial still ends as diverged
            pass


def sweep_trial(params: dict, ctx: dict) -> None:
    """Tune function: meta-train one sampled configuration on Ray Train and report its meta-val loss.

    ``ctx``: the sweep's ``base`` recipe, tracking ``uri``, ``experiment_id``, ``parent_run_id``,
    ``sweep_name`` and ``train_storage`` (where the trials' Ray Train runs live).
    """
    import ray.tune

    from metaprep.train.launch import divergence, fit, start_run

    tctx = ray.tune.get_context()
    trial_id = tctx.get_trial_id()
    cfg = trial_config(ctx["base"], params, source=f"trial {trial_id}")
    run = start_run(cfg, ctx["uri"], f"{ctx['sweep_name']}-{trial_id}", Storage(ctx["train_storage"]),
                    experiment_id=ctx["experiment_id"], run_name=tctx.get_trial_name(), tags={
                        "mlflow.parentRunId": ctx["parent_run_id"], "sweep.name": ctx["sweep_name"],
                        "sweep.trial_id": trial_id, "sweep.status": "running",
                        "sweep.params": tag_json(params)})
    client = run.client
    try:
        result = fit(run, callbacks=[MetaValReportCallback(run.run_id, run.uri)])
    except BaseException as exc:
        reason = f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        client.set_tag(run.run_id, "sweep.status", "failed")
        client.set_tag(run.run_id, "sweep.error", reason[:4000])
        raise
    final = result.final
    diverged_at = None
    if result.diverged:
        status, metric = "diverged", math.inf
        diverged_at = final.get("diverged_at")
        if diverged_at is None:  # recorded by MetaValReportCallback when the status file could not be read
            diverged_at = client.get_run(run.run_id).data.tags.get("sweep.diverged_at")
        diverged_at = int(diverged_at) if str(diverged_at).isdigit() else None
        client.set_tag(run.run_id, "sweep.error", divergence(cfg, diverged_at))
    else:
        status, metric = "completed", finite_or_inf(final["meta_val_loss_end"])
        client.log_metric(run.run_id, "meta_val_loss_final", metric)
    client.set_tag(run.run_id, "sweep.status", status)
    client.set_terminated(run.run_id, "FAILED" if result.diverged else "FINISHED")
    ray.tune.report({
        "meta_step": cfg.meta.meta_steps, METRIC: metric, "status": status, "mlflow_run_id": run.run_id,
        "diverged_at": diverged_at, "meta_steps_done": final.get("meta_steps"),
        "meta_val_loss_start": finite_or_inf(final.get("meta_val_loss_start")),
        "meta_val_loss_end": metric, "export_path": result.export})
