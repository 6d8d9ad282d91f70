"""Shared fixtures: the shared data location and ONE local stack (Ray + MLflow) per test session."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# The local stack's Ray head runs in Ray's single-machine mode (its servers listen on 127.0.0.1 only);
# clients in this process and its subprocesses use the same mode (metaprep.runtime.use_loopback_ray).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _healthy(url: str, token: Path | None = None) -> bool:
    headers = {"Authorization": f"Bearer {token.read_text().strip()}"} if token and token.is_file() else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3) as resp:
            return resp.status == 200
    except OSError:
        return False


def _stack_env(state: Path) -> dict[str, str]:
    """What clients of the stack need (``cluster/stack.sh up`` writes it to ``<state>/stack.env``): the MLflow
    URI, the dashboard address, Ray's loopback mode and its token authentication."""
    line = (state / "stack.env").read_text().strip()
    return dict(item.split("=", 1) for item in line.removeprefix("export ").split())


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture(scope="session")
def stack() -> dict:
    """Start the real local stack once (cluster/stack.sh up), reuse it if it is already running."""
    port = os.environ.get("MLFLOW_PORT", "5000")
    state = Path(os.environ.get("METAPREP_STATE_DIR", str(ROOT / ".state")))
    env = {**os.environ, "METAPREP_STATE_DIR": str(state), "RAY_TRAIN_V2_ENABLED": "1"}
    mlflow_uri = f"http://127.0.0.1:{port}"
    already = (_healthy(f"{mlflow_uri}/health") and (state / "stack.env").is_file()
               and _healthy("http://127.0.0.1:8265/api/version", state / "ray_auth_token"))
    if not already:
        subprocess.run(["bash", str(ROOT / "cluster" / "stack.sh"), "up"], check=True, env=env, cwd=ROOT,
                       timeout=600)
    clients = {k: v for k, v in _stack_env(state).items() if k != "RAY_ADDRESS"}  # drivers find the head
    env.update(clients)
    os.environ.update(clients)  # this process and every job it starts authenticate to the stack's Ray
    info = {"mlflow": mlflow_uri, "dashboard": "http://127.0.0.1:8265", "ray": "127.0.0.1:6379",
            "env": {**env, "MLFLOW_TRACKING_URI": mlflow_uri}}
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    yield info
    if not already and os.environ.get("METAPREP_KEEP_STACK") != "1":
        subprocess.run(["bash", str(ROOT / "cluster" / "stack.sh"), "down"], env=env, cwd=ROOT, timeout=120)


@pytest.fixture(scope="session")
def ray_cluster(stack):
    """A driver connection to the running Ray head (for tests that launch Ray Train directly)."""
    import ray

    os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
    if not ray.is_initialized():
        ray.init(address=stack["ray"], log_to_driver=False)
    yield ray
