"""Safe defaults: servers on 127.0.0.1, no remote code, nothing unpickled when loading artifacts."""

from __future__ import annotations

import re
from pathlib import Path

import psutil
import pytest

SERVICE = Path(__file__).resolve().parents[1] / "service" / "metaprep"


@pytest.mark.integration
def test_dashboard_job_server_and_mlflow_listen_on_loopback_only(stack) -> None:
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    for port in (8265, int(stack["mlflow"].rsplit(":", 1)[1])):
        addrs = {c.laddr.ip for c in listening if c.laddr.port == port}
        assert addrs and addrs <= {"127.0.0.1"}, (port, addrs)


def _sources() -> list[tuple[Path, str]]:
    return [(p, p.read_text()) for p in SERVICE.rglob("*.py")]


def test_every_from_pretrained_disables_remote_code_and_downloads() -> None:
    from metaprep.models.hf import OFFLINE

    assert OFFLINE == {"local_files_only": True, "trust_remote_code": False}
    for path, text in _sources():
        assert "trust_remote_code=True" not in text and '"trust_remote_code": True' not in text, path
        for call in re.finditer(r"\.from_pretrained\(", text):
            window = text[call.end(): call.end() + 300]
            line = text[text.rfind("\n", 0, call.start()) + 1: text.find("\n", call.end())]
            if "``" in line:
                continue  # a docstring mention
            assert "trust_remote_code=False" in window or "**OFFLINE" in window, (path, window[:80])


def test_registry_and_model_loading_never_unpickle() -> None:
    """No pickle, and MLflow pyfunc only as "models from code": ``python_model`` is the path of a source file
    (``registry/pyfunc_entry.py``), never an instance that MLflow would cloudpickle."""
    for path, text in _sources():
        if path.parent.name in ("registry", "models", "transfer"):
            unpickling = r"import pickle|pickle\.loads?\(|torch\.load\(|cloudpickle|pyfunc\.load_model"
            assert not re.search(unpickling, text), path
            for call in re.finditer(r"python_model=([^,)]+)", text):
                assert call.group(1).startswith("str(ENTRY"), (path, call.group(0))
