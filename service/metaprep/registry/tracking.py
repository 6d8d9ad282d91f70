"""MLflow tracking that survives a flaky server: buffered, retried metric logging.

Workers log per-step metrics through :class:`MetricLogger`; when the tracking server is down,
batches stay in a buffer and are retried on the next call and at :meth:`flush`, so training
never stops for MLflow and nothing is lost. After a restore, steps already logged are skipped
(``skip_through``), so no meta-step appears twice in a run's history.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from metaprep.errors import RegistryError
from metaprep.registry.client import attempts

log = logging.getLogger(__name__)


def tracking_uri(configured: str | None = None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RegistryError("no MLflow tracking URI: set tracking.uri, MLFLOW_TRACKING_URI "
                            "(e.g. http://127.0.0.1:5000 from `make up`) or a sqlite:///path.db file")
    return uri


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (before any training) when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
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
    check_reachable(uri)
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


def log_benchmark(report: dict, files: list[Path]) -> None:
    """Log a benchmark report (metrics per method and its files) as one MLflow run."""
    import mlflow

    mlflow.set_experiment("metaprep-benchmarks")
    with mlflow.start_run(run_name=f"benchmark-{report['suite']}"):
        mlflow.set_tag("suite", report["suite"])
        mlflow.log_metric("runtime_s", report["runtime_s"])
        for row in report.get("results", []):
            setting = "_".join(f"{k}{v}" for k, v in sorted(row.get("setting", {}).items()))
            key = "/".join(x for x in (row["method"], row["metric"], setting) if x)
            if row["mean"] == row["mean"]:
                mlflow.log_metric(key.replace(",", "_")[:250], row["mean"])
        for f in files:
            if f.exists():
                mlflow.log_artifact(str(f))
