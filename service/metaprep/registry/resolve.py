"""Resolve ``models:/NAME@alias``, ``models:/NAME/VERSION`` or a local folder to a local path, and find the
controller prepared together with a base (what ``jobs.adapt`` uses when ``--controller`` is left out)."""

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

    tracking, mv = _model_version(uri, m, tracking)
    dst = Path(tempfile.mkdtemp(prefix="metaprep-artifact-"))
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst),
                                                        tracking_uri=tracking))
    except MlflowException as exc:
        raise RegistryError(f"{uri}: cannot download {mv.source} ({str(exc).splitlines()[0]})") from None


def _model_version(uri: str, m: re.Match, tracking: str | None):
    """(tracking URI, the ``ModelVersion`` that ``uri`` names); one line naming the URI when it has none."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from metaprep.registry.tracking import reachable_tracking_uri

    tracking = reachable_tracking_uri(tracking)
    client = MlflowClient(tracking_uri=tracking)
    try:
        return tracking, (client.get_model_version_by_alias(m["name"], m["alias"]) if m["alias"]
                          else client.get_model_version(m["name"], m["version"]))
    except MlflowException:
        which = f"alias {m['alias']!r}" if m["alias"] else f"version {m['version']}"
        raise RegistryError(f"{uri}: registered model {m['name']!r} has no {which} "
                            f"(browse the MLflow UI > Models for valid names, versions and aliases)") from None


def registered_version(uri: str, tracking: str | None) -> tuple[str, str]:
    """(registered name, version) that ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names (an alias resolved
    now), else a one-line error naming the URI."""
    m = _URI.match(uri)
    if not m:
        raise RegistryError(f"{uri}: malformed registry URI; expected models:/NAME@ALIAS or models:/NAME/VERSION")
    _, mv = _model_version(uri, m, tracking)
    return m["name"], str(mv.version)


def registered_source(uri: str, tracking: str | None) -> str:
    """The artifact source of the version ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names."""
    m = _URI.match(uri)
    if not m:
        raise RegistryError(f"{uri}: malformed registry URI; expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return _model_version(uri, m, tracking)[1].source


def companion_controller(base: str, tracking: str | None) -> str:
    """The controller prepared with ``base``: for ``models:/NAME-base@ALIAS`` (or ``/VERSION``) the
    ``NAME-controller`` version registered from the same MLflow run; for a folder ``X/base``, ``X/controller``
    (what ``jobs.meta_train`` exports). The controller holds the spec (algorithm, reparam) and the fast-weight
    init every algorithm adapts from, and for ``mltd`` the TAMS controller, so it is always needed."""
    hint = "pass --controller models:/NAME-controller@ALIAS (or the controller folder)"
    if not base.startswith("models:/"):
        resolve_artifact(base, tracking)  # a missing base folder is named as such
        sibling = Path(base).parent / "controller"
        if (sibling / "spec.json").is_file():
            return str(sibling)
        raise RegistryError(f"--controller: not given, and there is no controller/ folder next to --base {base}; "
                            f"{hint}")
    m = _URI.match(base)
    if not m or not m["name"].endswith("-base") or "'" in m["name"]:
        raise RegistryError(f"--controller: not given, and --base {base} is not models:/NAME-base@ALIAS or "
                            f"models:/NAME-base/VERSION, whose NAME-controller could be found; {hint}")
    from mlflow.tracking import MlflowClient

    tracking, mv = _model_version(base, m, tracking)
    name = m["name"][:-len("-base")] + "-controller"
    found = MlflowClient(tracking_uri=tracking).search_model_versions(f"name='{name}' and run_id='{mv.run_id}'")
    if not found:
        raise RegistryError(f"--controller: not given, and no {name} version was registered by the run of --base "
                            f"{base} (run {mv.run_id}); {hint}")
    return f"models:/{name}/{found[0].version}"
