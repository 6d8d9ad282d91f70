"""Resolve ``models:/NAME@alias``, ``models:/NAME/VERSION`` or a local folder to a local path."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from metaprep.errors import RegistryError

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


def resolve_artifact(uri: str, tracking: str | None) -> Path:
    """Download a registered version's artifact folder (or accept a local exported folder)."""
    if not uri.startswith("models:/"):
        path = Path(uri)
        if not path.is_dir():
            raise RegistryError(f"{uri}: not a models:/NAME@alias or models:/NAME/VERSION URI, nor a folder")
        return path
    m = _URI.match(uri)
    if not m:
        raise RegistryError(f"{uri}: malformed registry URI; expected models:/NAME@ALIAS or models:/NAME/VERSION")
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from metaprep.registry.tracking import reachable_tracking_uri

    tracking = reachable_tracking_uri(tracking)
    client = MlflowClient(tracking_uri=tracking)
    try:
        mv = (client.get_model_version_by_alias(m["name"], m["alias"]) if m["alias"]
              else client.get_model_version(m["name"], m["version"]))
    except MlflowException:
        which = f"alias {m['alias']!r}" if m["alias"] else f"version {m['version']}"
        raise RegistryError(f"{uri}: registered model {m['name']!r} has no {which} "
                            f"(browse the MLflow UI > Models for valid names, versions and aliases)") from None
    dst = Path(tempfile.mkdtemp(prefix="metaprep-artifact-"))
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst),
                                                        tracking_uri=tracking))
    except MlflowException as exc:
        raise RegistryError(f"{uri}: cannot download {mv.source} ({str(exc).splitlines()[0]})") from None
