"""Run storage by URI (issue 21): ``metaprep.train.storage.Storage`` on a local folder, on a non-local pyarrow
filesystem, and a whole meta-training run (checkpoints, status, export, resume) on an S3 endpoint served on
127.0.0.1 by ``moto`` (a real S3 API over HTTP, no AWS)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from metaprep.errors import ConfigError
from metaprep.train.storage import Storage

ROOT = Path(__file__).resolve().parents[1]


def test_local_folder_round_trip(tmp_path) -> None:
    s = Storage.of(tmp_path / "runs")
    assert s.is_local and s.ray_storage == (str(tmp_path / "runs"), None)
    assert s.read_json("run", "x.json") is None and not s.exists("run") and s.names("run") == []
    s.write_json({"a": 1}, "run", "x.json")
    assert s.read_json("run", "x.json") == {"a": 1} and s.names("run") == ["x.json"]
    assert not (tmp_path / "runs" / "run" / "x.json.tmp").exists()  # written under a temporary name, then moved
    with s.local_dir("run") as local:
        assert local == tmp_path / "runs" / "run"  # no copy on a local filesystem
    assert s.relative(str(tmp_path / "runs" / "run" / "checkpoint_1")) == "run/checkpoint_1"
    with pytest.raises(ValueError):
        s.relative("/elsewhere/checkpoint_1")
    s.remove("run")
    assert not s.exists("run")


def test_relative_folders_are_made_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Storage.of("runs").root == str(tmp_path / "runs")


def test_uri_parts_keep_the_query_options() -> None:
    s = Storage("s3://bucket/prefix?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1")
    assert s.uri("run", "f.json") == ("s3://bucket/prefix/run/f.json?endpoint_override=127.0.0.1:9&scheme=http"
                                      "&region=us-east-1")
    assert s.path("run") == "bucket/prefix/run" and not s.is_local
    path, filesystem = s.ray_storage
    assert path == "bucket/prefix" and filesystem is s.fs  # Ray gets the endpoint through the filesystem


def test_non_local_filesystem_writes_whole_objects_and_copies_out(tmp_path) -> None:
    s = Storage("mock:///bucket/runs")  # pyarrow's in-memory filesystem: the branch every object store takes
    s.write_json({"step": 3}, "r", "checkpoint_1", "trainer_state.json")
    assert s.read_json("r", "checkpoint_1", "trainer_state.json") == {"step": 3}
    assert s.names("r") == ["checkpoint_1"]
    with s.local_dir("r") as local:
        copied = local / "checkpoint_1" / "trainer_state.json"
        assert json.loads(copied.read_text()) == {"step": 3} and local.parent != tmp_path
    assert not local.exists()  # the temporary copy is gone
    s.write_json({"w": 1}, "r", "ckpt", "base", "model.json")
    s.write_json({"c": 1}, "r", "ckpt", "controller", "spec.json")
    s.write_json({"o": 1}, "r", "ckpt", "rank_0_optimizer.json")
    with s.local_dir("r", "ckpt", only=("base", "controller")) as local:  # what registration reads, no more
        assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*.json")) == [
            "base/model.json", "controller/spec.json"]


@pytest.mark.parametrize("root", ["nosuchscheme://x/y", "s3://bucket/x?no_such_option=1"])
def test_a_storage_uri_pyarrow_cannot_open_is_one_clear_line(root) -> None:
    with pytest.raises(ConfigError) as err:
        Storage(root)
    line = str(err.value)
    assert line.startswith("checkpoint.storage_path: cannot open") and "\n" not in line and "s3://bucket" in line


# -- a whole run on S3 ---------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3() -> dict:
    """An S3 endpoint on 127.0.0.1 (``moto_server``) with one bucket; the URI options and credentials a job
    needs."""
    pytest.importorskip("moto")
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    env = {"AWS_ACCESS_KEY_ID": "metaprep-test", "AWS_SECRET_ACCESS_KEY": "metaprep-test"}
    os.environ.update(env)
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    bucket = f"metaprep-{uuid.uuid4().hex[:8]}"
    Storage(f"s3://{bucket}?{query}&allow_bucket_creation=true").fs.create_dir(bucket)
    yield {"uri": f"s3://{bucket}/runs?{query}", "env": env, "bucket": bucket}
    os.killpg(proc.pid, 9)
    proc.wait()


@pytest.mark.integration
@pytest.mark.slow
def test_meta_training_checkpoints_resumes_and_registers_from_s3(stack, s3) -> None:
    """Checkpoints, the rank-0 status and the export go through S3 only; a failed checkpoint write leaves a
    run that ``--resume`` continues from S3; the registered model is the export read back from S3."""
    from mlflow.tracking import MlflowClient

    name = f"s3-{uuid.uuid4().hex[:6]}"
    env = {**stack["env"], "RAY_ADDRESS": stack["ray"], **s3["env"]}
    args = [sys.executable, "-m", "jobs.meta_train", "--config", "jobs/configs/tiny.yaml",
            "--set", f"registry.name={name}", "--set", f"checkpoint.storage_path={s3['uri']}",
            "--set", "meta.meta_steps=8", "--set", "checkpoint.every=2", "--set", "meta.eval_every=4",
            "--set", "checkpoint.max_failures=0"]
    failed = subprocess.run(args, cwd=ROOT, env={**env, "METAPREP_FAULT_CHECKPOINT_AT": "6"},
                            capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "checkpoint write failed at meta-step 6" in failed.stderr.strip().splitlines()[-1]
    run_name = next(line.split()[2] for line in failed.stdout.splitlines() if line.startswith("metaprep: run "))
    storage = Storage(s3["uri"])
    assert any(n.startswith("checkpoint_") for n in storage.names(run_name)), storage.names(run_name)
    local = Path(stack["env"]["METAPREP_STATE_DIR"]) / "ray_results" / run_name
    assert not local.exists()  # nothing of the run on this machine's disk

    resumed = subprocess.run([*args, "--resume", run_name], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert not local.exists()
    status = storage.read_json(run_name, "metaprep_final.json")
    assert status["meta_steps"] == 8 and "meta_val_loss_end" in status
    client = MlflowClient(tracking_uri=stack["mlflow"])
    mv = client.get_model_version_by_alias(f"{name}-base", "candidate")
    steps = sorted(m.step for m in client.get_metric_history(mv.tags["source_run"], "meta_loss"))
    assert steps == list(range(1, 9)), steps  # resumed from S3: no step lost or logged twice


def test_trainer_gets_the_storage_filesystem_and_placement(monkeypatch) -> None:
    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-for-the-workers")
    from metaprep.config import MetaTrainConfig, load_config
    from metaprep.train.ray_job import build_trainer

    cfg = load_config(MetaTrainConfig, ROOT / "jobs/configs/tiny.yaml",
                      ["distributed.num_workers=2", "distributed.placement_strategy=STRICT_SPREAD"])
    trainer = build_trainer(cfg, "r", Storage("mock:///bucket/runs"), None)
    assert trainer.scaling_config.placement_strategy == "STRICT_SPREAD"
    assert trainer.run_config.storage_path == "bucket/runs" and trainer.run_config.storage_filesystem is not None
    assert trainer.run_config.worker_runtime_env["env_vars"]["AWS_ACCESS_KEY_ID"] == "key-for-the-workers"
    local = build_trainer(cfg, "r", ROOT / ".no-such-folder", None)
    assert local.run_config.storage_filesystem is None


def test_placement_strategy_is_validated() -> None:
    from metaprep.config import MetaTrainConfig, load_config

    with pytest.raises(ConfigError, match="distributed.placement_strategy"):
        load_config(MetaTrainConfig, ROOT / "jobs/configs/tiny.yaml", ["distributed.placement_strategy=ANYWHERE"])


def test_the_submitted_jobs_own_runtime_env_wins(monkeypatch) -> None:
    """`ray job submit --runtime-env-json '{"env_vars": {"AWS_ACCESS_KEY_ID": ...}}'`: the driver does not repeat
    what the job already sets for every worker (Ray would refuse the repeat)."""
    from metaprep.train.launch import without_the_jobs_own

    env = {"py_modules": ["/x/metaprep"], "env_vars": {"AWS_ACCESS_KEY_ID": "a", "TQDM_DISABLE": "1"}}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert without_the_jobs_own(env) == env
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"py_modules": ["s3://m.zip"], "env_vars": {"AWS_ACCESS_KEY_ID": "job"}}}))
    assert without_the_jobs_own(env) == {"env_vars": {"TQDM_DISABLE": "1"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    assert without_the_jobs_own(env) == env
