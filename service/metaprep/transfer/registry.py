"""Log a fitted transfer surrogate to MLflow and register it as a model version.

The folder written by :meth:`metaprep.transfer.recommender.Recommender.save` (``surrogate.json``,
``perf.safetensors``, optional ``cost.safetensors``, ``candidates.json``, ``evidence.json``) is logged as plain
artifacts of a run in the ``metaprep-transfer`` experiment, and ``mlflow.register_model`` registers
that artifact path under ``name``. Nothing is pickled: loading is ``Recommender.load`` on the
downloaded folder (:func:`download_surrogate`; :func:`load_recommender` takes either a folder or a
``models:/`` URI). Version tags record what was fitted (DESIGN.md §2, "Registry": tags, aliases; no
stages).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from metaprep.errors import RegistryError
from metaprep.jsonio import read_json
from metaprep.registry.names import check_model_name

EXPERIMENT = "metaprep-transfer"
ARTIFACT_PATH = "surrogate"
def register_surrogate(surrogate_dir: str | Path, name: str, tracking_uri: str, *,
                       tags: dict[str, str] | None = None) -> dict:
    """Log ``surrogate_dir`` as artifacts and register it; returns name, version, run id and source URI."""
    from mlflow.exceptions import MlflowException

    check_model_name(name)
    surrogate_dir = Path(surrogate_dir)
    spec_path = surrogate_dir / "surrogate.json"
    if not spec_path.exists():
        raise RegistryError(f"{surrogate_dir}: not a saved surrogate (surrogate.json missing); "
                            "save one with Recommender.save or jobs.recommend --surrogate-dir")
    spec = read_json(spec_path, "surrogate spec", RegistryError)
    if not isinstance(spec, dict):
        raise RegistryError(f"{spec_path}: must be a JSON object (written by Recommender.save)")
    version_tags = {"kind": spec.get("kind", ""), "meta_features": ",".join(spec.get("meta_features", [])),
                    "members": str(spec.get("members", "")), "format": "safetensors+json",
                    **(tags or {})}
    from metaprep.registry.client import ensure_experiment, log_params, mlflow_client

    run_id = None
    client = mlflow_client(tracking_uri)  # its own client, retried: the process's fluent tracking URI is left alone
    try:
        run = client.create_run(ensure_experiment(client, EXPERIMENT), run_name=f"surrogate-{name}",
                                tags=version_tags)
        run_id = run.info.run_id
        log_params(client, run_id, {"members": spec.get("members"), "hidden": spec.get("hidden"),
                                    "performance": spec.get("performance_desc", "")})
        client.log_artifacts(run_id, str(surrogate_dir), artifact_path=ARTIFACT_PATH)
        client.set_terminated(run_id)
        # the artifact URI itself: MLflow 3 resolves ``runs:/`` sources to logged *models*, and
        # these are plain artifacts (safetensors + JSON), not an MLflow model flavour
        source = f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_PATH}"
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(name, source, run_id=run_id, tags=version_tags)
    except MlflowException as exc:
        if run_id is not None:
            with contextlib.suppress(MlflowException):
                client.set_terminated(run_id, "FAILED")
        raise RegistryError(f"{tracking_uri}: cannot register surrogate {name!r} "
                            f"({exc.message.splitlines()[0]})") from None
    return {"name": name, "version": str(version.version), "run_id": run_id, "source": source}


def download_surrogate(model_uri: str, dst: str | Path, tracking_uri: str) -> Path:
    """Download a registered surrogate (``models:/NAME/VERSION`` or ``models:/NAME@alias``) to ``dst``: the version
    is looked up in ``tracking_uri``'s registry (not the process's fluent registry URI, which another job or test
    may have set), then its source folder is downloaded."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from metaprep.registry.resolve import registered_source

    source = registered_source(model_uri, tracking_uri)
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri)
    except MlflowException as exc:
        raise RegistryError(f"{model_uri}: cannot download {source} ({exc.message.splitlines()[0]})") from None
    return Path(path)


def load_recommender(surrogate: str, tracking_uri: str | None = None):
    """A fitted :class:`~metaprep.transfer.recommender.Recommender` from a saved folder or a registered
    ``models:/NAME/VERSION`` | ``models:/NAME@alias`` (downloaded from ``tracking_uri`` / ``MLFLOW_TRACKING_URI``)."""
    import tempfile

    from metaprep.registry.tracking import tracking_uri as resolve_uri
    from metaprep.transfer.recommender import Recommender

    if not surrogate.startswith("models:/"):
        return Recommender.load(Path(surrogate).expanduser())
    with tempfile.TemporaryDirectory() as tmp:  # Recommender.load reads everything into memory
        return Recommender.load(download_surrogate(surrogate, tmp, resolve_uri(tracking_uri)))
