"""Issue 22, class 8: every server of the local stack listens on the loopback only, during a real job."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "::1"}


def _stack_process(pid: str) -> bool:
    """A process of the local stack: Ray (GCS, raylet, agents, workers, job drivers) or the MLflow server."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return any(word in cmdline for word in ("ray", "mlflow", "gcs_server", "raylet"))


def _listeners() -> set[tuple[str, str]]:
    """(local address, process) of every listening TCP socket that belongs to the stack."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=30).stdout
    found = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        local, procs = fields[3], " ".join(fields[5:])
        pids = re.findall(r"pid=(\d+)", procs)
        if any(_stack_process(pid) for pid in pids):
            found.add((local, procs))
    return found


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_no_stack_server_listens_beyond_the_loopback_during_a_job(stack) -> None:
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", stack["dashboard"],
           "--working-dir", ".", "--", "python", "-m", "jobs.meta_train", "--config", "jobs/configs/tiny.yaml",
           "--set", f"registry.name=net-{uuid.uuid4().hex[:8]}", "--set", "meta.meta_steps=12",
           "--set", "registry.register=false"]
    job = subprocess.Popen(cmd, cwd=ROOT, env=stack["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    seen: set[tuple[str, str]] = set()
    while job.poll() is None:  # sample while the driver, the Train controller and its workers are up
        seen |= _listeners()
        time.sleep(0.5)
    output = job.stdout.read()
    assert job.returncode == 0, output[-3000:]
    assert any("raylet" in p for _, p in seen) and any("gcs_server" in p for _, p in seen), seen
    exposed = sorted((addr, p) for addr, p in seen if addr.rsplit(":", 1)[0] not in LOOPBACK)
    # Known exception, documented in the README: torch.distributed's rendezvous store (TCPStore), which
    # the rank-0 Ray Train worker opens for the gloo process group, binds the wildcard address (torch 2.13
    # has no bind-address option). At most one such listener per Train worker process (a worker group
    # that Ray Train restarts opens a new one); nothing else.
    # A process's name changes while it runs (ss shows 15 characters of the title Ray sets per task:
    # "ray::RayTrainWo", or "ray::execute._s" while the worker runs the process-group setup), so a
    # listener is told apart by its pid: one whose process was ever seen as a Train worker.
    train_pids = {pid for _, p in seen if "RayTrainWo" in p for pid in re.findall(r"pid=(\d+)", p)}
    wildcard = ("*:", "0.0.0.0:", "[::]:")
    store = [(addr, p) for addr, p in exposed
             if addr.startswith(wildcard) and set(re.findall(r"pid=(\d+)", p)) <= train_pids]
    per_pid = {}
    for addr, p in store:
        for pid in re.findall(r"pid=(\d+)", p):
            per_pid.setdefault(pid, set()).add(addr)
    assert all(len(addrs) == 1 for addrs in per_pid.values()), store
    others = [e for e in exposed if e not in store]
    assert not others, f"stack servers listening beyond 127.0.0.1: {others}"


def test_clients_of_a_loopback_head_use_rays_single_machine_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray turns 127.0.0.1 into the machine's address unless the client is in single-machine mode."""
    from ray._private import ray_constants

    from metaprep.runtime import LOOPBACK_ENV, use_loopback_ray

    monkeypatch.delenv(LOOPBACK_ENV, raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    assert use_loopback_ray("10.1.2.3:6379") is False and LOOPBACK_ENV not in os.environ
    assert ray_constants.ENABLE_RAY_CLUSTER is True
    for address in ("127.0.0.1:6379", "http://127.0.0.1:8265", "localhost:6379"):
        monkeypatch.delenv(LOOPBACK_ENV, raising=False)
        assert use_loopback_ray(address) is True
        assert os.environ[LOOPBACK_ENV] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
