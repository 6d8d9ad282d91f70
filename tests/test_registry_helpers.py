"""registry/: the one retry policy, and the adapt-run contract written by jobs.adapt and read by the recommender."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from metaprep.errors import RegistryError
from metaprep.registry.client import RetryingClient, retry


class _Flaky:
    """Fails with ``error`` the first ``failures`` calls, then answers."""

    def __init__(self, error: Exception, failures: int = 1):
        self.error, self.failures, self.calls = error, failures, 0

    def get_run(self, run_id: str) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return run_id


def test_transport_errors_are_retried_until_they_pass():
    flaky = _Flaky(ConnectionResetError("server restarting"))
    assert RetryingClient(flaky, timeout_s=30).get_run("r1") == "r1" and flaky.calls == 2


def test_errors_a_retry_cannot_fix_are_raised_at_once():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    missing = MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)
    flaky = _Flaky(missing, failures=5)
    with pytest.raises(MlflowException, match="no such run"):
        RetryingClient(flaky, timeout_s=30).get_run("r1")
    assert flaky.calls == 1
    with pytest.raises(RegistryError):
        retry(lambda: (_ for _ in ()).throw(RegistryError("bad URI")), "resolve", timeout_s=30)


def test_the_last_error_is_raised_after_the_deadline():
    flaky = _Flaky(TimeoutError("still down"), failures=100)
    with pytest.raises(TimeoutError, match="still down"):
        RetryingClient(flaky, timeout_s=0).get_run("r1")
    assert flaky.calls == 1


def test_an_adapt_run_reads_back_as_a_metadataset_row(tmp_path: Path, monkeypatch):
    from mlflow.tracking._tracking_service import utils

    from metaprep.registry.adapt_runs import ADAPT_EXPERIMENT, AdaptRun, log_adapt_run
    from metaprep.transfer.metadataset import load_metadataset

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # log_adapt_run sets the fluent API's store
    monkeypatch.chdir(tmp_path)  # a sqlite store puts artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = AdaptRun(task="persona-7", config={"lr": 0.01, "steps": 3, "reparam": "lora"},
                   meta_features={"n_examples": 40.0, "zero_shot_loss": 2.5}, curve=[3.0, 2.5, 2.0],
                   final_loss=2.0, cost_s=1.5, extra_params={"base": "models:/x-base/1"},
                   extra_metrics={"query_loss_before": 3.0})
    run_id = log_adapt_run(uri, run, "adapt-persona-7",
                           artifacts={"note.txt": lambda path: path.write_text("adapted")})
    (row,) = load_metadataset(f"mlflow:{uri}#{ADAPT_EXPERIMENT}").rows
    assert row.dataset == "persona-7" and row.config == {"lr": 0.01, "steps": 3.0, "reparam": "lora"}
    assert row.meta_features == {"n_examples": 40.0, "zero_shot_loss": 2.5}
    assert row.performance == -2.0 and row.curve == (-3.0, -2.5, -2.0) and math.isclose(row.cost, 1.5)
    assert run_id in row.source
