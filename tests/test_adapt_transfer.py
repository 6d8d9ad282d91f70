"""Adaptation settings learned from a prepared model's own adapt runs (issue 20, item 3): the batched adapt-run
logger round-trips through MLflow, and the ``adapt_transfer`` suite runs end to end on generated domains."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from metaprep.registry.adapt_runs import AdaptRun, log_adapt_runs
from metaprep.transfer.formats import read_mlflow_adapt_runs

ROOT = Path(__file__).resolve().parents[1]


def test_batched_adapt_runs_round_trip_through_mlflow_and_filter_by_tag(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = [AdaptRun(task=f"t{i % 3}@4", config={"lr": 10.0 ** -(1 + i % 2), "optimizer": "adam", "steps": 2.0},
                     meta_features={"shots": 4.0, "zero_shot_loss": 3.0 + i % 3},
                     curve=[3.0 + i % 3, 2.5, 2.0 - i / 10],
                     final_loss=2.0 - i / 10, cost_s=0.01 * (i + 1)) for i in range(6)]
    ids = log_adapt_runs(uri, runs, "exp", tags={"prepared_model": "a"})
    log_adapt_runs(uri, runs[:2], "exp", tags={"prepared_model": "b"})
    assert len(ids) == 6 and len(set(ids)) == 6
    data = read_mlflow_adapt_runs(uri, "exp", where="tags.prepared_model = 'a'")
    assert len(data.rows) == 6  # the other prepared model's runs are not mixed in
    by_perf = sorted(data.rows, key=lambda r: r.performance)
    assert [round(-r.performance, 6) for r in by_perf] == sorted((round(r.final_loss, 6) for r in runs), reverse=True)
    row = next(r for r in data.rows if math.isclose(r.performance, -runs[5].final_loss))
    assert row.dataset == "t2@4" and row.config == {"lr": 0.01, "optimizer": "adam", "steps": 2.0}
    assert row.curve == tuple(-v for v in runs[5].curve) and row.cost == pytest.approx(0.06)
    assert row.meta_features == {"shots": 4.0, "zero_shot_loss": 5.0}


def test_query_halves_keep_the_support_and_split_the_query() -> None:
    from metaprep.bench.adapt_transfer import query_halves
    from metaprep.errors import DataError
    from metaprep.tasks.base import Episode, Example

    ex = [Example(f"p{i}", f"t{i}") for i in range(8)]
    a, b = query_halves([Episode("x", ex[:3], ex[3:8])])
    assert a[0].support == b[0].support == ex[:3] and a[0].query + b[0].query == ex[3:8]
    assert (len(a[0].query), len(b[0].query)) == (2, 3)
    with pytest.raises(DataError, match="query_size"):
        query_halves([Episode("x", ex[:3], ex[3:4])])


def test_crossfit_choice_is_scored_out_of_sample_and_never_beats_the_in_sample_oracle() -> None:
    from metaprep.bench.adapt_transfer import crossfit_loss

    # the halves disagree: each half's favourite is scored on the other half, where it is the worse setting
    half_a, half_b = {"s1": 1.0, "s2": 2.0}, {"s1": 3.0, "s2": 1.5}
    assert crossfit_loss(half_a, half_b) == (3.0 + 2.0) / 2
    # the halves agree: out of sample = in sample
    assert crossfit_loss({"s1": 1.0, "s2": 2.0}, {"s1": 1.2, "s2": 2.5}) == (1.2 + 1.0) / 2
    rng = random.Random(0)
    for _ in range(500):
        keys = [f"s{i}" for i in range(rng.randint(1, 6))]
        half_a = {k: rng.random() for k in keys}
        half_b = {k: rng.random() for k in keys}
        oracle = min((half_a[k] + half_b[k]) / 2 for k in keys)
        assert crossfit_loss(half_a, half_b) >= oracle - 1e-12


def _domains(folder: Path, n: int = 6, passages: int = 24) -> None:
    folder.mkdir()
    for d in range(n):
        rng = random.Random(d)
        letters = "abcdefghij"[d:d + 4]
        lines = [json.dumps({"text": " ".join("".join(rng.choice(letters) for _ in range(4)) for _ in range(5))})
                 for _ in range(passages)]
        (folder / f"domain{d}.jsonl").write_text("\n".join(lines) + "\n")


def test_adapt_transfer_suite_on_generated_domains(tmp_path) -> None:
    _domains(tmp_path / "domains")
    out = tmp_path / "adapt_transfer.json"
    proc = subprocess.run([sys.executable, "-m", "jobs.benchmark", "--suite", "adapt_transfer", "--quick",
                           "--model-path", "tiny", "--data-dir", str(tmp_path), "--domains-dir",
                           str(tmp_path / "domains"), "--test-domains", "domain5", "--no-mlflow", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["method"], r["metric"]): r for r in report["results"]}
    assert set(rows) == {(m, k) for m in ("recommended", "surrogate", "default", "best_default", "oracle",
                                          "oracle_crossfit") for k in ("query_loss", "regret", "vs_best_default")}
    assert rows[("oracle", "regret")]["mean"] == 0.0 and rows[("best_default", "vs_best_default")]["mean"] == 0.0
    for method in ("recommended", "surrogate", "default", "best_default", "oracle_crossfit"):
        assert rows[(method, "regret")]["mean"] >= 0.0  # the oracle is the best of the same grid
        assert rows[(method, "query_loss")]["mean"] >= rows[("oracle", "query_loss")]["mean"] - 1e-9
        assert math.isclose(rows[(method, "vs_best_default")]["mean"], rows[(method, "query_loss")]["mean"]
                            - rows[("best_default", "query_loss")]["mean"], abs_tol=1e-9)  # paired, same tasks
    assert all(math.isfinite(r["mean"]) for r in report["results"])
    seed = report["seeds"][0]
    grid = report["settings_grid"]
    assert report["default_setting"] in grid and seed["best_default"] in grid
    assert seed["runs"] == seed["train_tasks"] * len(report["shots_grid"]) * len(grid)
    assert sum(report["picks"]["recommended"].values()) == seed["test_tasks"]
    # `recommended` applies the rule that cross-validation over the training tasks chose
    assert seed["rule"] in ("surrogate", "fixed")
    assert seed["cross_validation"]["n"] == seed["train_tasks"] * len(report["shots_grid"])
    assert report["picks"]["recommended"] == report["picks"]["surrogate" if seed["rule"] == "surrogate"
                                                             else "best_default"]
    assert "[adapt_transfer]" in proc.stdout and "adapt runs per prepared model" in proc.stdout
