"""jobs.sweep's driver: concurrency, searchers, plot, child runs, CLI (fast), and real sweeps on the local stack
(integration). The ``sweep:`` recipe section is tested in test_sweep_recipe.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from metaprep.errors import ConfigError
from metaprep.tune.space import DEFAULT_SWEEP
from tests.test_sweep_recipe import MLFLOW, QUICK, ROOT, TINY, _load, _with_sweep

# --------------------------------------------------------------------------- driver (fast)

def test_max_concurrent_trials_sized_to_the_cluster(tmp_path):
    from metaprep.tune.sweep import max_concurrent_trials

    cfg, _, spec = _load(tmp_path, _with_sweep({"num_samples": 8}))
    assert max_concurrent_trials({"CPU": 4.0}, cfg, spec) == 4
    assert max_concurrent_trials({"CPU": 40.0}, cfg, spec) == 8  # never more than num_samples
    cfg.distributed.num_workers, cfg.distributed.cpus_per_worker = 2, 1
    assert max_concurrent_trials({"CPU": 5.0}, cfg, spec) == 2
    spec.max_concurrent = 1
    assert max_concurrent_trials({"CPU": 5.0}, cfg, spec) == 1
    cfg.distributed.num_workers = 8
    with pytest.raises(ConfigError, match="a trial needs 8 CPU"):
        max_concurrent_trials({"CPU": 4.0}, cfg, spec)


def test_random_search_limits_its_own_concurrency(tmp_path):
    from ray.tune.search import Searcher

    from metaprep.tune.sweep import _searcher

    _, _, spec = _load(tmp_path, _with_sweep({"num_samples": 8}))
    searcher = _searcher(spec, 3)
    # Tune ignores max_concurrent_trials for a BasicVariantGenerator, so it must carry the limit
    assert not isinstance(searcher, Searcher) and searcher.max_concurrent == 3


def test_optional_searchers(tmp_path):
    from metaprep.tune.sweep import _searcher

    _, _, spec = _load(tmp_path, _with_sweep({"searcher": "optuna"}))
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="'optuna' needs the optuna package"):
            _searcher(spec)
    else:
        assert _searcher(spec) is not None

    portfolio = [{"meta.inner_lr": 0.2, "meta.outer_lr": 0.002}, {"meta.inner_lr": 0.1}]
    _, _, spec = _load(tmp_path, _with_sweep({"searcher": "transfer", "portfolio": portfolio}))
    searcher = _searcher(spec)
    first, second, third = (searcher.suggest(f"t{i}") for i in range(3))
    assert first["meta.inner_lr"] == 0.2 and first["meta.outer_lr"] == 0.002
    assert second["meta.inner_lr"] == 0.1 and set(second) == set(spec.space)
    assert set(third) == set(spec.space)  # after the portfolio: samples of the space


def test_plot_marks_every_status(tmp_path):
    from metaprep.tune.plot import plot_sweep
    from metaprep.tune.sweep import TrialOutcome

    _, _, spec = _load(tmp_path, _with_sweep({"space": DEFAULT_SWEEP["space"]}))
    trials = [
        TrialOutcome("a", "completed", {"meta.inner_lr": 0.1, "meta.outer_lr": 1e-3}, 2.5, 4, "r1", "/x"),
        TrialOutcome("b", "early_stopped", {"meta.inner_lr": 0.5, "meta.outer_lr": 3e-3}, 3.1, 2, "r2"),
        TrialOutcome("c", "diverged", {"meta.inner_lr": 1e30, "meta.outer_lr": 1e-3}, None, 0, "r3"),
        TrialOutcome("d", "failed", {"meta.inner_lr": 0.2, "meta.outer_lr": 1e-2}, None, None, None),
    ]
    out = plot_sweep(trials, spec, tmp_path / "plot.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("verdict,own_tags,own_status,want_status", [
    # ASHA's kill reached the trial's own except branch first: it tagged the run failed just before dying
    ("early_stopped", {"sweep.status": "failed", "sweep.error": "RayTaskError: cancelled"}, "FAILED", "KILLED"),
    ("early_stopped", {"sweep.status": "running"}, "RUNNING", "KILLED"),  # killed before any bookkeeping
    ("failed", {"sweep.status": "running"}, "RUNNING", "FAILED"),
    ("completed", {"sweep.status": "completed"}, "FINISHED", "FINISHED"),
])
def test_child_run_agrees_with_the_driver(tmp_path, verdict, own_tags, own_status, want_status):
    from mlflow.tracking import MlflowClient

    from metaprep.tune.sweep import TrialOutcome, _reconcile_child_run

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("sweep"), tags=own_tags).info.run_id
    if own_status != "RUNNING":
        client.set_terminated(run_id, own_status)
    error = "RayTaskError: worker died" if verdict == "failed" else None
    trial = TrialOutcome("t1", verdict, {"meta.inner_lr": 0.1}, 2.5, 2, run_id, error=error)
    _reconcile_child_run(client, client.get_run(run_id), trial)
    run = client.get_run(run_id)
    assert run.data.tags["sweep.status"] == verdict and run.info.status == want_status
    assert run.data.tags.get("sweep.error") == error


def test_progress_lines_at_each_trial_end_and_at_most_every_30s():
    """Issue 19: sweeps showed no progress; one plain line per trial end, a heartbeat otherwise."""
    from types import SimpleNamespace

    from metaprep.tune.progress import SweepProgress

    now, lines = [0.0], []
    progress = SweepProgress(4, lines.append, heartbeat_s=30, clock=lambda: now[0])
    a, b, c, d = (SimpleNamespace(trial_id=i, last_result={}) for i in "abcd")
    for t in (a, b):
        progress.on_trial_start(0, [], t)
    progress.on_trial_result(0, [], a, {"meta_step": 2, "meta_val_loss": 3.1})
    progress.on_trial_result(0, [], b, {"meta_step": 2, "meta_val_loss": 2.7})
    now[0] = 29.0
    progress.on_step_end(0, [])
    assert lines == []  # quiet between events for less than the heartbeat
    b.last_result = {"meta_step": 4, "meta_val_loss": 2.5, "status": "completed"}
    progress.on_trial_result(0, [], b, b.last_result)
    progress.on_trial_complete(0, [], b)
    a.last_result = {"meta_step": 2, "meta_val_loss": 3.1}  # ASHA stopped it after its first rung
    progress.on_trial_complete(0, [], a)
    progress.on_trial_start(0, [], c)
    now[0] = 50.0
    progress.on_step_end(0, [])
    assert len(lines) == 2  # the heartbeat counts from the last line
    now[0] = 60.0
    progress.on_step_end(0, [])
    progress.on_trial_error(0, [], c)
    d.last_result = {"meta_step": 1, "meta_val_loss": float("inf"), "status": "diverged"}
    progress.on_trial_start(0, [], d)
    progress.on_trial_result(0, [], d, d.last_result)
    progress.on_trial_complete(0, [], d)
    assert lines[0] == ("metaprep: trials 1/4 done (1 completed, 0 stopped early, 0 diverged, 0 failed), 1 running, "
                        "2 pending; best meta_val_loss 2.5 (trial b, meta-step 4)")
    assert lines[1].startswith("metaprep: trials 2/4 done (1 completed, 1 stopped early, 0 diverged, 0 failed), "
                               "0 running, 2 pending")
    assert lines[2].startswith("metaprep: trials 2/4 done (1 completed, 1 stopped early, 0 diverged, 0 failed), "
                               "1 running, 1 pending")
    assert lines[-1] == ("metaprep: trials 4/4 done (1 completed, 1 stopped early, 1 diverged, 1 failed), "
                         "0 running, 0 pending; best meta_val_loss 2.5 (trial b, meta-step 4)")
    assert len(lines) == 5 and all("\n" not in line for line in lines)


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from jobs._cli import run_main
    from jobs.sweep import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_with_sweep({"space": {"meta.inner_lr": {"loguniform": [-1.0, 1.0]}}})))
    with pytest.raises(SystemExit) as info:
        run_main(main, ["--config", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "sweep.space.meta.inner_lr" in err and "\n" not in err
    with pytest.raises(SystemExit) as info:
        run_main(main, ["--config", str(TINY), "--num-samples", "0"])
    assert info.value.code == 2


# --------------------------------------------------------------------------- integration (local stack)

def _refuse(const: str):
    raise ValueError(f"{const} in a JSON tag")


@pytest.fixture
def live_ray(ray_cluster):
    """The local stack's Ray and MLflow (conftest's ``stack`` starts them unless they are running)."""
    return ray_cluster


def _job_leftovers(ray, job_id: str) -> list[str]:
    """Placement groups and actors of ``job_id`` that still hold (or wait for) resources.

    Detached actors that reserve nothing are cluster singletons, not leaks: Ray Train V2 creates its
    ``AutoscalingCoordinator`` (num_cpus=0, lifetime="detached") under whichever job first trains on a
    fresh cluster, and it lives as long as the cluster.
    """
    from ray.util.state import list_actors

    def singleton(a) -> bool:
        return bool(a.is_detached) and not any((a.required_resources or {}).values())

    left = [f"pg {pg_id} {pg['state']}" for pg_id, pg in ray.util.placement_group_table().items()
            if pg_id.endswith(job_id) and pg["state"] != "REMOVED"]
    left += [f"actor {a.class_name} {a.state}"
             for a in list_actors(filters=[("job_id", "=", job_id)], limit=1000, detail=True)
             if a.state != "DEAD" and not singleton(a)]
    return left


def _other_jobs_running(ray, job_ids: set[str]) -> bool:
    from ray.util.state import list_jobs

    return any(str(getattr(j.status, "value", j.status)) == "RUNNING" for j in list_jobs()
               if (j.job_id or "") not in job_ids)


@pytest.mark.integration
@pytest.mark.slow  # 90 s: runs in `make test-faults` (CI)
def test_sweep_on_local_stack(tmp_path, live_ray):
    """4 trials (one forced NaN) of a very short tiny recipe through jobs.sweep, checked in MLflow and Ray."""
    ray = live_ray
    name = f"sweeptest-{uuid.uuid4().hex[:8]}"
    recipe = _with_sweep({
        "space": {"meta.inner_lr": {"loguniform": [0.05, 0.5]}, "meta.outer_lr": {"loguniform": [1.0e-3, 1.0e-2]}},
        "num_samples": 4, "seed": 1,
        "initial": [{"meta.inner_lr": 1.0e+30, "meta.outer_lr": 3.0e-3}],  # diverges (NaN) at the first step
        "asha": {"grace_period": 2, "reduction_factor": 2}})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    summary_path = tmp_path / "summary.json"
    env = {**os.environ, "MLFLOW_TRACKING_URI": MLFLOW, "RAY_ADDRESS": os.environ.get("RAY_ADDRESS", "127.0.0.1:6379"),
           "RAY_TRAIN_V2_ENABLED": "1", "METAPREP_STATE_DIR": str(tmp_path / "state")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jobs.sweep", "--config", str(path), "--summary-out",
                           str(summary_path), "--set", f"registry.name={name}",
                           "--set", f"checkpoint.storage_path={tmp_path / 'ray_results'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "will be ignored" not in proc.stdout + proc.stderr  # max_concurrent_trials took effect
    # issue 19: progress, ASHA, plot and verdict each on a line of their own
    assert all(any(line.startswith(want) for line in proc.stdout.splitlines()) for want in (
        "metaprep: trials 4/4 done (", "metaprep: ASHA on: at meta-step 2 ", "metaprep: sweep plot ",
        "metaprep: registered ")) and "first version: v" in proc.stdout, proc.stdout[-3000:]
    summary = json.loads(summary_path.read_text())

    # summary JSON
    assert summary["n_trials"] == 4
    assert summary["n_diverged"] == 1 and summary["n_failed"] >= 1  # the NaN trial did not stop the sweep
    assert summary["n_completed"] >= 1
    assert set(summary["best_config"]) == {"meta.inner_lr", "meta.outer_lr"}
    assert 0.05 <= summary["best_config"]["meta.inner_lr"] <= 0.5
    assert math.isfinite(summary["best_metric"])
    assert summary["registered_version"] is not None
    statuses = {t["trial_id"]: t["status"] for t in summary["trials"]}
    nan_trial = next(t for t in summary["trials"] if t["config"]["meta.inner_lr"] == 1.0e30)
    assert nan_trial["status"] == "diverged" and nan_trial["metric"] is None

    # MLflow: parent run, one child run per trial with params, curves and a status tag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=MLFLOW)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "true"
    assert parent.data.metrics["best_meta_val_loss"] == pytest.approx(summary["best_metric"])
    assert "sweep_lr.png" in {f.path for f in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([summary["experiment_id"]],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    for child in children:
        trial_id = child.data.tags["sweep.trial_id"]
        assert child.data.tags["sweep.status"] == statuses[trial_id]
        assert child.info.status != "RUNNING"
        params = child.data.params
        assert {"meta.inner_lr", "meta.outer_lr", "meta.inner_steps", "reparam.rank"} <= set(params)
        if statuses[trial_id] == "diverged":
            assert child.info.status == "FAILED" and float(params["meta.inner_lr"]) == 1.0e30
            assert "NaN" in child.data.tags["sweep.error"]
        else:
            assert len(client.get_metric_history(child.info.run_id, "meta_val_loss")) >= 2  # step 0 and step 2
    best = next(c for c in children if c.info.run_id == summary["best_run_id"])
    assert float(best.data.params["meta.inner_lr"]) == pytest.approx(summary["best_config"]["meta.inner_lr"])

    # registry: candidate on the best trial's version, champion comparison recorded with both scores
    for kind in ("base", "controller"):
        mv = client.get_model_version_by_alias(f"{name}-{kind}", "candidate")
        assert mv.run_id == summary["best_run_id"]
        assert mv.version == summary[f"{'registered' if kind == 'base' else 'controller'}_version"]
        record = json.loads(mv.tags["champion_comparison"], parse_constant=_refuse)  # strict JSON: no NaN
        assert record["candidate"] == pytest.approx(summary["best_metric"], rel=1e-4)
        assert "champion" in record and record["promoted"] is True  # a fresh name has no champion yet
        assert client.get_model_version_by_alias(f"{name}-{kind}", "champion").version == mv.version

    # cluster: nothing of the sweep's job is left; all CPUs free again when nobody else is running
    deadline = time.monotonic() + 90
    while _job_leftovers(ray, summary["ray_job_id"]) and time.monotonic() < deadline:
        time.sleep(2)
    assert not _job_leftovers(ray, summary["ray_job_id"])
    total = ray.cluster_resources()["CPU"]
    own = {summary["ray_job_id"], ray.get_runtime_context().get_job_id()}
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(2)
    if not _other_jobs_running(ray, own):
        assert ray.available_resources().get("CPU", 0) == total
    print(f"sweep wall time {wall:.0f}s")


@pytest.mark.integration
def test_champion_moves_only_when_beaten_on_the_same_tasks(tmp_path, live_ray):
    """compare_and_promote: a worse candidate keeps the champion, a better one takes it; both scores are tags."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from metaprep.config import MetaTrainConfig, from_dict
    from metaprep.registry.artifacts import export_prepared
    from metaprep.registry.promotion import compare_and_promote, val_set_key
    from metaprep.registry.register import register_prepared
    from metaprep.train.local import meta_train_local
    from metaprep.train.loop import load_split

    name = f"sweeptest-champ-{uuid.uuid4().hex[:8]}"
    cfg = from_dict(MetaTrainConfig, {**QUICK, "registry": {"name": name}}).validate()
    split = load_split(cfg)
    client = MlflowClient(tracking_uri=MLFLOW)
    mlflow.set_tracking_uri(MLFLOW)
    exp = mlflow.set_experiment("metaprep-tests")

    def prepare(inner_lr: float, steps: int):
        c = from_dict(MetaTrainConfig, {**QUICK, "registry": {"name": name},
                                        "meta": {**QUICK["meta"], "inner_lr": inner_lr, "meta_steps": steps}})
        result = meta_train_local(c.validate())
        export = tmp_path / f"export-{inner_lr}-{steps}"
        export_prepared(result.model, result.loaded, c, export)
        run_id = client.create_run(exp.experiment_id, run_name=f"{name}-{inner_lr}").info.run_id
        return register_prepared(MLFLOW, run_id, export, c, result.final, "test", "{}"), export

    # a model that barely adapts (tiny inner lr) first: it becomes champion (no champion yet)
    weak_uris, weak_export = prepare(1e-4, 1)
    first = compare_and_promote(MLFLOW, cfg, split, weak_uris, weak_export)
    assert first["promoted"] and first["champion"] is None
    # a model adapting with a useful inner lr: scored on the same episodes, it must win
    strong_uris, strong_export = prepare(0.3, 2)
    second = compare_and_promote(MLFLOW, cfg, split, strong_uris, strong_export)
    assert second["champion_version"] == weak_uris["base_version"]
    assert second["metric"] == val_set_key(cfg, split)
    assert second["candidate"] < second["champion"] and second["promoted"]
    tags = client.get_model_version(f"{name}-base", strong_uris["base_version"]).tags
    record = json.loads(tags["champion_comparison"], parse_constant=_refuse)
    assert record["candidate"] == pytest.approx(second["candidate"]) and record["promoted"]
    assert record["champion"] == pytest.approx(second["champion"], rel=1e-4)
    # the weak model again, as a new candidate: loses, champion stays
    again = compare_and_promote(MLFLOW, cfg, split, {**weak_uris}, weak_export)
    assert not again["promoted"]
    assert client.get_model_version_by_alias(f"{name}-base", "champion").version == strong_uris["base_version"]


@pytest.mark.integration
@pytest.mark.slow
def test_sweep_with_more_trials_than_cpus_leaks_nothing(tmp_path, live_ray):
    """Issue 11 (load): more trials than the cluster has CPUs queue, all finish, and free every resource."""
    ray = live_ray
    total = ray.cluster_resources()["CPU"]
    trials = int(total) + 2
    recipe = _with_sweep({"space": {"meta.inner_lr": {"loguniform": [0.05, 0.5]}}, "num_samples": trials,
                          "seed": 3, "asha": {"grace_period": 4, "reduction_factor": 2}})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    summary_path = tmp_path / "summary.json"
    env = {**os.environ, "MLFLOW_TRACKING_URI": MLFLOW, "RAY_ADDRESS": os.environ.get("RAY_ADDRESS", "127.0.0.1:6379"),
           "RAY_TRAIN_V2_ENABLED": "1", "METAPREP_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.run([sys.executable, "-m", "jobs.sweep", "--config", str(path), "--summary-out",
                           str(summary_path), "--set", f"registry.name=sweepload-{uuid.uuid4().hex[:8]}",
                           "--set", f"checkpoint.storage_path={tmp_path / 'ray_results'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["n_trials"] == trials > total and summary["n_failed"] == 0
    assert summary["n_completed"] + summary["n_early_stopped"] == trials
    deadline = time.monotonic() + 90
    while _job_leftovers(ray, summary["ray_job_id"]) and time.monotonic() < deadline:
        time.sleep(2)
    assert not _job_leftovers(ray, summary["ray_job_id"])
    own = {summary["ray_job_id"], ray.get_runtime_context().get_job_id()}
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(2)
    if not _other_jobs_running(ray, own):
        assert ray.available_resources().get("CPU", 0) == total
