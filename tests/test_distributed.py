"""Ray Train + DeepSpeed: 2 workers = 1 worker (ZeRO 1/2/3, first and second order), resume, worker death."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metaprep.config import MetaTrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration
FAST = ["meta.meta_steps=4", "meta.eval_every=2", "meta.eval_tasks=4", "tasks.num_tasks=24",
        "model.tiny.layers=1"]


def _weights(export: Path) -> dict[str, torch.Tensor]:
    out = {f"init.{k}": v for k, v in load_file(export / "controller" / "fast_init.safetensors").items()}
    out.update({f"base.{k}": v for k, v in load_file(export / "base" / "model.safetensors").items()})
    return out


def _run_ray(cfg: MetaTrainConfig, storage: Path) -> tuple[dict, Path]:
    from metaprep.train.ray_job import build_trainer

    result = build_trainer(cfg, f"eq-{uuid.uuid4().hex[:6]}", str(storage), None).fit()
    return result.metrics, Path(result.checkpoint.path)


MLTD_2ND = ["reparam.kind=tarp_kronecker", "meta.second_order=true"]


# The default run keeps one case per ZeRO stage that carries second order, plus MLtD and Meta-LoRA; the
# first-order and ZeRO-2 cases run in `make test-faults` (CI) so that `make test` stays under 15 minutes.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("algorithm, stage, extra", [
    pytest.param("fomaml", 1, [], marks=_SLOW), ("maml", 1, []), pytest.param("fomaml", 2, [], marks=_SLOW),
    pytest.param("maml", 2, [], marks=_SLOW), pytest.param("fomaml", 3, [], marks=_SLOW),
    pytest.param("maml", 3, [], marks=_SLOW),
    ("mltd", 3, MLTD_2ND), ("mltd", 1, ["reparam.kind=tarp_kronecker"]), ("meta_lora", 1, [])])
def test_two_workers_equal_one_worker(ray_cluster, tmp_path, algorithm: str, stage: int, extra: list[str]) -> None:
    from metaprep.train.local import meta_train_local

    base = [*FAST, f"algorithm={algorithm}", f"distributed.zero_stage={stage}", *extra]
    one = meta_train_local(load_config(MetaTrainConfig, ROOT / "jobs/configs/tiny.yaml", base), export=True)
    two_metrics, two_export = _run_ray(
        load_config(MetaTrainConfig, ROOT / "jobs/configs/tiny.yaml", [*base, "distributed.num_workers=2"]),
        tmp_path)
    assert two_metrics["meta_steps"] == one.final["meta_steps"] == 4
    assert two_metrics["meta_val_loss_end"] == pytest.approx(one.final["meta_val_loss_end"], rel=1e-4)
    w1, w2 = _weights(one.export_dir), _weights(two_export)
    assert w1.keys() == w2.keys()
    for key in w1:
        assert torch.allclose(w1[key], w2[key], rtol=1e-4, atol=1e-5), key
    # and training really moved the weights (the comparison is not vacuous)
    init = meta_train_local(load_config(MetaTrainConfig, ROOT / "jobs/configs/tiny.yaml",
                                        [*base, "meta.meta_steps=1"]), export=True)
    moved = _weights(init.export_dir)
    assert any(not torch.allclose(moved[k], w1[k]) for k in w1 if k.startswith("base."))


@pytest.mark.parametrize("algorithm, extra, zero3_extra", [
    ("maml", [], []), ("mltd", MLTD_2ND, []), ("maml", ["meta.inner_steps=3"], ["meta.inner_checkpointing=true"])])
def test_zero3_second_order_equals_zero1(tmp_path, algorithm: str, extra: list[str], zero3_extra: list[str]) -> None:
    """ZeRO-3 keeps weights gathered through the double backward (train/zero3.py): same meta-gradient as ZeRO-1,
    also when ZeRO-3 recomputes the inner steps in the meta-backward (meta.inner_checkpointing)."""
    from metaprep.train.local import meta_train_local

    runs = [meta_train_local(load_config(MetaTrainConfig, ROOT / "jobs/configs/tiny.yaml",
                                         [*FAST, "meta.meta_steps=2", f"algorithm={algorithm}", *extra,
                                          f"distributed.zero_stage={stage}", *(zero3_extra if stage == 3 else [])]),
                             export=True) for stage in (1, 3)]
    assert runs[1].final["meta_val_loss_end"] == pytest.approx(runs[0].final["meta_val_loss_end"], rel=1e-5)
    w1, w3 = _weights(runs[0].export_dir), _weights(runs[1].export_dir)
    assert w1.keys() == w3.keys()
    for key in w1:
        assert torch.allclose(w1[key], w3[key], rtol=1e-4, atol=1e-5), (key, float((w1[key] - w3[key]).abs().max()))


@pytest.mark.parametrize("stage", [1, 3])
def test_resumed_run_equals_the_uninterrupted_run(tmp_path, stage: int) -> None:
    """Checkpoint at meta-step 2 (DeepSpeed shards + optimizer state + trainer state), restore, finish at 4."""
    from metaprep.train.local import ensure_process_group
    from metaprep.train.loop import WorkerEnv, run_worker

    ensure_process_group()
    cfg = load_config(MetaTrainConfig, ROOT / "jobs/configs/tiny.yaml",
                      [*FAST, "algorithm=maml", f"distributed.zero_stage={stage}", "checkpoint.every=2"])
    reported: list[Path] = []
    whole = run_worker(cfg, WorkerEnv(0, 1, lambda m, path: path and reported.append(path), None,
                                      tmp_path / "a"), None)
    assert [p.name for p in reported] == ["ckpt-2-rank0", "export-rank0"]  # one checkpoint, then the export
    resumed = run_worker(cfg, WorkerEnv(0, 1, lambda m, path: None, reported[0], tmp_path / "b"), None)
    curve = dict(whole.final["meta_val_curve"])
    assert dict(resumed.final["meta_val_curve"]) == pytest.approx(curve, rel=1e-6) and curve[4] < curve[0]
    w1, w2 = _weights(whole.export_dir), _weights(resumed.export_dir)
    for key in w1:
        assert torch.allclose(w1[key], w2[key], rtol=1e-5, atol=1e-6), key


def _driver(stack: dict, name: str, extra: list[str], summary: Path) -> subprocess.Popen:
    env = {**stack["env"], "RAY_ADDRESS": stack["ray"]}
    return subprocess.Popen([sys.executable, "-m", "jobs.meta_train", "--config", "jobs/configs/tiny.yaml",
                             "--set", f"registry.name={name}", "--summary-out", str(summary), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _checkpoints(stack: dict, run_name: str) -> list[Path]:
    folder = Path(stack["env"]["METAPREP_STATE_DIR"]) / "ray_results" / run_name
    return sorted(folder.glob("checkpoint_*")) if folder.exists() else []


def _run_name(proc: subprocess.Popen, lines: list[str]) -> str:
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("metaprep: run "):
            return line.split()[2]
    raise AssertionError("".join(lines[-50:]))


def _assert_clean_history(stack: dict, summary: dict, name: str, steps: int) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack["mlflow"])
    logged = [m.step for m in client.get_metric_history(summary["run_id"], "meta_loss")]
    assert sorted(logged) == list(range(1, steps + 1)), logged  # no meta-step logged twice, none lost
    for kind in ("base", "controller"):
        assert len(client.search_model_versions(f"name='{name}-{kind}'")) == 1


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(stack, tmp_path) -> None:
    name, out = f"resume-{uuid.uuid4().hex[:6]}", tmp_path / "s.json"
    extra = ["--set", "meta.meta_steps=12", "--set", "checkpoint.every=3", "--set", "meta.eval_every=6"]
    proc, lines = _driver(stack, name, extra, out), []
    run_name = _run_name(proc, lines)
    deadline = time.time() + 300
    while not _checkpoints(stack, run_name) and time.time() < deadline:
        time.sleep(0.5)
    assert _checkpoints(stack, run_name), "no checkpoint was written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)
    resumed = subprocess.run([sys.executable, "-m", "jobs.meta_train", "--config", "jobs/configs/tiny.yaml",
                              "--set", f"registry.name={name}", "--summary-out", str(out), *extra,
                              "--resume", run_name], cwd=ROOT, env={**stack["env"], "RAY_ADDRESS": stack["ray"]},
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["meta_steps"] == 12
    _assert_clean_history(stack, summary, name, 12)


def _train_worker_pids() -> set[int]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in ps.splitlines() if "RayTrainWorker" in line and "ps -eo" not in line}


@pytest.mark.slow
def test_sigkill_of_a_worker_is_recovered(stack, tmp_path) -> None:
    name, out = f"kill-{uuid.uuid4().hex[:6]}", tmp_path / "s.json"
    before = _train_worker_pids()
    extra = ["--set", "meta.meta_steps=12", "--set", "checkpoint.every=3", "--set", "meta.eval_every=6",
             "--set", "distributed.num_workers=2"]
    proc, lines = _driver(stack, name, extra, out), []
    run_name = _run_name(proc, lines)
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not _checkpoints(stack, run_name):
            time.sleep(0.3)
        workers = sorted(_train_worker_pids() - before)
        if workers:
            os.kill(workers[-1], signal.SIGKILL)
            killed.append(workers[-1])

    thread = threading.Thread(target=killer)
    thread.start()
    lines.extend(proc.stdout)
    proc.wait(timeout=900)
    thread.join()
    assert killed, "no train worker was found to kill"
    assert proc.returncode == 0, "".join(lines[-80:])
    summary = json.loads(out.read_text())
    assert summary["meta_steps"] == 12
    _assert_clean_history(stack, summary, name, 12)
