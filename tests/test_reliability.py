"""Fault injection on the real stack: divergence, failed checkpoint writes, MLflow outages, concurrent jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def _meta_train(stack: dict, name: str, *sets: str, env: dict | None = None, summary: Path | None = None,
                timeout: int = 600) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "jobs.meta_train", "--config", "jobs/configs/tiny.yaml", "--set",
            f"registry.name={name}"]
    for s in sets:
        args += ["--set", s]
    if summary:
        args += ["--summary-out", str(summary)]
    return subprocess.run(args, cwd=ROOT, env={**stack["env"], "RAY_ADDRESS": stack["ray"], **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def _versions(uri: str, name: str) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).search_model_versions(f"name='{name}-base'")


@pytest.mark.slow  # in `make test-faults` (.ci/run): keeps `make test` under 15 minutes on 2 cores
def test_diverging_learning_rate_fails_clearly_and_registers_nothing(stack) -> None:
    name = f"nan-{uuid.uuid4().hex[:6]}"
    proc = _meta_train(stack, name, "meta.inner_lr=1e30", "meta.meta_steps=6",
                       "meta.eval_every=3")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: meta-loss became NaN/inf") and "lower the learning rates" in last
    assert _versions(stack["mlflow"], name) == []


@pytest.mark.slow  # in `make test-faults` (.ci/run): keeps `make test` under 15 minutes on 2 cores
def test_failed_checkpoint_write_is_clear_and_keeps_the_previous_one(stack) -> None:
    name = f"ckfail-{uuid.uuid4().hex[:6]}"
    proc = _meta_train(stack, name, "meta.meta_steps=8", "checkpoint.every=2", "checkpoint.max_failures=0",
                       env={"METAPREP_FAULT_CHECKPOINT_AT": "4"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "checkpoint write failed at meta-step 4" in last and "previous checkpoint is intact" in last
    run_name = next(line.split()[2] for line in proc.stdout.splitlines() if line.startswith("metaprep: run "))
    folder = Path(stack["env"]["METAPREP_STATE_DIR"]) / "ray_results" / run_name
    states = [json.loads(p.read_text())["step"] for p in folder.glob("checkpoint_*/trainer_state.json")]
    assert states == [2]  # the step-2 checkpoint survived, complete
    assert _versions(stack["mlflow"], name) == []


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_mlflow(port: int, state: Path) -> subprocess.Popen:
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", "--backend-store-uri",
                             f"sqlite:///{state}/mlflow.db", "--serve-artifacts", "--artifacts-destination",
                             str(state / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300  # a cold `mlflow server` start takes a minute on a busy 2-core box
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    raise AssertionError("private MLflow server did not start")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_mlflow_down_mid_run_loses_nothing(stack, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_mlflow(port, tmp_path)
    name, out = f"outage-{uuid.uuid4().hex[:6]}", tmp_path / "s.json"
    args = [sys.executable, "-m", "jobs.meta_train", "--config", "jobs/configs/tiny.yaml", "--set",
            f"registry.name={name}", "--set", "meta.meta_steps=40", "--set", "meta.eval_every=10",
            "--summary-out", str(out)]
    env = {**stack["env"], "RAY_ADDRESS": stack["ray"], "MLFLOW_TRACKING_URI": uri}
    job = subprocess.Popen(args, cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_id, seen = None, []
    for line in job.stdout:
        seen.append(line)
        if line.startswith("metaprep: run "):
            run_id = line.split("MLflow run ")[1].split(")")[0]
            break
    assert run_id, "".join(seen[-60:])
    client = MlflowClient(tracking_uri=uri)
    deadline = time.time() + 300
    while time.time() < deadline and not client.get_metric_history(run_id, "meta_loss"):
        time.sleep(0.5)
    _stop(server)  # outage while the workers train
    time.sleep(15)
    server = _start_mlflow(port, tmp_path)
    try:
        rest = job.communicate(timeout=900)[0]
        assert job.returncode == 0, rest[-3000:]
        summary = json.loads(out.read_text())
        steps = sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "meta_loss"))
        assert steps == list(range(1, 41))
        assert summary["meta_steps"] == 40 and len(_versions(uri, name)) == 1
    finally:
        _stop(server)


@pytest.mark.slow
def test_three_concurrent_jobs_get_distinct_versions(stack, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    name = f"load-{uuid.uuid4().hex[:6]}"
    procs, outs = [], []
    for i in range(3):
        outs.append(tmp_path / f"s{i}.json")
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", stack["dashboard"],
               "--working-dir", ".", "--", "python", "-m", "jobs.meta_train", "--config", "jobs/configs/tiny.yaml",
               "--set", f"registry.name={name}", "--set", "meta.meta_steps=6", "--set", "meta.eval_every=3",
               "--set", f"seed={i}", "--summary-out", str(outs[-1])]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=stack["env"], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=1200)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [log[-1500:] for log in logs]
    summaries = [json.loads(o.read_text()) for o in outs]
    versions = sorted(int(s["base_version"]) for s in summaries)
    assert versions == [1, 2, 3]
    client = MlflowClient(tracking_uri=stack["mlflow"])
    for s in summaries:  # each version points at its own run
        mv = client.get_model_version(f"{name}-base", s["base_version"])
        assert mv.run_id == s["run_id"] and mv.tags["source_run"] == s["run_id"]
        assert client.get_model_version(f"{name}-controller", s["controller_version"]).run_id == s["run_id"]
    import ray

    if not ray.is_initialized():
        ray.init(address=stack["ray"], log_to_driver=False)
    deadline = time.time() + 180
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]  # nothing leaked


def test_stale_torch_extension_lock_does_not_hang_a_job(tmp_path) -> None:
    """A DeepSpeed op build killed midway leaves a lock file; jobs must not wait on it (no JIT build on CPU)."""
    ext = tmp_path / "torch_extensions"
    lock = ext / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")  # torch's FileBaton waits while this file exists
    code = ("import sys; sys.path.insert(0, 'service')\n"
            "from metaprep.config import MetaTrainConfig, load_config\n"
            "from metaprep.train.local import meta_train_local\n"
            "cfg = load_config(MetaTrainConfig, 'jobs/configs/tiny.yaml', ['meta.meta_steps=2', 'meta.eval_every=1'])\n"
            "print('steps', meta_train_local(cfg).final['meta_steps'])\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
    env.pop("METAPREP_DS_CPU_SHM", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "steps 2" in proc.stdout
