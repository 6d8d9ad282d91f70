"""MLflow tracking that survives a flaky server: buffered, retried metric logging.

Workers log per-step metrics through :class:`MetricLogger`; when the tracking server is down,
batches stay in a buffer and are retried on the next call and at :meth:`flush`, so training
never stops for MLflow and nothing is lost. After a restore, steps already logged are skipped
(``skip_through``), so no meta-step appears twice in a run's history.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from metaprep.errors import MetaprepError, RegistryError
from metaprep.registry.client import attempts

log = logging.getLogger(__name__)


TRACKING_SCHEMES = ("http", "https", "sqlite")  # MLflow 3 refuses its file store (file:, ./mlruns) by default
TRACKING_FORMS = "http://HOST:PORT, https://HOST[:PORT] or sqlite:///PATH.db"


def tracking_uri(configured: str | None = None) -> str:
    """``tracking.uri`` when set, else ``MLFLOW_TRACKING_URI``; its form checked (:func:`check_scheme`)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RegistryError("no MLflow tracking URI: set tracking.uri, MLFLOW_TRACKING_URI "
                            "(e.g. http://127.0.0.1:5000 from `make up`) or a sqlite:///path.db file")
    check_scheme(uri, "tracking.uri" if configured else "MLFLOW_TRACKING_URI")
    return uri


def check_tracking_uri(uri: str, source: str, error: type[MetaprepError] = RegistryError) -> None:
    """Everything about a tracking URI that can be checked without a server: its form and, for ``sqlite:``,
    that the database can be written where it is."""
    check_scheme(uri, source, error)
    check_sqlite_store(uri, source, error)


def check_scheme(uri: str, source: str, error: type[MetaprepError] = RegistryError) -> None:
    """Refuse a tracking URI that is not one of :data:`TRACKING_FORMS` (``source`` names where it was set)."""
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme.lower() not in TRACKING_SCHEMES:
        what = f"unknown scheme {scheme + ':'!r} in {uri!r}" if sep else f"{uri!r} has no scheme"
        raise error(f"{source}: {what}; a tracking URI is {TRACKING_FORMS}")
    if scheme.lower() == "sqlite":
        sqlite_path(uri, source, error)
    elif not rest.startswith("//") or not rest[2:].split("/", 1)[0]:
        raise error(f"{source}: {uri!r} has no host; a tracking URI is {TRACKING_FORMS}")


def sqlite_path(uri: str, source: str = "tracking URI", error: type[MetaprepError] = RegistryError) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI (``sqlite:////abs/path``: absolute); None for other schemes."""
    if not uri.lower().startswith("sqlite:"):
        return None
    path = uri[len("sqlite:"):].split("?", 1)[0]
    if not path.startswith("///") or path[3:] in ("", ":memory:"):
        raise error(f"{source}: {uri!r} names no database file; use sqlite:///relative/path.db or "
                    "sqlite:////absolute/path.db")
    return Path(path[3:])


def check_sqlite_store(uri: str, source: str, error: type[MetaprepError] = RegistryError) -> None:
    """A ``sqlite:`` store must be a file in an existing, writable folder. Checked in milliseconds, because MLflow
    otherwise creates missing folders silently and retries an unwritable database for minutes."""
    db = sqlite_path(uri, source, error)
    if db is None:
        return
    folder = db.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise error(f"{source}: folder {folder} of {uri!r} {what}; create it first or choose another "
                    "sqlite:///PATH.db")
    if db.exists() and not db.is_file():
        raise error(f"{source}: {db} of {uri!r} is not a database file")
    try:
        with tempfile.TemporaryFile(dir=folder):  # catches a read-only mount too, where root passes os.access
            pass
        if db.exists():
            with open(db, "ab"):
                pass
    except OSError as exc:
        raise error(f"{source}: cannot write the database of {uri!r} in {folder} ({exc.strerror or exc})") from None


def check_reachable(uri: str, timeout_s: float = 5.0, source: str = "MLFLOW_TRACKING_URI") -> None:
    """Fail fast (before any training) when an HTTP tracking server does not answer or a sqlite store could
    not be written."""
    check_sqlite_store(uri, source)
    if not uri.lower().startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            if resp.status == 200:
                return
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RegistryError(f"MLflow tracking server {uri} is unreachable ({reason}); start it with "
                            f"`make up` or set MLFLOW_TRACKING_URI") from None
    raise RegistryError(f"MLflow tracking server {uri} answered /health with an error")


def reachable_tracking_uri(configured: str | None = None) -> str:
    """:func:`tracking_uri`, checked to answer: fail in seconds, before any training."""
    uri = tracking_uri(configured)
    check_reachable(uri, source="tracking.uri" if configured else "MLFLOW_TRACKING_URI")
    return uri


class MetricLogger:
    """Buffered ``log_batch`` into one run; retries failed batches, never raises during training."""

    def __init__(self, uri: str, run_id: str, skip_through: int = -1) -> None:
        # this process only logs metrics: fail fast per request and let the buffer retry, instead of
        # MLflow's own multi-minute HTTP retry loop stalling training while the server is down
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.skip_through = skip_through
        self.pending: list = []

    @staticmethod
    def last_logged_step(uri: str, run_id: str, key: str) -> int:
        from mlflow.tracking import MlflowClient

        try:
            history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)
        except Exception:  # noqa: BLE001 - server down at restore: log everything again later
            return -1
        return max((m.step for m in history), default=-1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step <= self.skip_through:
            return
        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items() if v == v)
        self._try_send()

    def _try_send(self) -> bool:
        while self.pending:
            batch = self.pending[:500]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:  # noqa: BLE001 - any transport error: keep buffering
                log.warning("MLflow unavailable (%s); %d metric values buffered", exc.__class__.__name__,
                            len(self.pending))
                return False
            del self.pending[:len(batch)]
        return True

    def flush(self, timeout_s: float = 300.0) -> None:
        """Retry until the buffer is empty or ``timeout_s`` passes (then raise)."""
        for _ in attempts(timeout_s):
            if self._try_send():
                return
        raise RegistryError(f"MLflow: {len(self.pending)} metric values could not be logged within "
                            f"{timeout_s:.0f} s")


METRIC_NAME_MAX = 250
_READABLE = (("->", "_to_"), ("@", "_at_"), (",", "_"))  # e.g. nmtlc.jsonl->qt, normalized_regret@1
_NOT_IN_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /:]")


def metric_name(text: str) -> str:
    """``text`` as an MLflow metric name: only alphanumerics, ``_ - . space / :`` (what MLflow accepts; ``->``
    reads ``_to_``, ``@`` ``_at_``, anything else becomes ``_``), no empty, ``.`` or ``..`` path segment (MLflow
    refuses names that are not normalised paths) and at most :data:`METRIC_NAME_MAX` characters."""
    for old, new in _READABLE:
        text = text.replace(old, new)
    text = _NOT_IN_METRIC_NAME.sub("_", text)
    parts = [p if p not in (".", "..") else "_" * len(p) for p in text[:METRIC_NAME_MAX].split("/") if p]
    return "/".join(parts) or "_"


def log_benchmark(report: dict, files: list[Path]) -> None:
    """Log a benchmark report (metrics per method and its files) as one MLflow run, to ``MLFLOW_TRACKING_URI``
    (set here: a fluent URI an earlier job or test left in this process must not decide where it goes)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment("metaprep-benchmarks")
    with mlflow.start_run(run_name=f"benchmark-{report['suite']}"):
        mlflow.set_tag("suite", report["suite"])
        mlflow.log_metric("runtime_s", report["runtime_s"])
        for row in report.get("results", []):
            setting = "_".join(f"{k}{v}" for k, v in sorted(row.get("setting", {}).items()))
            key = "/".join(x for x in (row["method"], row["metric"], setting) if x)
            if row["mean"] == row["mean"]:
                mlflow.log_metric(metric_name(key), row["mean"])
        for f in files:
            if f.exists():
                mlflow.log_artifact(str(f))
