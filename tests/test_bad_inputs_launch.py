"""Issue 22, classes 2 and 7: inputs that made a launch hang or fail inside a Ray worker.

A need the cluster can never grant, ``--resume`` of a run the store does not know: one line, exit 2, before
any MLflow run or results folder exists. A user error raised inside a worker: one line, the MLflow run
``FAILED`` and no results folder left behind without a checkpoint in it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from jobs._cli import run_main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "jobs/configs/tiny.yaml")


def _runs(uri: str, prefix: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(ids) if r.info.run_name.startswith(prefix)] if ids else []


def _meta_train(stack: dict, name: str, *sets: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "jobs.meta_train", "--config", TINY, "--set", f"registry.name={name}"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, cwd=ROOT, env={**stack["env"], "RAY_ADDRESS": stack["ray"], **(env or {})},
                          capture_output=True, text=True, timeout=600)


def _one_line(proc: subprocess.CompletedProcess, *, ray_logs: bool = False) -> str:
    """The job's one-line error. ``ray_logs``: the worker failed, and Ray's log monitor forwards the controller's
    error snippet (with the worker's traceback) to the driver's stderr around the job's own line."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    if not ray_logs:
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        return lines[-1]
    ours = [line for line in lines if line.startswith("error: ")]
    assert len(ours) == 1, proc.stderr[-2000:]
    return ours[0]


@pytest.fixture()
def store(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("METAPREP_STATE_DIR", str(tmp_path / "state"))
    return uri


def test_resume_of_a_run_that_does_not_exist_is_one_line(store, tmp_path, capsys) -> None:
    from jobs.meta_train import main

    with pytest.raises(SystemExit) as code:
        run_main(main, ["--config", TINY, "--resume", "nosuch-20260101-000000-abcdef"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code.value.code == 2 and line.startswith("error: --resume nosuch-20260101-000000-abcdef: no such run")
    assert not (tmp_path / "state" / "ray_results").exists() or not any((tmp_path / "state" / "ray_results").iterdir())


def test_resume_of_a_run_from_another_store_is_one_line(store, tmp_path, capsys) -> None:
    """The run folder exists but its MLflow run lives in another tracking store (it used to retry, then hang)."""
    from jobs.meta_train import main

    folder = tmp_path / "state" / "ray_results" / "other-20260101-000000-abcdef"
    folder.mkdir(parents=True)
    (folder / "metaprep_run.json").write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": "http://elsewhere"}))
    with pytest.raises(SystemExit) as code:
        run_main(main, ["--config", TINY, "--resume", folder.name])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code.value.code == 2
    assert f"its MLflow run {'0' * 32} is not in the tracking store {store}" in line
    assert _runs(store, "") == []


def test_cluster_fit_rule_names_the_need_and_the_cluster() -> None:
    from metaprep.config import MetaTrainConfig, load_config
    from metaprep.errors import ConfigError
    from metaprep.train.launch import check_cluster_fits

    cfg = load_config(MetaTrainConfig, TINY, ["distributed.num_workers=2", "distributed.cpus_per_worker=3",
                                              "meta.meta_batch_size=4"])
    assert check_cluster_fits(cfg, {"CPU": 6.0}) == (6.0, 6.0)
    with pytest.raises(ConfigError, match=r"needs 6 CPU \(2 workers x 3 CPUs\) but the Ray cluster has 4"):
        check_cluster_fits(cfg, {"CPU": 4.0})


def test_sequence_longer_than_the_model_context_is_refused_on_the_driver(store, capsys) -> None:
    from jobs.meta_train import main

    with pytest.raises(SystemExit) as code:
        run_main(main, ["--config", TINY, "--set", "model.tiny.max_seq_len=16", "--set", "tasks.seq_len=32"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code.value.code == 2 and line == ("error: tasks.seq_len: must be <= the model's context of 16 tokens "
                                             "(tiny), got 32")
    assert _runs(store, "") == []


@pytest.mark.integration
def test_more_cpus_than_the_cluster_has_is_refused_before_any_run(stack) -> None:
    """Ray would wait forever for 64 CPUs on this cluster, with the MLflow run left RUNNING."""
    name = f"cpus-{uuid.uuid4().hex[:6]}"
    proc = _meta_train(stack, name, "distributed.cpus_per_worker=64")
    line = _one_line(proc)
    assert "distributed: the run needs 64 CPU (1 workers x 64 CPUs) but the Ray cluster has" in line
    assert _runs(stack["mlflow"], name) == []
    results = Path(stack["env"]["METAPREP_STATE_DIR"]) / "ray_results"
    assert not list(results.glob(f"{name}-*"))


@pytest.mark.integration
def test_a_worker_failure_leaves_a_failed_run_and_no_orphan_folder(stack) -> None:
    """The first checkpoint write fails inside the worker: nothing to resume from, so nothing is left but
    the MLflow run, marked FAILED (a later failure keeps the folder: tests/test_reliability.py)."""
    name = f"wfail-{uuid.uuid4().hex[:6]}"
    proc = _meta_train(stack, name, "meta.meta_steps=4", "checkpoint.every=2", "checkpoint.max_failures=0",
                       env={"METAPREP_FAULT_CHECKPOINT_AT": "2"})
    line = _one_line(proc, ray_logs=True)
    assert "checkpoint write failed at meta-step 2" in line and "no checkpoint was written before it" in line
    assert [r.info.status for r in _runs(stack["mlflow"], name)] == ["FAILED"]
    results = Path(stack["env"]["METAPREP_STATE_DIR"]) / "ray_results"
    assert not list(results.glob(f"{name}-*"))


@pytest.mark.parametrize("override, expected", [
    ("checkpoint.max_failures=-1", "checkpoint.max_failures: must be >= 0, got -1"),
    ("checkpoint.max_failures=1000", "checkpoint.max_failures: must be <= 100, got 1000"),
    ("registry.name=it's", "registry.name: \"it's\": not a valid registered model name; use 1-100 letters"),
    ("registry.name=a\"b", "not a valid registered model name; use 1-100 letters"),
    ("registry.name=-x", "not a valid registered model name; use 1-100 letters"),
])
def test_endless_retries_and_names_that_break_registry_searches_are_refused(store, capsys, override, expected) -> None:
    """max_failures=-1 is Ray's "retry forever"; a quote in the name broke an MLflow filter and retried 300 s."""
    from jobs.meta_train import main

    with pytest.raises(SystemExit) as code:
        run_main(main, ["--config", TINY, "--set", override])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code.value.code == 2 and expected in line, line
    assert _runs(store, "") == []


@pytest.mark.integration
def test_an_unexpected_worker_exception_is_one_line_and_cleaned_up(stack) -> None:
    """Not a user error (a bug, a library failure inside the worker): one line naming the worker's exception,
    the MLflow run FAILED, no results folder without a checkpoint."""
    name = f"crash-{uuid.uuid4().hex[:6]}"
    proc = _meta_train(stack, name, "meta.meta_steps=4", "checkpoint.max_failures=0",
                       env={"METAPREP_FAULT_CRASH_AT": "1"})
    line = _one_line(proc, ray_logs=True)
    assert "Ray Train worker 0 failed: RuntimeError: injected worker crash at meta-step 1" in line, line
    assert "marked FAILED" in line and "--resume" not in line
    assert [r.info.status for r in _runs(stack["mlflow"], name)] == ["FAILED"]
    results = Path(stack["env"]["METAPREP_STATE_DIR"]) / "ray_results"
    assert not list(results.glob(f"{name}-*"))
