"""jobs.sweep's recipe: the ``sweep:`` section (parsing, validation, errors) and the transfer recommender's
portfolio ranked before Tune starts. Fast unit tests; the helpers here are shared with test_sweep.py."""

from __future__ import annotations

import json
import math
import os
import re
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
    from metaprep.tune.recipe import load_sweep_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return load_sweep_recipe(path, overrides, num_samples)


def _load_ranked(tmp_path: Path, recipe: dict, overrides: list[str] | None = None):
    """:func:`_load`, then the recommender's portfolio ranked as the sweep driver does before Tune starts."""
    from metaprep.tune.portfolio import resolve_initial_points

    cfg, base, spec = _load(tmp_path, recipe, overrides)
    return cfg, base, resolve_initial_points(spec, cfg.tracking.uri)


def _with_sweep(sweep: dict) -> dict:
    return {**QUICK, "sweep": sweep}


# --------------------------------------------------------------------------- space parsing (fast)

def test_default_space_for_a_recipe_without_sweep_section():
    from metaprep.tune.recipe import load_sweep_recipe

    cfg, base, spec = load_sweep_recipe(TINY, num_samples=6)
    assert spec.num_samples == 6
    assert set(spec.space) == set(DEFAULT_SWEEP["space"])
    assert spec.space["meta.inner_lr"].kind == "loguniform" and spec.space["meta.outer_lr"].kind == "loguniform"
    assert spec.searcher == "random" and spec.asha.enabled
    assert base["meta"]["inner_lr"] == cfg.meta.inner_lr


def test_sweep_tiny_recipe_parses():
    from metaprep.tune.recipe import load_sweep_recipe

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
    from metaprep.tune.recipe import load_sweep_recipe

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
    from metaprep.tune.recipe import load_sweep_recipe

    lines = path.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "meta.inner_lr: {uniform" in text)
    with pytest.raises(ConfigError, match=rf"recipe.yaml:{line}: sweep.space.meta.inner_lr"):
        load_sweep_recipe(path)


def test_base_recipe_errors_still_come_from_the_recipe(tmp_path):
    bad = {**QUICK, "meta": {**QUICK["meta"], "inner_lrr": 0.1}, "sweep": {"num_samples": 2}}
    with pytest.raises(ConfigError, match="unknown key 'meta.inner_lrr'"):
        _load(tmp_path, bad)


def test_asha_off_when_nothing_is_evaluated_before_the_end(tmp_path):
    """Issue 19: ASHA turned itself off for short runs without saying so; the sweep now prints when and why."""
    from metaprep.tune.sweep import asha_scheduler

    recipe = {**QUICK, "meta": {**QUICK["meta"], "eval_every": 4}}
    cfg, _, spec = _load(tmp_path, recipe, num_samples=2)
    assert not spec.asha.enabled
    scheduler, line = asha_scheduler(cfg, spec)
    assert scheduler is None and "\n" not in line
    assert line.startswith("metaprep: ASHA off: meta.eval_every (4) >= meta.meta_steps (4)")
    assert "set meta.eval_every below meta.meta_steps" in line

    cfg, _, spec = _load(tmp_path, _with_sweep({"asha": {"enabled": False}}))
    assert asha_scheduler(cfg, spec)[1].startswith("metaprep: ASHA off: sweep.asha.enabled is false in the recipe")

    cfg, _, spec = _load(tmp_path, _with_sweep({"asha": {"grace_period": 2, "reduction_factor": 2}}))
    scheduler, line = asha_scheduler(cfg, spec)
    assert scheduler is not None and line.startswith("metaprep: ASHA on: at meta-step 2 ")


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

    _, _, spec = _load_ranked(tmp_path, _transfer_sweep(surrogate_dir))
    recs = spec.recommended
    assert [r["rank"] for r in recs] == [1, 2, 3]
    assert spec.portfolio == [r["params"] for r in recs]  # in the recommender's rank order
    for r in recs:
        p = r["params"]
        assert set(p) == {"meta.inner_lr", "meta.inner_steps"}
        assert 0.03 <= p["meta.inner_lr"] <= 1.0 and p["meta.inner_steps"] in (1, 2, 3)
        assert r["config"] == {"lr": p["meta.inner_lr"], "steps": p["meta.inner_steps"], "rank": 8}
    again = Recommender.load(surrogate_dir).rank({"m": 0.5}, [r["config"] for r in recs], k=1)
    assert again[0].config == recs[0]["config"]  # the first pick is the same on reload
    json.dumps([spec.to_dict(), spec.recommended])  # what run_sweep logs to the MLflow parent run

    # every candidate ranked (same seed, same samples): the top 3 are its prefix, and the first pick is the
    # candidate the synthetic ground truth makes best
    _, _, full = _load_ranked(tmp_path, _transfer_sweep(surrogate_dir, top_k=32))
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
    _, _, both = _load_ranked(tmp_path, recipe)
    assert both.portfolio == [{"meta.inner_lr": 0.1}] + [r["params"] for r in recs]


def test_registered_surrogate_needs_a_tracking_uri(tmp_path, surrogate_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"recipe.yaml:\d+: sweep.recommender.surrogate: no MLflow tracking URI"):
        _load_ranked(tmp_path, _transfer_sweep(surrogate_dir, surrogate="models:/metaprep-surrogate/1"))


def test_parsing_loads_no_surrogate(tmp_path, surrogate_dir, monkeypatch):
    """Recipe parsing only validates the block; the surrogate is loaded and checked when the portfolio is ranked."""
    recipe = _transfer_sweep(surrogate_dir, params={"meta.inner_lr": "learning_rate", "meta.inner_steps": "steps"})
    _, _, spec = _load(tmp_path, recipe)
    assert spec.recommender is not None and spec.recommended == [] and spec.portfolio == []
    with pytest.raises(ConfigError, match=r"recipe.yaml:\d+: sweep.recommender.params.meta.inner_lr: 'learning_rate'"):
        _load_ranked(tmp_path, recipe)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # nothing is downloaded while parsing either
    _load(tmp_path, _transfer_sweep(surrogate_dir, surrogate="models:/metaprep-surrogate/1"))


def test_sweep_transfer_recipe_parses(surrogate_dir):
    from metaprep.tune.portfolio import resolve_initial_points
    from metaprep.tune.recipe import load_sweep_recipe

    with pytest.raises(ConfigError, match=r"sweep_transfer.yaml:\d+: sweep.recommender.surrogate: .* is not a saved "
                                          r"surrogate folder"):
        load_sweep_recipe(SWEEP_TRANSFER, [f"sweep.recommender.surrogate={surrogate_dir.parent / 'missing'}"])
    cfg, _, spec = load_sweep_recipe(SWEEP_TRANSFER, [  # the fixture's surrogate knows lr, steps, rank and m
        f"sweep.recommender.surrogate={surrogate_dir}", "sweep.recommender.meta_features={m: 0.5}",
        "sweep.recommender.params={meta.inner_lr: lr, meta.inner_steps: steps, reparam.rank: rank}",
        "sweep.recommender.fixed={}"])
    assert spec.searcher == "transfer" and spec.portfolio == [] and spec.recommended == []  # parsed, not ranked
    spec = resolve_initial_points(spec, cfg.tracking.uri)
    assert len(spec.portfolio) == spec.recommender.top_k == 3


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
        _load_ranked(tmp_path, _transfer_sweep(surrogate_dir, **block))
    msg = str(info.value)
    assert needle in msg, msg
    assert re.search(r"recipe\.yaml:\d+: sweep\.recommender", msg) and "\n" not in msg, msg

