"""Issue 22, class 8: every server of the local stack listens on the loopback only, during a real job."""

from __future__ import annotations

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
    assert not exposed, f"stack servers listening beyond 127.0.0.1: {exposed}"
