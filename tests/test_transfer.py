"""Configuration transfer: meta-dataset readers, surrogates, recommender, Tune searcher, CLI, benchmark."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from metaprep.bench.config_transfer import expected_random_regret
from metaprep.errors import ConfigError, DataError, ModelLoadError
from metaprep.transfer.defaults import normalized_regret, rank_quantile
from metaprep.transfer.formats import read_generic, read_mlflow_adapt_runs, read_nmtlc, read_quicktune
from metaprep.transfer.metadataset import MetaDataset, load_metadataset

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "metadatasets"
LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


def _perf(lr: float, opt: str, m: float) -> float:
    """Known structure: the best log10(lr) moves with the meta-feature m; adam beats sgd by 0.5."""
    return -((math.log10(lr) + 4 - 2.5 * m) ** 2) + (0.5 if opt == "adam" else 0.0)


def _synthetic_rows(ms=(0.2, 0.4, 0.6, 0.8)) -> list[dict]:
    rows = []
    for d, m in enumerate(ms):
        for lr, opt in itertools.product(LRS, ("adam", "sgd")):
            p = _perf(lr, opt, m)
            rows.append({"dataset": f"ds{d}", "config.lr": lr, "config.opt": opt, "meta.m": m,
                         "performance": p, "curve": [p - 1.0, p - 0.3, p], "cost": 10.0 * lr * 1e3})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "curve": json.dumps(r["curve"])})
    return path


@pytest.fixture
def generic_csv(tmp_path: Path) -> Path:
    return _write_csv(tmp_path / "runs.csv", _synthetic_rows())


# ------------------------------------------------------------------------------------------ readers
def test_generic_csv_and_jsonl_agree(tmp_path: Path, generic_csv: Path):
    jsonl = tmp_path / "runs.jsonl"
    nested = [{"dataset": r["dataset"], "config": {"lr": r["config.lr"], "opt": r["config.opt"]},
               "meta_features": {"m": r["meta.m"]}, "loss": -r["performance"],
               "curve": [-v for v in r["curve"]], "cost": r["cost"]} for r in _synthetic_rows()]
    jsonl.write_text("\n".join(json.dumps(r) for r in nested) + "\n")
    a, b = load_metadataset(generic_csv), load_metadataset(jsonl)
    assert a.source_format == b.source_format == "generic"
    assert a.datasets() == b.datasets() == ["ds0", "ds1", "ds2", "ds3"]
    assert a.meta_feature_names == ["m"] and a.config_names == ["lr", "opt"]
    pa, pb = a.pools()["ds1"], b.pools()["ds1"]
    assert len(pa.configs) == 12
    np.testing.assert_allclose(pa.performance, pb.performance)  # loss was negated on read
    np.testing.assert_allclose(pa.curves[0], pb.curves[0])
    assert np.isfinite(pa.cost).all()


def test_generic_errors_name_file_and_line(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"dataset": "a", "config": {"lr": 1}, "performance": 1}\n{"dataset": "a", "config": {}}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no configuration"):
        read_generic(bad)
    bad.write_text('{"dataset": "a", "config": {"lr": 1}, "performance": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        read_generic(bad)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("dataset,config.lr,meta.m,performance\na,0.1,1,0.5\na,0.2,2,0.6\n")
    with pytest.raises(DataError, match=r"bad.csv:3: meta-features of dataset 'a' differ"):
        read_generic(bad_csv)
    with pytest.raises(DataError, match="not found"):
        load_metadataset(tmp_path / "missing.jsonl")


def test_nmtlc_reader(tmp_path: Path):
    path = tmp_path / "nmtlc.jsonl"
    lines = []
    for ds, size in (("a-en", 1000), ("b-en", 5000)):
        for lr, layers in itertools.product((1e-4, 1e-3), (1, 2)):
            curve = [30.0, 20.0 + layers, 18.0 + 1e3 * lr]
            lines.append({"task": "scratch", "dataset_name": ds, "basemodel": "scratch", "max_len": 50,
                          "hyperparams": {"dataset_size": size, "initial_lr": lr, "num_layers": layers, "r": 0},
                          "perplexity_curve": curve, "perplexity_optimal": min(curve)})
    lines.append(lines[0])  # a repeated run of one configuration is averaged in the pool
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    md = load_metadataset(path)
    assert md.source_format == "nmtlc" and md.meta_feature_names == ["dataset_size", "max_len"]
    assert md.config_names == ["basemodel", "initial_lr", "num_layers", "r"]
    pool = md.pools()["a-en"]
    assert len(pool.configs) == 4 and len(md.rows) == 9
    assert pool.performance[0] == pytest.approx(-math.log(min(lines[0]["perplexity_curve"])))
    assert pool.meta_features == {"dataset_size": 1000.0, "max_len": 50.0}
    path.write_text(json.dumps({"dataset_name": "x", "hyperparams": {"dataset_size": 1}}) + "\n")
    with pytest.raises(DataError, match=r"nmtlc.jsonl:1: missing key 'perplexity_curve'"):
        read_nmtlc(path)


def test_quicktune_reader(tmp_path: Path):
    folder = tmp_path / "qt"
    folder.mkdir()
    header = ["", "cat:model:small", "cat:model:large", "lr", "batch_size"]
    table = [["c1", 1, 0, 0.01, 32], ["c2", 0, 1, 0.001, 64], ["c3", 1, 0, 0.1, 16], ["c4", 0, 1, 0.01, 8]]
    with (folder / "table.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *table])
    perf = {"D1": {"c1": [10.0, 50.0, 40.0], "c2": [5.0]}, "D2": {"c3": [70.0, 80.0], "c4": [1.0, 2.0]},
            "info": {"metric": "top-1"}}
    cost = {"D1": {"c1": [3.0, 2.0, 4.0], "c2": [1.0]}, "D2": {"c3": [1.0, 2.0], "c4": [5.0, 9.0]}}
    (folder / "perf.json").write_text(json.dumps(perf))
    (folder / "cost.json").write_text(json.dumps(cost))
    (folder / "descriptors.json").write_text(json.dumps({"D1": [100, 10, 128, 3], "D2": [5000, 2, 128, 3]}))
    md = load_metadataset(folder)
    assert md.source_format == "quicktune" and md.datasets() == ["D1", "D2"]
    d1 = md.pools()["D1"]
    assert d1.configs[0] == {"model": "small", "lr": 0.01, "batch_size": 32.0}
    assert list(d1.performance) == [50.0, 5.0]  # the best point of each curve
    assert list(d1.cost) == [9.0, 1.0]  # per-epoch seconds are summed
    assert list(md.pools()["D2"].cost) == [2.0, 9.0]  # non-decreasing everywhere: read as cumulative
    assert md.pools()["D2"].meta_features["num_samples"] == 5000.0
    (folder / "descriptors.json").write_text(json.dumps({"D1": [100, 10, 128, 3]}))
    with pytest.raises(DataError, match="dataset 'D2' needs"):
        read_quicktune(folder)


def _log_adapt_runs(uri: str) -> None:
    """Runs as jobs.adapt logs them (params config.*, tag meta_feature.*, query_loss per step, ...)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment("metaprep-adapt")
    for task, n_examples in (("persona-1", 40), ("persona-2", 80), ("persona-3", 160)):
        for lr, rank in ((1e-3, 4), (1e-2, 8), (1e-2, 4)):
            run = client.create_run(exp)
            final = 3.0 - 50 * lr - 0.01 * rank + 0.001 * n_examples
            params = {"config.lr": lr, "config.steps": 10, "config.shots": 5, "config.rank": rank,
                      "config.reparam": "tarp", "task": task}
            metrics = [Metric("query_loss", final + 0.5 * (2 - step), 0, step) for step in range(3)]
            metrics += [Metric("final_query_loss", final, 0, 0), Metric("cost_s", 0.1 * rank, 0, 0)]
            client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()],
                             tags=[RunTag("meta_feature.n_examples", str(n_examples))])
            client.set_terminated(run.info.run_id)
    other = client.create_run(exp)  # a run of another kind (no config.* params) is not a meta-dataset row
    client.log_metric(other.info.run_id, "query_loss", 1.0)
    client.set_terminated(other.info.run_id)


def test_mlflow_adapt_runs_are_a_metadataset_source(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _log_adapt_runs(uri)
    md = read_mlflow_adapt_runs(uri)
    assert md.source_format == "mlflow" and md.datasets() == ["persona-1", "persona-2", "persona-3"]
    assert md.meta_feature_names == ["n_examples"] and len(md.rows) == 9
    assert set(md.config_names) == {"lr", "steps", "shots", "rank", "reparam"}
    row = md.pools()["persona-1"]
    best = int(np.argmax(row.performance))
    assert row.configs[best]["lr"] == 1e-2 and row.configs[best]["rank"] == 8.0
    assert len(row.curves[0]) == 3 and row.curves[0][0] < row.curves[0][-1]  # loss falls: -loss rises
    assert np.isfinite(row.cost).all()
    assert load_metadataset(f"mlflow:{uri}#metaprep-adapt").rows == md.rows
    with pytest.raises(DataError, match="no MLflow experiment named 'nope'"):
        read_mlflow_adapt_runs(uri, "nope")
    # the third source runs through the benchmark unchanged
    from metaprep.bench.config_transfer import run

    report = run(Namespace(train_meta=f"mlflow:{uri}", test_meta=None, quick=True, seeds=1, out=None))
    assert report["datasets"] == ["persona-1", "persona-2", "persona-3"]
    assert {r["method"] for r in report["results"]} >= {"recommender", "quicktune_gp", "avg_rank"}


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared meta-datasets not available")
def test_real_shared_metadatasets_load():
    nmtlc = load_metadataset(SHARED / "nmtlc.jsonl")
    assert nmtlc.source_format == "nmtlc" and len(nmtlc.datasets()) == 8 and len(nmtlc.rows) == 2483
    assert all(len(p.configs) >= 2 for p in nmtlc.pools().values())
    qt = load_metadataset(SHARED / "quicktune_extended")
    assert qt.source_format == "quicktune" and len(qt.datasets()) == 20 and qt.has_cost
    assert "model" in qt.config_names and qt.meta_feature_names == sorted(
        ["num_samples", "num_classes", "resolution", "num_channels"])


# --------------------------------------------------------------------------------- regret math
def test_normalized_regret():
    perf = np.array([0.0, 10.0, 4.0, 8.0])
    assert normalized_regret(perf, [1, 0], 1) == 0.0
    assert normalized_regret(perf, [2, 3, 1], 1) == pytest.approx(0.6)
    assert normalized_regret(perf, [2, 3, 1], 2) == pytest.approx(0.2)
    assert normalized_regret(perf, [0, 2], 5) == pytest.approx(0.6)
    assert normalized_regret(np.ones(3), [0], 1) == 0.0


def test_rank_quantile_averages_ties():
    np.testing.assert_allclose(rank_quantile(np.array([3.0, 1.0, 3.0, 0.0, 5.0])), [0.625, 0.25, 0.625, 0.0, 1.0])


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_expected_random_regret_matches_enumeration(k: int):
    perf = np.array([3.0, -1.0, 7.0, 7.0, 2.0, 5.0])
    subsets = list(itertools.combinations(range(len(perf)), min(k, len(perf))))
    brute = np.mean([normalized_regret(perf, list(s), k) for s in subsets])
    assert expected_random_regret(perf, k) == pytest.approx(brute)


# ------------------------------------------------------------------------- surrogates, recommender
@pytest.fixture(scope="module")
def synthetic_md(tmp_path_factory) -> MetaDataset:
    return read_generic(_write_csv(tmp_path_factory.mktemp("md") / "runs.csv", _synthetic_rows()))


@pytest.fixture(scope="module")
def recommender(synthetic_md):
    from metaprep.transfer.recommender import Recommender

    return Recommender.fit(synthetic_md, seed=0, steps=400, members=4, guard_folds=0)  # the guard: test_transfer_guard


def test_surrogate_save_load_round_trip(tmp_path: Path, recommender, synthetic_md):
    from metaprep.bench.quicktune_gp import DeepKernelGP
    from metaprep.transfer.recommender import Recommender

    pool = synthetic_md.pools()["ds2"]
    recommender.save(tmp_path / "rec")
    assert not list((tmp_path / "rec").glob("*.pkl")) and (tmp_path / "rec" / "perf.safetensors").exists()
    loaded = Recommender.load(tmp_path / "rec")
    curves = [pool.curves[0][:2]] + [None] * (len(pool.configs) - 1)
    np.testing.assert_array_equal(recommender.surrogate.predict_members(pool.configs, pool.meta_features, curves),
                                  loaded.surrogate.predict_members(pool.configs, pool.meta_features, curves))
    np.testing.assert_array_equal(recommender.surrogate.predict_cost(pool.configs, pool.meta_features),
                                  loaded.surrogate.predict_cost(pool.configs, pool.meta_features))
    assert loaded.candidates == recommender.candidates

    gp = DeepKernelGP.fit(list(synthetic_md.pools().values()), iterations=20, context=64)
    gp.save(tmp_path / "gp")
    gp2 = DeepKernelGP.load(tmp_path / "gp")
    for a, b in zip(gp.predict(pool.configs, pool.meta_features), gp2.predict(pool.configs, pool.meta_features),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    spec = json.loads((tmp_path / "gp" / "dkgp.json").read_text())
    (tmp_path / "gp" / "dkgp.json").write_text(json.dumps({**spec, "format_version": 1}))  # the pre-GPyTorch GP
    with pytest.raises(ModelLoadError, match="format_version 1, this version reads 2"):
        DeepKernelGP.load(tmp_path / "gp")


def test_recommender_ranks_the_better_config_first(synthetic_md):
    from metaprep.transfer.recommender import Recommender

    train = [p for name, p in synthetic_md.pools().items() if name != "ds1"]  # hold out m = 0.4
    rec = Recommender.fit(train, seed=0, steps=400, members=4, guard_folds=0)  # the surrogate's own ranking
    test = synthetic_md.pools()["ds1"]
    picks = rec.rank(test.meta_features, test.configs, k=3)
    best = test.configs[int(np.argmax(test.performance))]
    assert picks[0].config == best == {"lr": 1e-3, "opt": "adam"}  # the optimum for m = 0.4
    assert picks[0].predicted_performance >= max(p.predicted_performance for p in picks[1:]) - 1e-6
    assert len({json.dumps(p.config, sort_keys=True) for p in picks}) == 3
    cheap = rec.rank(test.meta_features, test.configs, k=3, cost_aware=True, cost_weight=50.0)
    assert cheap[0].config["lr"] < picks[0].config["lr"]  # cost grows with lr in this meta-dataset
    with pytest.raises(DataError, match="unknown"):
        rec.rank({"m": 0.4, "extra": 1.0}, test.configs, k=1)


def test_greedy_portfolio_hedges_across_members():
    from metaprep.transfer.recommender import greedy_portfolio

    members = np.array([[1.0, 0.95, 0.0], [0.0, 0.05, 1.0]])  # candidate 2 wins where 0 loses
    order, _ = greedy_portfolio(members, 2)
    assert order == [0, 2]


# -------------------------------------------------------------------------------------- searcher
def test_searcher_yields_the_portfolio_first(tmp_path: Path):
    from ray import tune

    from metaprep.transfer.searcher import PortfolioSearcher

    portfolio = [{"lr": 0.001, "steps": 10.0}, {"lr": 0.01, "steps": 20.0}]
    space = {"lr": tune.loguniform(1e-5, 1e-1), "steps": tune.randint(1, 50), "model": "tiny"}
    searcher = PortfolioSearcher(portfolio, metric="loss", mode="min", seed=0)
    assert searcher.set_search_properties("loss", "min", space)
    first, second = searcher.suggest("t1"), searcher.suggest("t2")
    assert first == {"lr": 0.001, "steps": 10, "model": "tiny"} and isinstance(first["steps"], int)
    assert second == {"lr": 0.01, "steps": 20, "model": "tiny"}
    assert searcher.portfolio_exhausted
    third = searcher.suggest("t3")
    assert 1e-5 <= third["lr"] <= 1e-1 and 1 <= third["steps"] < 50 and third["model"] == "tiny"
    searcher.on_trial_complete("t1", {"loss": 0.5})
    searcher.save(str(tmp_path / "state.json"))
    restored = PortfolioSearcher([], space=space, metric="loss", mode="min")
    restored.restore(str(tmp_path / "state.json"))
    assert restored.completed == {"t1": 0.5} and restored.portfolio_exhausted
    only = PortfolioSearcher(portfolio[:1])
    assert only.suggest("a") == {"lr": 0.001, "steps": 10.0}
    assert only.suggest("b") == PortfolioSearcher.FINISHED


# ----------------------------------------------------------------------------------- jobs (CLI)
def _job(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": "service"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_recommend_cli_happy_path(tmp_path: Path, generic_csv: Path):
    out = tmp_path / "portfolio.json"
    proc = _job("jobs.recommend", "--train-meta", str(generic_csv), "--meta-features", '{"m": 0.5}',
                "--top-k", "3", "--cost-aware", "--summary-out", str(out), "--surrogate-dir", str(tmp_path / "s"),
                "--fit-steps", "100")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary == json.loads(out.read_text())
    assert [p["rank"] for p in summary["portfolio"]] == [1, 2, 3]
    assert set(summary["portfolio"][0]["config"]) == {"lr", "opt"}
    assert summary["portfolio"][0]["predicted_cost_s"] > 0
    cands = tmp_path / "cands.json"
    cands.write_text(json.dumps([{"lr": 1e-3, "opt": "sgd"}, {"lr": 1e-3, "opt": "adam"}]))
    meta = tmp_path / "meta.json"
    meta.write_text('{"m": 0.5}')
    proc = _job("jobs.recommend", "--surrogate-dir", str(tmp_path / "s"), "--meta-features", str(meta),
                "--candidates", str(cands), "--top-k", "1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["portfolio"][0]["config"] == {"lr": 0.001, "opt": "adam"}


@pytest.mark.parametrize("args, message", [
    (["--train-meta", "missing.jsonl", "--meta-features", '{"m": 1}'], "meta-dataset not found"),
    (["--train-meta", "GENERIC", "--meta-features", '{"m": 1'], "--meta-features: malformed JSON"),
    (["--train-meta", "GENERIC", "--meta-features", '{"m": 1, "size": 3}'], "unknown ['size']"),
    (["--train-meta", "GENERIC", "--meta-features", '{"m": 1}', "--top-k", "0"], "--top-k must be >= 1"),
    (["--train-meta", "GENERIC", "--meta-features", "nofile.json"], "neither inline JSON nor an existing file"),
])
def test_recommend_cli_bad_input(args: list[str], message: str, generic_csv: Path):
    proc = _job("jobs.recommend", *[str(generic_csv) if a == "GENERIC" else a for a in args])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_config_transfer_suite_quick(tmp_path: Path):
    small = _write_csv(tmp_path / "small.csv", _synthetic_rows(ms=(0.2, 0.5, 0.8)))
    out = tmp_path / "x.json"
    proc = _job("jobs.benchmark", "--suite", "config_transfer", "--quick", "--train-meta", str(small),
                "--out", str(out), "--no-mlflow")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    rows = {(r["method"], r["metric"]): r for r in report["results"]}
    methods = {"recommender", "surrogate", "random", "best_default", "avg_rank", "quicktune_gp"}
    assert {m for m, _ in rows} == methods
    assert {k for _, k in rows} == {"normalized_regret@1", "normalized_regret@5"}
    assert rows[("recommender", "normalized_regret@1")]["n"] == 3 * 3  # datasets x seeds
    assert rows[("avg_rank", "normalized_regret@1")]["n"] == 3  # deterministic: once per dataset
    for r in report["results"]:
        assert 0.0 <= r["mean"] <= 1.0
        assert r["setting"]["protocol"] == "LODO"
    assert out.with_suffix(".md").read_text().count("normalized_regret@") == 12
    # the guard's decision per dataset and seed: the recommender's first pick is the best default's where it says so
    assert sorted(report["guard"]) == sorted(report["datasets"])
    for name, decisions in report["guard"].items():
        assert len(decisions) == 3 and all(d["pick"] in ("surrogate", "best_default") for d in decisions)
        for d in decisions:
            if d["pick"] == "best_default":
                assert d["regret@1"] == pytest.approx(report["per_dataset"]["best_default"][name][0], abs=1e-4)
    mean_at_1 = np.mean([d["regret@1"] for ds in report["guard"].values() for d in ds])
    assert mean_at_1 == pytest.approx(rows[("recommender", "normalized_regret@1")]["mean"])
    assert set(report["paired_vs_best_default"]) >= {"recommender-best_default@1", "surrogate-best_default@1"}


def test_config_transfer_train_test_protocol(tmp_path: Path):
    from metaprep.bench.config_transfer import run

    train = _write_csv(tmp_path / "train.csv", _synthetic_rows(ms=(0.2, 0.8)))
    test = _write_csv(tmp_path / "test.csv", _synthetic_rows(ms=(0.5,)))
    report = run(Namespace(train_meta=str(train), test_meta=str(test), quick=True, seeds=1, out=None))
    assert report["datasets"] == ["ds0"] and report["results"][0]["setting"]["protocol"] == "train->test"
    bad = tmp_path / "other.csv"
    bad.write_text("dataset,config.lr,meta.size,performance\na,0.1,1,0.5\na,0.2,1,0.6\n")
    with pytest.raises(ConfigError, match="both meta-datasets must describe datasets alike"):
        run(Namespace(train_meta=str(train), test_meta=str(bad), quick=True, seeds=1, out=None))
