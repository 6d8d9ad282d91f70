"""Two Ray nodes on this one machine (issue 21), honest about what that proves.

The second node runs in its own mount namespace (``tests/isolated.sh``): an empty ``/tmp``, no view of the
checkout or of the stack's state folder (MLflow's database and artifacts, the Ray token file); it sees only
the image's virtualenv and a storage folder mounted into both namespaces at the same path (what an NFS mount
gives). It joins the local stack's Ray head with the cluster token, like a node started by the cluster
launcher. The job, submitted with ``ray job submit``, places one Train worker per node (``STRICT_SPREAD``),
so the second node's worker can only import ``metaprep`` as Ray ships it (``py_modules``) and can only write
checkpoints and its status through the shared storage. The node is killed (every process of its namespace)
after the first checkpoint and started again; the run resumes through ``FailureConfig``, finishes and
registers. A client in a third namespace, which reaches MLflow only over HTTP (no state folder, no
storage), then adapts the registered model.

Not proven here: separate network stacks (the nodes talk over 127.0.0.1) or separate process tables.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
ISOLATED = ROOT / "tests" / "isolated.sh"
RESOURCE = "metaprep_node2"
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _can_isolate() -> bool:
    probe = subprocess.run(["bash", str(ISOLATED), "--", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _pids_in(ns: str) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _mnt_ns(int(p)) == ns]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class SecondNode:
    """A Ray worker node in its own mount namespace, joined to the stack's head."""

    def __init__(self, state: Path, shared: Path, log: Path):
        self.state, self.shared, self.log = state, shared, log
        self.proc: subprocess.Popen | None = None
        self.ns: str | None = None

    def start(self) -> None:
        import ray

        token = (self.state / "ray_auth_token").read_text().strip()
        agent, grpc, metrics, runtime_env = _free_ports(4)
        cmd = ["bash", str(ISOLATED), "--keep", str(VENV), "--keep", str(self.shared),
               "--hide", str(ROOT), "--hide", str(self.state), "--",
               # the stack's clients run in Ray's single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), which
               # refuses to start a worker node: a second node opts out of it (tests/ray_worker_node.py)
               "env", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1", "RAY_AUTH_MODE=token", f"RAY_AUTH_TOKEN={token}",
               "RAY_TRAIN_V2_ENABLED=1",
               f"PATH={VENV}/bin:/usr/local/bin:/usr/bin:/bin", f"{VENV}/bin/python", "-", "start",
               "--address=127.0.0.1:6379", "--node-ip-address=127.0.0.1", "--num-cpus=2",
               f"--resources={json.dumps({RESOURCE: 2})}", "--disable-usage-stats", "--block",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
               "--min-worker-port=20000", "--max-worker-port=29999"]
        with self.log.open("a") as out:  # the launcher's source on stdin: the node cannot see the checkout
            self.proc = subprocess.Popen(cmd, stdin=(ROOT / "tests" / "ray_worker_node.py").open("rb"), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            alive = [n for n in ray.nodes() if n["Alive"] and RESOURCE in n.get("Resources", {})]
            if alive:
                here = _mnt_ns(os.getpid())
                self.ns = next((_mnt_ns(p) for p in _pids_in_session(self.proc.pid) if _mnt_ns(p) != here), None)
                assert self.ns is not None, "the second node is not in its own mount namespace"
                return
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(1)
        raise AssertionError("the second node did not join: " + self.log.read_text()[-3000:])

    def train_workers(self) -> list[int]:
        return [p for p in _pids_in(self.ns) if "RayTrainWorker" in _cmdline(p)] if self.ns else []

    def kill(self) -> None:
        """SIGKILL every process of the node's namespace (raylet, workers, agents): the machine is gone."""
        import ray

        if self.ns:
            for pid in _pids_in(self.ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait(timeout=30)
        deadline = time.time() + 90
        while time.time() < deadline and any(n["Alive"] and RESOURCE in n.get("Resources", {})
                                             for n in ray.nodes()):
            time.sleep(1)


def _pids_in_session(sid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.getsid(int(p)) == sid:
                    out.append(int(p))
            except OSError:
                pass
    return out


@pytest.fixture
def shared(tmp_path) -> Path:
    folder = tmp_path / "nfs"
    folder.mkdir()
    return folder


def test_meta_training_across_two_nodes_survives_losing_one(stack, ray_cluster, tmp_path, shared) -> None:
    if not _can_isolate():
        pytest.skip("mount namespaces are not available here (needs root or unprivileged user namespaces)")
    from mlflow.tracking import MlflowClient

    state = Path(stack["env"]["METAPREP_STATE_DIR"])
    node = SecondNode(state, shared, tmp_path / "node2.log")
    node.start()
    name = f"two-node-{uuid.uuid4().hex[:6]}"
    storage = shared / "ray_results"
    summary_path = shared / "summary.json"
    job = subprocess.Popen(
        [str(VENV / "bin" / "ray"), "job", "submit", "--address", stack["dashboard"], "--working-dir", ".", "--",
         "python", "-m", "jobs.meta_train", "--config", "jobs/configs/tiny.yaml",
         "--set", f"registry.name={name}", "--set", f"tracking.experiment={name}",
         "--set", "distributed.num_workers=2", "--set", "distributed.placement_strategy=STRICT_SPREAD",
         "--set", f"checkpoint.storage_path={storage}", "--set", "checkpoint.every=3",
         "--set", "meta.meta_steps=15", "--set", "meta.eval_every=5", "--summary-out", str(summary_path)],
        cwd=ROOT, env=stack["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True)
    reader.start()
    seen: dict[str, list[int]] = {}
    try:
        deadline = time.time() + 600
        while time.time() < deadline and job.poll() is None:
            seen["before"] = seen.get("before") or node.train_workers()
            if seen["before"] and list(storage.glob("*/checkpoint_*")):
                break
            time.sleep(0.3)
        assert seen.get("before"), "no Train worker ran on the second node:\n" + "".join(lines[-60:])
        assert list(storage.glob("*/checkpoint_*")), "no checkpoint reached the shared storage"
        assert job.poll() is None, "the run ended before the node could be killed:\n" + "".join(lines[-60:])
        node.kill()
        node.start()  # the machine comes back; Ray Train restarts the worker group from the last checkpoint
        while time.time() < deadline and job.poll() is None:
            seen["after"] = seen.get("after") or node.train_workers()
            time.sleep(0.5)
        job.wait(timeout=max(1, deadline - time.time()))
        reader.join(timeout=10)
        log = "".join(lines)
        assert job.returncode == 0, log[-5000:]
        assert seen.get("after"), "the restarted node got no Train worker:\n" + log[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
        node.kill()

    summary = json.loads(summary_path.read_text())
    assert summary["meta_steps"] == 15
    client = MlflowClient(tracking_uri=stack["mlflow"])
    logged = sorted(m.step for m in client.get_metric_history(summary["run_id"], "meta_loss"))
    assert logged == list(range(1, 16)), logged  # resumed: no meta-step lost or logged twice
    mv = client.get_model_version_by_alias(f"{name}-base", "candidate")
    assert mv.source.startswith("mlflow-artifacts:"), mv.source  # the server owns the artifacts
    assert any((storage / summary["run_name"]).glob("checkpoint_*"))  # the run lives in the shared storage

    # a client on a third machine: the checkout's code and the MLflow URL, nothing else of this host
    from metaprep.tasks.synthetic import make_synthetic_tasks

    client_dir = tmp_path / "client"
    client_dir.mkdir()
    task = make_synthetic_tasks(1, 40, seed=4242)[0]
    (client_dir / "new.jsonl").write_text("".join(
        json.dumps({"task": "new", "prompt": e.prompt, "target": e.target}) + "\n" for e in task.examples))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "METAPREP_"))}
    env["MLFLOW_TRACKING_URI"] = stack["mlflow"]
    adapt = subprocess.run(
        ["bash", str(ISOLATED), "--keep", str(ROOT), "--keep", str(client_dir), "--hide", str(state), "--",
         sys.executable, "-m", "jobs.adapt", "--base", f"models:/{name}-base@candidate",
         "--controller", f"models:/{name}-controller@candidate", "--tasks", str(client_dir / "new.jsonl"),
         "--shots", "8", "--steps", "5", "--summary-out", str(client_dir / "adapt.json")],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT / "service") + os.pathsep + str(ROOT)},
        capture_output=True, text=True, timeout=600)
    assert adapt.returncode == 0, adapt.stdout[-3000:] + adapt.stderr[-3000:]
    adapted = json.loads((client_dir / "adapt.json").read_text())
    assert adapted["query_loss_after"] < adapted["query_loss_before"]
