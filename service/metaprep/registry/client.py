"""The MLflow client of the service: every call retried with backoff, so a blip never kills a run.

:func:`retry` is the one retry policy (1, 2, 4, ... 15 s pauses until a deadline; user errors and
MLflow errors that a retry cannot fix are raised at once); :func:`mlflow_client` wraps an
``MlflowClient`` so that each of its calls goes through it. :class:`~metaprep.registry.tracking.MetricLogger`
paces its buffered retries with the same :func:`attempts`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from metaprep.errors import MetaprepError

log = logging.getLogger(__name__)
T = TypeVar("T")

# MLflow error codes that a retry cannot fix (the rest: transport errors, a restarting server, 5xx).
NO_RETRY = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
                      "PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_STATE"})
PARAM_CHARS = 6000  # MLflow's limit on a param value


def attempts(timeout_s: float) -> Iterator[None]:
    """Yield once per attempt: at once, then after pauses of 1, 2, 4, ... 15 s until ``timeout_s`` has passed."""
    deadline, delay = time.monotonic() + timeout_s, 1.0
    while True:
        yield
        if time.monotonic() > deadline:
            return
        time.sleep(delay)
        delay = min(delay * 2, 15.0)


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, MetaprepError):
        return False
    return getattr(exc, "error_code", None) not in NO_RETRY


def retry(fn: Callable[[], T], what: str, timeout_s: float = 300.0) -> T:
    """Call ``fn`` until it succeeds or ``timeout_s`` passes (then its last error is raised)."""
    for _ in attempts(timeout_s):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any transport or server error: try again
            if not _retryable(exc):
                raise
            error = exc
            log.warning("%s failed (%s); retrying", what, exc.__class__.__name__)
    raise error  # the last one: the deadline passed


class RetryingClient:
    """An ``MlflowClient`` whose calls are retried for ``timeout_s`` (a trial must not die of a blip)."""

    def __init__(self, client: Any, timeout_s: float = 120.0):
        self._client, self._timeout_s = client, timeout_s

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return retry(lambda: method(*args, **kwargs), f"MLflow {name}", self._timeout_s)

        return call


def mlflow_client(uri: str, timeout_s: float = 120.0) -> RetryingClient:
    from mlflow.tracking import MlflowClient

    return RetryingClient(MlflowClient(tracking_uri=uri), timeout_s)


def log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    """Log ``params`` in one batch, each value as a string cut to MLflow's limit."""
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, str(v)[:PARAM_CHARS]) for k, v in params.items()])


def ensure_experiment(client: Any, name: str) -> str:
    """The id of experiment ``name`` in ``client``'s store, created if missing (the process's fluent tracking URI
    is left as it is)."""
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


def experiment_id(uri: str, name: str) -> str:
    """The id of experiment ``name`` on ``uri`` (created if missing); also makes ``uri`` the fluent API's store."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.set_experiment(name).experiment_id


def run_exists(client: Any, run_id: str) -> bool:
    """Whether the tracking store of ``client`` knows run ``run_id`` (a run from another store does not)."""
    try:
        client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types per store
        if getattr(exc, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return False
        raise
    return True
