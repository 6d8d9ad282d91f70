"""The local stack's Ray head requires its token (Ray token authentication), and jobs find that token."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from metaprep.runtime import AUTH_MODE_ENV, AUTH_TOKEN_PATH_ENV, STACK_TOKEN, use_stack_token

ROOT = Path(__file__).resolve().parents[1]


def _status(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_job_server_refuses_requests_without_the_stack_token(stack) -> None:
    """Anyone on this machine could otherwise submit code to the job server: 401 without the token, or with a
    wrong one (401 or 403); 200 with the token `make up` wrote into the state folder (readable by its owner only)."""
    token_file = Path(stack["env"]["RAY_AUTH_TOKEN_PATH"])
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    url = f"{stack['dashboard']}/api/version"
    assert _status(url) in (401, 403)
    assert _status(url, "0" * 64) in (401, 403)
    assert _status(url, token_file.read_text().strip()) == 200


def test_a_driver_started_by_hand_finds_the_stack_token(stack) -> None:
    """`python -m jobs.X` after `make up`, without sourcing .state/stack.env: init_ray uses the state folder's
    token and connects (without it, Ray refuses the connection)."""
    env = {k: v for k, v in stack["env"].items() if k not in (AUTH_MODE_ENV, AUTH_TOKEN_PATH_ENV, "RAY_AUTH_TOKEN")}
    code = ("import sys; sys.path.insert(0, 'service'); from metaprep.train.launch import init_ray; "
            "init_ray(False); import ray; print('CPU', ray.cluster_resources().get('CPU'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "CPU" in proc.stdout, proc.stderr[-2000:]


@pytest.fixture()
def clean_auth_env(monkeypatch):
    """No auth settings in the environment, and Ray's cached config of this test process left as it is
    (use_stack_token re-reads it when ray._raylet is imported; other tests' drivers use the stack's token)."""
    for key in (AUTH_MODE_ENV, AUTH_TOKEN_PATH_ENV, "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delitem(sys.modules, "ray._raylet", raising=False)


def test_use_stack_token_makes_a_private_token_once(tmp_path, clean_auth_env) -> None:
    assert use_stack_token(tmp_path / "state") is True
    token = tmp_path / "state" / STACK_TOKEN
    first = token.read_text()
    assert len(first) == 64 and int(first, 16) >= 0 and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert os.environ[AUTH_MODE_ENV] == "token" and os.environ[AUTH_TOKEN_PATH_ENV] == str(token)
    os.environ.pop(AUTH_MODE_ENV)
    os.environ.pop(AUTH_TOKEN_PATH_ENV)
    assert use_stack_token(tmp_path / "state") is True and token.read_text() == first  # reused, not replaced


@pytest.mark.parametrize("key,value", [(AUTH_MODE_ENV, "disabled"), (AUTH_TOKEN_PATH_ENV, "/elsewhere/token"),
                                       ("RAY_AUTH_TOKEN", "abc")])
def test_use_stack_token_leaves_an_explicit_choice_alone(tmp_path, clean_auth_env, monkeypatch, key, value) -> None:
    monkeypatch.setenv(key, value)
    assert use_stack_token(tmp_path) is False
    assert not (tmp_path / STACK_TOKEN).exists() and os.environ[key] == value
