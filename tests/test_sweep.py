"""jobs.sweep: the ``sweep:`` recipe section (fast unit tests) and a real sweep on the local stack (integration)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from metaprep.errors import ConfigError
from metaprep.tune.space import DEFAULT_SWEEP, ParamSpec, trial_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
SWEEP_TINY = ROOT / "jobs" / "configs" / "sweep_tiny.yaml"
SWEEP_TRANSFER = ROOT / "jobs" / "configs" / "sweep_transfer.yaml"
MLFLOW = os.environ.get("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{os.environ.get('MLFLOW_PORT', '5000')}")

# A very short tiny recipe: 4 meta-steps, meta-validation every 2 (one ASHA rung before the end).
QUICK = {
    "algorithm": "fomaml", "seed": 0,
    "model": {"path": "tiny", "tiny": {"vocab_size": 259, "dim": 32, "layers": 1, "heads": 2, "hidden_dim": 64,
                                       "max_seq_len": 32}},
    "tasks": {"family": "synthetic", "num_tasks": 24, "shots": 2, "query_size": 2, "seq_len": 16},
    "reparam": {"kind": "lora", "rank": 2, "alpha": 2.0},
    "meta": {"inner_lr": 0.3, "outer_lr": 0.003, "inner_steps": 1, "meta_batch_size": 2, "meta_steps": 4,
             "eval_every": 2, "eval_tasks": 2},
    "distributed": {"num_workers": 1, "zero_stage": 1, "precision": "fp32"},
}


def _load(tmp_path: Path, recipe: dict, overrides: list[str] | None = None, num_samples: int | None = None):
    from metaprep.tune.sweep import load_sweep_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return load_sweep_recipe(path, overrides, num_samples)


def _with_sweep(sweep: dict) -> dict:
    return {**QUICK, "sweep": sweep}


# --------------------------------------------------------------------------- space parsing (fast)

def test_default_space_for_a_recipe_without_sweep_section():
    from metaprep.tune.sweep import load_sweep_recipe

    cfg, base, spec = load_sweep_recipe(TINY, num_samples=6)
    assert spec.num_samples == 6
    assert set(spec.space) == set(DEFAULT_SWEEP["space"])
    assert spec.space["meta.inner_lr"].kind == "loguniform" and spec.space["meta.outer_lr"].kind == "loguniform"
    assert spec.searcher == "random" and spec.asha.enabled
    assert base["meta"]["inner_lr"] == cfg.meta.inner_lr


def test_sweep_tiny_recipe_parses():
    from metaprep.tune.sweep import load_sweep_recipe

    cfg, _, spec = load_sweep_recipe(SWEEP_TINY, ["sweep.num_samples=3"])
    assert cfg.registry.name == "metaprep-tiny"
    assert spec.num_samples == 3
    assert {"meta.inner_lr", "meta.outer_lr", "meta.inner_steps", "reparam.rank"} <= set(spec.space)
    assert spec.initial == [{"meta.inner_lr": 0.3, "meta.outer_lr": 0.003}]
    assert spec.asha.grace_period == 10


def test_nested_space_and_set_override(tmp_path):
    recipe = _with_sweep({"space": {"meta": {"inner_lr": {"loguniform": [0.01, 0.1]}}}})
    _, _, spec = _load(tmp_path, recipe, ["sweep.space.reparam.rank={choice: [2, 4]}"])
    assert spec.space["meta.inner_lr"].args == [0.01, 0.1]
    assert spec.space["reparam.rank"].to_dict() == {"choice": [2, 4]}


def test_yaml_exponents_without_dot_are_numbers(tmp_path):
    path = tmp_path / "recipe.yaml"
    sweep = ("sweep:\n  space:\n    meta.inner_lr: {loguniform: [1e-2, 1e-1]}\n"
             "    meta.outer_lr: {choice: [1e-3, 3e-3]}\n  initial:\n    - {meta.outer_lr: 1e-3}\n")
    path.write_text(yaml.safe_dump(QUICK, sort_keys=False) + sweep)
    from metaprep.tune.sweep import load_sweep_recipe

    _, _, spec = load_sweep_recipe(path)
    assert spec.space["meta.inner_lr"].args == [0.01, 0.1]
    assert spec.space["meta.outer_lr"].args == [0.001, 0.003]
    assert spec.initial == [{"meta.outer_lr": 0.001}]


def test_trial_config_applies_params_and_checkpoints_at_every_eval():
    base = {"meta": {"inner_lr": 0.3, "eval_every": 5, "meta_steps": 20}, "checkpoint": {"every": 0}}
    cfg = trial_config(base, {"meta.inner_lr": 0.05, "reparam.rank": 8})
    assert cfg.meta.inner_lr == 0.05 and cfg.reparam.rank == 8
    assert cfg.checkpoint.every == 5


def test_tune_domains_inclusive_int_bounds():
    dom = ParamSpec("meta.inner_steps", "randint", [1, 3]).to_tune()
    draws = {dom.sample() for _ in range(200)}
    assert draws == {1, 2, 3}
    lr = ParamSpec("meta.inner_lr", "loguniform", [0.01, 1.0]).to_tune()
    assert all(0.01 <= lr.sample() <= 1.0 for _ in range(50))


@pytest.mark.parametrize("sweep, needle", [
    ({"spaec": {}}, "sweep.spaec: unknown key"),
    ({"space": {}}, "sweep.space: expected a non-empty mapping"),
    ({"space": {"meta.inner_lrr": {"loguniform": [0.1, 1.0]}}}, "sweep.space.meta.inner_lrr"),
    ({"space": {"meta.inner_lr": {"loguniform": [0.0, 1.0]}}}, "loguniform needs lo > 0"),
    ({"space": {"meta.inner_lr": {"loguniform": [1.0, 0.1]}}}, "needs lo < hi"),
    ({"space": {"meta.inner_lr": {"logunifrom": [0.1, 1.0]}}}, "unknown distribution 'logunifrom'"),
    ({"space": {"meta.inner_lr": {"loguniform": [0.1]}}}, "takes [lo, hi]"),
    ({"space": {"meta.inner_lr": {"loguniform": ["small", 1.0]}}}, "takes [lo, hi]"),
    ({"space": {"meta.inner_steps": {"loguniform": [1, 4]}}}, "meta.inner_steps is int, not float"),
    ({"space": {"meta.inner_lr": {"randint": [1, 4]}}}, "meta.inner_lr is float, not int"),
    ({"space": {"meta.inner_steps": {"choice": [1, 0]}}}, "value 0 is not valid for meta.inner_steps"),
    ({"space": {"reparam.kind": {"choice": ["lora", "dora"]}}}, "value 'dora' is not valid for reparam.kind"),
    ({"space": {"tasks.shots": {"choice": [2, 4]}}}, "tasks.shots cannot be swept"),
    ({"space": {"seed": {"choice": [0, 1]}}}, "seed cannot be swept"),
    ({"space": {"meta.meta_steps": {"choice": [2, 4]}}}, "meta.meta_steps cannot be swept"),
    ({"space": {"meta": {"choice": [1]}}}, "is a section"),
    ({"num_samples": 0}, "sweep.num_samples: expected an integer >= 1"),
    ({"searcher": "bayes"}, "sweep.searcher: 'bayes' is not valid"),
    ({"metric": "accuracy"}, "sweep.metric: only 'meta_val_loss'"),
    ({"searcher": "transfer"}, "sweep.portfolio: searcher 'transfer' needs a non-empty portfolio"),
    ({"portfolio": [{"meta.inner_lr": 0.1}]}, "only used by searcher 'transfer'"),
    ({"initial": [{"meta.inner_stepz": 1}]}, "sweep.initial[0]: 'meta.inner_stepz' is not a swept key"),
    ({"initial": [{"meta.inner_lr": -1.0}]}, "sweep.initial[0].meta.inner_lr: value -1.0 is not valid"),
    ({"asha": {"grace_period": 1}}, "sweep.asha.grace_period: must be >= meta.eval_every (2)"),
    ({"asha": {"grace_period": 9}}, "sweep.asha.grace_period: must be <= meta.meta_steps (4)"),
    ({"asha": {"reduction_factor": 1}}, "sweep.asha.reduction_factor: expected a number > 1"),
    ({"asha": {"brackets": 2}}, "sweep.asha.brackets: unknown key"),
])
def test_sweep_section_errors_name_the_key(tmp_path, sweep, needle):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, _with_sweep(sweep))
    msg = str(info.value)
    assert needle in msg, msg
    assert "recipe.yaml" in msg and "\n" not in msg


def test_errors_carry_the_yaml_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    bad = "sweep:\n  space:\n    meta.inner_lr: {uniform: [2.0, 1.0]}\n"
    path.write_text(yaml.safe_dump(QUICK, sort_keys=False) + bad)
    from metaprep.tune.sweep import load_sweep_recipe

    lines = path.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "meta.inner_lr: {uniform" in text)
    with pytest.raises(ConfigError, match=rf"recipe.yaml:{line}: sweep.space.meta.inner_lr"):
        load_sweep_recipe(path)


def test_base_recipe_errors_still_come_from_the_recipe(tmp_path):
    bad = {**QUICK, "meta": {**QUICK["meta"], "inner_lrr": 0.1}, "sweep": {"num_samples": 2}}
    with pytest.raises(ConfigError, match="unknown key 'meta.inner_lrr'"):
        _load(tmp_path, bad)


def test_asha_off_when_nothing_is_evaluated_before_the_end(tmp_path):
    recipe = {**QUICK, "meta": {**QUICK["meta"], "eval_every": 4}}
    _, _, spec = _load(tmp_path, recipe, num_samples=2)
    assert not spec.asha.enabled


def test_max_concurrent_trials_sized_to_the_cluster(tmp_path):
    from metaprep.tune.sweep import max_concurrent_trials

    cfg, _, spec = _load(tmp_path, _with_sweep({"num_samples": 8}))
    assert max_concurrent_trials({"CPU": 4.0}, cfg, spec) == 4
    assert max_concurrent_trials({"CPU": 40.0}, cfg, spec) == 8  # never more than num_samples
    cfg.distributed.num_workers, cfg.distributed.cpus_per_worker = 2, 1
    assert max_concurrent_trials({"CPU": 5.0}, cfg, spec) == 2
    spec.max_concurrent = 1
    assert max_concurrent_trials({"CPU": 5.0}, cfg, spec) == 1
    cfg.distributed.num_workers = 8
    with pytest.raises(ConfigError, match="a trial needs 8 CPU"):
        max_concurrent_trials({"CPU": 4.0}, cfg, spec)


def test_random_search_limits_its_own_concurrency(tmp_path):
    from ray.tune.search import Searcher

    from metaprep.tune.sweep import _searcher

    _, _, spec = _load(tmp_path, _with_sweep({"num_samples": 8}))
    searcher = _searcher(spec, 3)
    # Tune ignores max_concurrent_trials for a BasicVariantGenerator, so it must carry the limit
    assert not isinstance(searcher, Searcher) and searcher.max_concurrent == 3


def test_optional_searchers(tmp_path):
    from metaprep.tune.sweep import _searcher

    _, _, spec = _load(tmp_path, _with_sweep({"searcher": "optuna"}))
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="'optuna' needs the optuna package"):
            _searcher(spec)
    else:
        assert _searcher(spec) is not None

    portfolio = [{"meta.inner_lr": 0.2, "meta.outer_lr": 0.002}, {"meta.inner_lr": 0.1}]
    _, _, spec = _load(tmp_path, _with_sweep({"searcher": "transfer", "portfolio": portfolio}))
    searcher = _searcher(spec)
    first, second, third = (searcher.suggest(f"t{i}") for i in range(3))
    assert first["meta.inner_lr"] == 0.2 and first["meta.outer_lr"] == 0.002
    assert second["meta.inner_lr"] == 0.1 and set(second) == set(spec.space)
    assert set(third) == set(spec.space)  # after the portfolio: samples of the space


# --------------------------------------------------------------------------- transfer recommender portfolio (fast)

TRANSFER_SPACE = {"meta.inner_lr": {"loguniform": [0.03, 1.0]}, "meta.inner_steps": {"choice": [1, 2, 3]},
                  "meta.outer_lr": {"loguniform": [3e-4, 3e-2]}}


@pytest.fixture(scope="module")
def surrogate_dir(tmp_path_factory) -> Path:
    """A tiny recommender fitted on a generic CSV meta-dataset whose ground truth is monotone:
    performance = ln(lr) + steps (+ a little for rank 8), the same on every dataset, so the best
    candidate of the sweep space is the largest inner_lr with inner_steps 3."""
    import csv

    from metaprep.transfer.metadataset import load_metadataset
    from metaprep.transfer.recommender import Recommender

    folder = tmp_path_factory.mktemp("transfer")
    rows = [{"dataset": f"ds{d}", "config.lr": lr, "config.steps": steps, "config.rank": rank, "meta.m": m,
             "performance": math.log(lr) + steps + 0.1 * (rank == 8) + 0.05 * m}
            for d, m in enumerate((0.2, 0.5, 0.8)) for lr in (0.03, 0.06, 0.1, 0.2, 0.4, 0.7, 1.0)
            for steps in (1, 2, 3) for rank in (4, 8)]
    with (folder / "runs.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    rec = Recommender.fit(load_metadataset(folder / "runs.csv"), seed=0, steps=300, members=4, cost_steps=0)
    return rec.save(folder / "surrogate")


def _transfer_sweep(folder: Path, searcher: str = "transfer", **block) -> dict:
    rec = {"surrogate": str(folder), "meta_features": {"m": 0.5},
           "params": {"meta.inner_lr": "lr", "meta.inner_steps": "steps"}, "fixed": {"rank": 8},
           "candidates": 32, "top_k": 3, **block}
    return _with_sweep({"space": TRANSFER_SPACE, "searcher": searcher, "seed": 0, "recommender": rec})


def test_recommender_portfolio_is_proposed_first(tmp_path, surrogate_dir):
    from metaprep.transfer.recommender import Recommender
    from metaprep.tune.sweep import _searcher

    _, _, spec = _load(tmp_path, _transfer_sweep(surrogate_dir))
    recs = spec.recommended
    assert [r["rank"] for r in recs] == [1, 2, 3]
    assert spec.portfolio == [r["params"] for r in recs]  # in the recommender's rank order
    for r in recs:
        p = r["params"]
        assert set(p) == {"meta.inner_lr", "meta.inner_steps"}
        assert 0.03 <= p["meta.inner_lr"] <= 1.0 and p["meta.inner_steps"] in (1, 2, 3)
        assert r["config"] == {"lr": p["meta.inner_lr"], "steps": p["meta.inner_steps"], "rank": 8}
    again = Recommender.load(surrogate_dir).rank({"m": 0.5}, [r["config"] for r in recs], k=1)
    assert again[0].config == recs[0]["config"]  # the first pick is the predicted best
    json.dumps([spec.to_dict(), spec.recommended])  # what run_sweep logs to the MLflow parent run

    # every candidate ranked (same seed, same samples): the top 3 are its prefix, and the first pick is the
    # candidate the synthetic ground truth makes best
    _, _, full = _load(tmp_path, _transfer_sweep(surrogate_dir, top_k=32))
    assert [r["params"] for r in full.recommended[:3]] == spec.portfolio

    def truth(p: dict) -> float:
        return math.log(p["meta.inner_lr"]) + p["meta.inner_steps"]

    best = max(truth(r["params"]) for r in full.recommended)
    assert truth(recs[0]["params"]) >= best - 0.05 and recs[0]["params"]["meta.inner_steps"] == 3

    searcher = _searcher(spec)
    proposed = [searcher.suggest(f"t{i}") for i in range(4)]
    for point, r in zip(proposed, recs, strict=False):
        assert {k: point[k] for k in r["params"]} == r["params"] and set(point) == set(spec.space)
    assert set(proposed[3]) == set(spec.space)  # then random samples of the space

    # with an explicit portfolio as well: those first, then the recommender's picks
    recipe = _transfer_sweep(surrogate_dir)
    recipe["sweep"]["portfolio"] = [{"meta.inner_lr": 0.1}]
    _, _, both = _load(tmp_path, recipe)
    assert both.portfolio == [{"meta.inner_lr": 0.1}] + [r["params"] for r in recs]


def test_registered_surrogate_needs_a_tracking_uri(tmp_path, surrogate_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"recipe.yaml:\d+: sweep.recommender.surrogate: no MLflow tracking URI"):
        _load(tmp_path, _transfer_sweep(surrogate_dir, surrogate="models:/metaprep-surrogate/1"))


def test_sweep_transfer_recipe_parses(surrogate_dir):
    from metaprep.tune.sweep import load_sweep_recipe

    with pytest.raises(ConfigError, match=r"sweep_transfer.yaml:\d+: sweep.recommender.surrogate: .* is not a saved "
                                          r"surrogate folder"):
        load_sweep_recipe(SWEEP_TRANSFER, [f"sweep.recommender.surrogate={surrogate_dir.parent / 'missing'}"])
    _, _, spec = load_sweep_recipe(SWEEP_TRANSFER, [  # the fixture's surrogate knows lr, steps, rank and m
        f"sweep.recommender.surrogate={surrogate_dir}", "sweep.recommender.meta_features={m: 0.5}",
        "sweep.recommender.params={meta.inner_lr: lr, meta.inner_steps: steps, reparam.rank: rank}",
        "sweep.recommender.fixed={}"])
    assert spec.searcher == "transfer" and len(spec.portfolio) == spec.recommender.top_k == 3


@pytest.mark.parametrize("block, needle", [
    ({"topk": 3}, "sweep.recommender.topk: unknown key; valid keys: surrogate, meta_features"),
    ({"surrogate": None}, "sweep.recommender.surrogate: required: a folder saved by `python -m jobs.recommend"),
    ({"params": {"meta.outer_lrr": "lr"}}, "sweep.recommender.params.meta.outer_lrr: 'meta.outer_lrr' is not a "
                                           "swept key; swept keys: meta.inner_lr, meta.inner_steps, meta.outer_lr"),
    ({"params": {"meta.inner_lr": "learning_rate", "meta.inner_steps": "steps"}},
     "sweep.recommender.params.meta.inner_lr: 'learning_rate' is not a configuration name of the surrogate; "
     "its names: lr, rank, steps"),
    ({"fixed": {}}, "sweep.recommender.params: the surrogate's configuration names rank are neither mapped"),
    ({"meta_features": {"n": 1.0}}, "sweep.recommender.meta_features: unknown ['n']; missing ['m']; the "
                                    "surrogate expects exactly m"),
    ({"top_k": 0}, "sweep.recommender.top_k: expected an integer >= 1, got 0"),
    ({"candidates": 2}, "sweep.recommender.candidates: must be >= top_k (3)"),
    ({"cost_aware": True}, "sweep.recommender.cost_aware: cost-aware ranking needs a meta-dataset with costs"),
    ({"searcher": "random"}, "sweep.recommender: only used by searcher 'transfer'"),
])
def test_recommender_block_errors_are_one_line(tmp_path, surrogate_dir, block, needle):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, _transfer_sweep(surrogate_dir, **block))
    msg = str(info.value)
    assert needle in msg, msg
    assert re.search(r"recipe\.yaml:\d+: sweep\.recommender", msg) and "\n" not in msg, msg


def test_plot_marks_every_status(tmp_path):
    from metaprep.tune.sweep import TrialOutcome, plot_sweep

    _, _, spec = _load(tmp_path, _with_sweep({"space": DEFAULT_SWEEP["space"]}))
    trials = [
        TrialOutcome("a", "completed", {"meta.inner_lr": 0.1, "meta.outer_lr": 1e-3}, 2.5, 4, "r1", "/x"),
        TrialOutcome("b", "early_stopped", {"meta.inner_lr": 0.5, "meta.outer_lr": 3e-3}, 3.1, 2, "r2"),
        TrialOutcome("c", "diverged", {"meta.inner_lr": 1e30, "meta.outer_lr": 1e-3}, None, 0, "r3"),
        TrialOutcome("d", "failed", {"meta.inner_lr": 0.2, "meta.outer_lr": 1e-2}, None, None, None),
    ]
    out = plot_sweep(trials, spec, tmp_path / "plot.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("verdict,own_tags,own_status,want_status", [
    # ASHA's kill reached the trial's own except branch first: it tagged the run failed just before dying
    ("early_stopped", {"sweep.status": "failed", "sweep.error": "RayTaskError: cancelled"}, "FAILED", "KILLED"),
    ("early_stopped", {"sweep.status": "running"}, "RUNNING", "KILLED"),  # killed before any bookkeeping
    ("failed", {"sweep.status": "running"}, "RUNNING", "FAILED"),
    ("completed", {"sweep.status": "completed"}, "FINISHED", "FINISHED"),
])
def test_child_run_agrees_with_the_driver(tmp_path, verdict, own_tags, own_status, want_status):
    from mlflow.tracking import MlflowClient

    from metaprep.tune.sweep import TrialOutcome, _reconcile_child_run

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("sweep"), tags=own_tags).info.run_id
    if own_status != "RUNNING":
        client.set_terminated(run_id, own_status)
    error = "RayTaskError: worker died" if verdict == "failed" else None
    trial = TrialOutcome("t1", verdict, {"meta.inner_lr": 0.1}, 2.5, 2, run_id, error=error)
    _reconcile_child_run(client, client.get_run(run_id), trial)
    run = client.get_run(run_id)
    assert run.data.tags["sweep.status"] == verdict and run.info.status == want_status
    assert run.data.tags.get("sweep.error") == error


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from jobs._cli import run_main
    from jobs.sweep import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_with_sweep({"space": {"meta.inner_lr": {"loguniform": [-1.0, 1.0]}}})))
    with pytest.raises(SystemExit) as info:
        run_main(main, ["--config", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "sweep.space.meta.inner_lr" in err and "\n" not in err
    with pytest.raises(SystemExit) as info:
        run_main(main, ["--config", str(TINY), "--num-samples", "0"])
    assert info.value.code == 2


# --------------------------------------------------------------------------- integration (local stack)

def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture
def live_ray(request):
    if not _healthy(f"{MLFLOW}/health"):
        pytest.skip(f"MLflow at {MLFLOW} is unreachable (start the stack: make up)")
    return request.getfixturevalue("ray_cluster")


def _job_leftovers(ray, job_id: str) -> list[str]:
    """Placement groups and actors of ``job_id`` that still hold (or wait for) resources.

    Detached actors that reserve nothing are cluster singletons, not leaks: Ray Train V2 creates its
    ``AutoscalingCoordinator`` (num_cpus=0, lifetime="detached") under whichever job first trains on a
    fresh cluster, and it lives as long as the cluster.
    """
    from ray.util.state import list_actors

    def singleton(a) -> bool:
        return bool(a.is_detached) and not any((a.required_resources or {}).values())

    left = [f"pg {pg_id} {pg['state']}" for pg_id, pg in ray.util.placement_group_table().items()
            if pg_id.endswith(job_id) and pg["state"] != "REMOVED"]
    left += [f"actor {a.class_name} {a.state}"
             for a in list_actors(filters=[("job_id", "=", job_id)], limit=1000, detail=True)
             if a.state != "DEAD" and not singleton(a)]
    return left


def _other_jobs_running(ray, job_ids: set[str]) -> bool:
    from ray.util.state import list_jobs

    return any(str(getattr(j.status, "value", j.status)) == "RUNNING" for j in list_jobs()
               if (j.job_id or "") not in job_ids)


@pytest.mark.integration
def test_sweep_on_local_stack(tmp_path, live_ray):
    """4 trials (one forced NaN) of a very short tiny recipe through jobs.sweep, checked in MLflow and Ray."""
    ray = live_ray
    name = f"sweeptest-{uuid.uuid4().hex[:8]}"
    recipe = _with_sweep({
        "space": {"meta.inner_lr": {"loguniform": [0.05, 0.5]}, "meta.outer_lr": {"loguniform": [1.0e-3, 1.0e-2]}},
        "num_samples": 4, "seed": 1,
        "initial": [{"meta.inner_lr": 1.0e+30, "meta.outer_lr": 3.0e-3}],  # diverges (NaN) at the first step
        "asha": {"grace_period": 2, "reduction_factor": 2}})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    summary_path = tmp_path / "summary.json"
    env = {**os.environ, "MLFLOW_TRACKING_URI": MLFLOW, "RAY_ADDRESS": os.environ.get("RAY_ADDRESS", "127.0.0.1:6379"),
           "RAY_TRAIN_V2_ENABLED": "1", "METAPREP_STATE_DIR": str(tmp_path / "state")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jobs.sweep", "--config", str(path), "--summary-out",
                           str(summary_path), "--set", f"registry.name={name}",
                           "--set", f"checkpoint.storage_path={tmp_path / 'ray_results'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "will be ignored" not in proc.stdout + proc.stderr  # max_concurrent_trials took effect
    summary = json.loads(summary_path.read_text())

    # summary JSON
    assert summary["n_trials"] == 4
    assert summary["n_diverged"] == 1 and summary["n_failed"] >= 1  # the NaN trial did not stop the sweep
    assert summary["n_completed"] >= 1
    assert set(summary["best_config"]) == {"meta.inner_lr", "meta.outer_lr"}
    assert 0.05 <= summary["best_config"]["meta.inner_lr"] <= 0.5
    assert math.isfinite(summary["best_metric"])
    assert summary["registered_version"] is not None
    statuses = {t["trial_id"]: t["status"] for t in summary["trials"]}
    nan_trial = next(t for t in summary["trials"] if t["config"]["meta.inner_lr"] == 1.0e30)
    assert nan_trial["status"] == "diverged" and nan_trial["metric"] is None

    # MLflow: parent run, one child run per trial with params, curves and a status tag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=MLFLOW)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "true"
    assert parent.data.metrics["best_meta_val_loss"] == pytest.approx(summary["best_metric"])
    assert "sweep_lr.png" in {f.path for f in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([summary["experiment_id"]],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    for child in children:
        trial_id = child.data.tags["sweep.trial_id"]
        assert child.data.tags["sweep.status"] == statuses[trial_id]
        assert child.info.status != "RUNNING"
        params = child.data.params
        assert {"meta.inner_lr", "meta.outer_lr", "meta.inner_steps", "reparam.rank"} <= set(params)
        if statuses[trial_id] == "diverged":
            assert child.info.status == "FAILED" and float(params["meta.inner_lr"]) == 1.0e30
            assert "NaN" in child.data.tags["sweep.error"]
        else:
            assert len(client.get_metric_history(child.info.run_id, "meta_val_loss")) >= 2  # step 0 and step 2
    best = next(c for c in children if c.info.run_id == summary["best_run_id"])
    assert float(best.data.params["meta.inner_lr"]) == pytest.approx(summary["best_config"]["meta.inner_lr"])

    # registry: candidate on the best trial's version, champion comparison recorded with both scores
    for kind in ("base", "controller"):
        mv = client.get_model_version_by_alias(f"{name}-{kind}", "candidate")
        assert mv.run_id == summary["best_run_id"]
        assert mv.version == summary[f"{'registered' if kind == 'base' else 'controller'}_version"]
        record = json.loads(mv.tags["champion_comparison"])
        assert record["candidate"] == pytest.approx(summary["best_metric"], rel=1e-4)
        assert "champion" in record and record["promoted"] is True  # a fresh name has no champion yet
        assert client.get_model_version_by_alias(f"{name}-{kind}", "champion").version == mv.version

    # cluster: nothing of the sweep's job is left; all CPUs free again when nobody else is running
    deadline = time.monotonic() + 90
    while _job_leftovers(ray, summary["ray_job_id"]) and time.monotonic() < deadline:
        time.sleep(2)
    assert not _job_leftovers(ray, summary["ray_job_id"])
    total = ray.cluster_resources()["CPU"]
    own = {summary["ray_job_id"], ray.get_runtime_context().get_job_id()}
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(2)
    if not _other_jobs_running(ray, own):
        assert ray.available_resources().get("CPU", 0) == total
    print(f"sweep wall time {wall:.0f}s")


@pytest.mark.integration
def test_champion_moves_only_when_beaten_on_the_same_tasks(tmp_path, live_ray):
    """compare_and_promote: a worse candidate keeps the champion, a better one takes it; both scores are tags."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from metaprep.config import MetaTrainConfig, from_dict
    from metaprep.registry.artifacts import export_prepared
    from metaprep.registry.register import register_prepared
    from metaprep.train.local import meta_train_local
    from metaprep.train.loop import load_split
    from metaprep.tune.sweep import compare_and_promote, val_set_key

    name = f"sweeptest-champ-{uuid.uuid4().hex[:8]}"
    cfg = from_dict(MetaTrainConfig, {**QUICK, "registry": {"name": name}}).validate()
    split = load_split(cfg)
    client = MlflowClient(tracking_uri=MLFLOW)
    mlflow.set_tracking_uri(MLFLOW)
    exp = mlflow.set_experiment("metaprep-tests")

    def prepare(inner_lr: float, steps: int):
        c = from_dict(MetaTrainConfig, {**QUICK, "registry": {"name": name},
                                        "meta": {**QUICK["meta"], "inner_lr": inner_lr, "meta_steps": steps}})
        result = meta_train_local(c.validate())
        export = tmp_path / f"export-{inner_lr}-{steps}"
        export_prepared(result.model, result.loaded, c, export)
        run_id = client.create_run(exp.experiment_id, run_name=f"{name}-{inner_lr}").info.run_id
        return register_prepared(MLFLOW, run_id, export, c, result.final, "test", "{}"), export

    # a model that barely adapts (tiny inner lr) first: it becomes champion (no champion yet)
    weak_uris, weak_export = prepare(1e-4, 1)
    first = compare_and_promote(MLFLOW, cfg, split, weak_uris, weak_export)
    assert first["promoted"] and first["champion"] is None
    # a model adapting with a useful inner lr: scored on the same episodes, it must win
    strong_uris, strong_export = prepare(0.3, 2)
    second = compare_and_promote(MLFLOW, cfg, split, strong_uris, strong_export)
    assert second["champion_version"] == weak_uris["base_version"]
    assert second["metric"] == val_set_key(cfg, split)
    assert second["candidate"] < second["champion"] and second["promoted"]
    tags = client.get_model_version(f"{name}-base", strong_uris["base_version"]).tags
    record = json.loads(tags["champion_comparison"])
    assert record["candidate"] == pytest.approx(second["candidate"]) and record["promoted"]
    assert record["champion"] == pytest.approx(second["champion"], rel=1e-4)
    # the weak model again, as a new candidate: loses, champion stays
    again = compare_and_promote(MLFLOW, cfg, split, {**weak_uris}, weak_export)
    assert not again["promoted"]
    assert client.get_model_version_by_alias(f"{name}-base", "champion").version == strong_uris["base_version"]


@pytest.mark.integration
@pytest.mark.slow
def test_sweep_with_more_trials_than_cpus_leaks_nothing(tmp_path, live_ray):
    """Issue 11 (load): more trials than the cluster has CPUs queue, all finish, and free every resource."""
    ray = live_ray
    total = ray.cluster_resources()["CPU"]
    trials = int(total) + 2
    recipe = _with_sweep({"space": {"meta.inner_lr": {"loguniform": [0.05, 0.5]}}, "num_samples": trials,
                          "seed": 3, "asha": {"grace_period": 4, "reduction_factor": 2}})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    summary_path = tmp_path / "summary.json"
    env = {**os.environ, "MLFLOW_TRACKING_URI": MLFLOW, "RAY_ADDRESS": os.environ.get("RAY_ADDRESS", "127.0.0.1:6379"),
           "RAY_TRAIN_V2_ENABLED": "1", "METAPREP_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.run([sys.executable, "-m", "jobs.sweep", "--config", str(path), "--summary-out",
                           str(summary_path), "--set", f"registry.name=sweepload-{uuid.uuid4().hex[:8]}",
                           "--set", f"checkpoint.storage_path={tmp_path / 'ray_results'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["n_trials"] == trials > total and summary["n_failed"] == 0
    assert summary["n_completed"] + summary["n_early_stopped"] == trials
    deadline = time.monotonic() + 90
    while _job_leftovers(ray, summary["ray_job_id"]) and time.monotonic() < deadline:
        time.sleep(2)
    assert not _job_leftovers(ray, summary["ray_job_id"])
    own = {summary["ray_job_id"], ray.get_runtime_context().get_job_id()}
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(2)
    if not _other_jobs_running(ray, own):
        assert ray.available_resources().get("CPU", 0) == total
