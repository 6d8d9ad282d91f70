"""Deployment files parse and name entrypoints and configs that exist (Docker cannot run here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _job_refs(text: str) -> list[tuple[str, str | None]]:
    return [(m.group(1), m.group(3)) for m in
            re.finditer(r"python -m (jobs\.\w+)(\s+--config\s+(\S+))?", text)]


def _kuberay() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())}


def test_kuberay_rayjob_runs_an_existing_job_and_recipe() -> None:
    doc = _kuberay()["RayJob"]
    assert doc["apiVersion"].startswith("ray.io/")
    refs = _job_refs(doc["spec"]["entrypoint"])
    assert refs and all((ROOT / (mod.replace(".", "/") + ".py")).exists() for mod, _ in refs)
    assert all((ROOT / cfg).exists() for _, cfg in refs if cfg)


def test_kuberay_pods_share_mlflow_storage_and_data_from_the_environment() -> None:
    """Issue 21: every pod (head and workers) gets the MLflow URI and a storage URI from one ConfigMap, the storage
    credentials from an optional Secret, and the data volume; the storage is one every pod reaches."""
    docs = _kuberay()
    env = docs["ConfigMap"]["data"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http")  # the server, never a file store
    assert "://" in env["METAPREP_STORAGE_PATH"] and not env["METAPREP_STORAGE_PATH"].startswith("file:")
    spec = docs["RayJob"]["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    for pod in pods:
        container = pod["containers"][0]
        refs = {(k, v["name"]) for e in container["envFrom"] for k, v in e.items()}
        assert refs == {("configMapRef", docs["ConfigMap"]["metadata"]["name"]), ("secretRef", "metaprep-storage")}
        mount = container["volumeMounts"][0]
        assert mount["mountPath"] == env["METAPREP_DATA_DIR"]
        assert any(v["name"] == mount["name"] for v in pod["volumes"])
    from metaprep.train.launch import STORAGE_ENV

    assert STORAGE_ENV == "METAPREP_STORAGE_PATH"


def test_mlflow_server_owns_its_artifacts_everywhere() -> None:
    """The local stack, the Kubernetes server and the cluster launcher's head all serve artifacts (proxied), so no
    client writes into the server's folder directly."""
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "cluster" / "mlflow-server.yaml").read_text())}
    args = " ".join(docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"])
    launcher = (ROOT / "cluster" / "ray-cluster.yaml").read_text()
    stack = (ROOT / "cluster" / "stack.sh").read_text()
    for text in (args, launcher, stack):
        assert "--serve-artifacts" in text and "--artifacts-destination" in text
        assert "--default-artifact-root" not in text
    assert docs["Service"]["spec"]["ports"][0]["port"] == 5000


def test_cluster_launcher_uses_the_image_and_job_server_port() -> None:
    doc = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    assert doc["docker"]["image"].startswith("metaprep")
    assert any("--dashboard-port=8265" in c for c in doc["head_start_ray_commands"])
    text = (ROOT / "cluster" / "ray-cluster.yaml").read_text()
    assert all((ROOT / cfg).exists() for _, cfg in _job_refs(text) if cfg)
    options = " ".join(doc["docker"]["run_options"])
    for key in ("MLFLOW_TRACKING_URI", "METAPREP_STORAGE_PATH", "METAPREP_DATA_DIR"):
        assert f"-e {key}" in options, key  # every node gets them from the environment of `ray up`
    shared = re.search(r"-v (\S+):(\S+)", options)
    assert shared and shared.group(1) == shared.group(2)  # the shared mount is at the same path everywhere
    assert any(shared.group(1) in c for c in doc["initialization_commands"])


def test_dockerfile_installs_torch_first_and_the_package() -> None:
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    text = "\n".join(lines)
    assert lines[0].startswith("ARG BASE_IMAGE") and "FROM ${BASE_IMAGE}" in text
    assert text.index("${TORCH_SPEC}") < text.index("pip install --no-cache-dir -e .")
    for src in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (ROOT / src).exists(), src


def test_makefile_has_the_documented_targets_and_ci_calls_make_test() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in ("install", "up", "down", "demo", "test"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
    assert "make test" in (ROOT / ".ci" / "run").read_text()
