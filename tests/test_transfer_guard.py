"""The recommender's first-pick guard (issue 20, item 1): held-out regrets by cross-validation over training
datasets, the local (kernel-weighted) choice between the surrogate's pick and the best default, the portfolio
continuing from the default, save/load, and what jobs.recommend shows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from metaprep.errors import ConfigError, ModelLoadError
from metaprep.transfer.defaults import best_default_order, default_scores, normalized_regret
from metaprep.transfer.features import DictEncoder
from metaprep.transfer.guard import DefaultGuard, HeldOut
from metaprep.transfer.metadataset import Pool

CONFIGS = [{"lr": lr} for lr in (1e-4, 1e-3, 1e-2, 1e-1)]


def _pool(name: str, m: float, best: int) -> Pool:
    """Four learning rates; configuration ``best`` wins, the others fall off with their distance to it."""
    perf = np.array([-abs(i - best) for i in range(len(CONFIGS))], dtype=float)
    return Pool(name, {"m": m}, list(CONFIGS), perf, np.full(4, np.nan), [()] * 4)


class _FixedPick:
    """A stand-in surrogate that always prefers configuration ``pick`` (records what it was fitted on)."""

    def __init__(self, pick: int):
        self.pick = pick

    def predict_members(self, configs, meta):
        out = np.zeros((2, len(configs)))
        out[:, self.pick] = 1.0
        return out


def _encoder(metas: list[dict]) -> DictEncoder:
    return DictEncoder().fit(metas)


def test_fit_scores_each_held_out_dataset_against_the_other_folds_default():
    pools = [_pool("a", 0.0, 1), _pool("b", 1.0, 1), _pool("c", 2.0, 1), _pool("d", 3.0, 3),
             Pool("flat", {"m": 4.0}, list(CONFIGS), np.zeros(4), np.full(4, np.nan), [()] * 4)]
    fitted_on: list[list[str]] = []

    def fit_surrogate(train):
        fitted_on.append(sorted(p.dataset for p in train))
        return _FixedPick(3)

    guard = DefaultGuard.fit(pools, fit_surrogate, _encoder([p.meta_features for p in pools]), folds=8, seed=0)
    # leave-one-dataset-out over the four evaluable datasets; the constant pool is never held out, always trained on
    assert guard.folds == 4 and len(fitted_on) == 4
    assert all(len(f) == 4 and "flat" in f for f in fitted_on)
    by = {r.dataset: r for r in guard.records}
    assert sorted(by) == ["a", "b", "c", "d"]
    for name, r in by.items():
        pool = next(p for p in pools if p.dataset == name)
        train = [p for p in pools if p.dataset != name]
        assert r.regret_surrogate == pytest.approx(normalized_regret(pool.performance, [3], 1))
        default = int(best_default_order(train, CONFIGS)[0])
        assert r.regret_default == pytest.approx(normalized_regret(pool.performance, [default], 1))
    assert by["a"].regret_surrogate == pytest.approx(2 / 2) and by["d"].regret_surrogate == 0.0
    # bandwidth: the median distance from a held-out dataset to its nearest other one (equal spacing here)
    z = _encoder([p.meta_features for p in pools]).transform([{"m": 0.0}, {"m": 1.0}])
    assert guard.bandwidth == pytest.approx(float(np.linalg.norm(z[0] - z[1])))

    grouped = DefaultGuard.fit(pools, lambda train: _FixedPick(0), _encoder([p.meta_features for p in pools]),
                               folds=2, seed=0)
    assert grouped.folds == 2 and len(grouped.records) == 4
    assert DefaultGuard.fit(pools[:1], fit_surrogate, _encoder([{"m": 0.0}])) is None  # nothing to hold out
    assert DefaultGuard.fit(pools, fit_surrogate, _encoder([{"m": 0.0}]), folds=0) is None  # turned off
    with pytest.raises(ConfigError, match="guard folds must be 0 .no guard. or >= 2, got 1"):
        DefaultGuard.fit(pools, fit_surrogate, _encoder([{"m": 0.0}]), folds=1)


def test_the_guard_switches_itself_off_where_its_own_held_out_decisions_do_not_pay():
    """Neighbours that disagree: each held-out dataset decided from the others gets it wrong, so the rule is off."""
    records = [HeldOut(f"d{i}", {"m": float(i)}, *((0.5, 0.0) if i % 2 == 0 else (0.0, 0.5))) for i in range(6)]
    encoder = _encoder([r.meta_features for r in records])
    guard = DefaultGuard(records, bandwidth=0.3, folds=6)
    check = guard.self_check(encoder)
    assert not check["active"] and check["guarded"] > check["surrogate"]
    assert check["surrogate"] == pytest.approx(0.25) and check["default"] == pytest.approx(0.25)
    decision = guard.decide({"m": 0.0}, encoder)  # right on a dataset where the default won
    assert decision.delta > 0 and decision.pick == "surrogate" and "the guard is off" in decision.reason()


def test_best_default_does_not_depend_on_the_order_of_a_pools_runs():
    """Two training configurations equally near a candidate: the same one is its neighbour whatever the order."""
    configs = [{"lr": 1e-3, "opt": "adam"}, {"lr": 1e-3, "opt": "sgd"}]
    a = Pool("a", {"m": 0.0}, configs, np.array([1.0, 0.0]), np.full(2, np.nan), [()] * 2)
    b = Pool("a", {"m": 0.0}, configs[::-1], np.array([0.0, 1.0]), np.full(2, np.nan), [()] * 2)
    candidate = [{"lr": 1e-3, "opt": "rmsprop"}]  # an unseen category: equally far from both
    assert default_scores([a], candidate)[0] == default_scores([b], candidate)[0]


def test_decide_follows_the_held_out_evidence_nearest_the_new_dataset():
    records = [HeldOut("low1", {"m": 0.0}, 0.05, 0.30), HeldOut("low2", {"m": 1.0}, 0.10, 0.20),
               HeldOut("high1", {"m": 9.0}, 0.60, 0.05), HeldOut("high2", {"m": 10.0}, 0.40, 0.00)]
    encoder = _encoder([r.meta_features for r in records])
    guard = DefaultGuard(records, bandwidth=0.3, folds=4)
    low, high, far = (guard.decide({"m": m}, encoder) for m in (0.5, 9.5, 100.0))
    assert low.pick == "surrogate" and low.delta < 0
    assert high.pick == "best_default" and high.delta == pytest.approx(0.475, abs=1e-3)
    assert far.pick == "best_default" and far.neighbours[0]["dataset"] == "high2"  # the nearest keeps the weight
    assert "best default" in high.reason() and "high" in high.reason()
    assert high.check["active"] and high.check["guarded"] < high.check["surrogate"]
    # equal evidence either way: the surrogate keeps the first pick
    tie = DefaultGuard([HeldOut("x", {"m": 0.0}, 0.1, 0.1), HeldOut("y", {"m": 1.0}, 0.2, 0.2)], 1.0, 2)
    assert tie.decide({"m": 0.5}, _encoder([{"m": 0.0}, {"m": 1.0}])).pick == "surrogate"


@pytest.fixture(scope="module")
def recommender():
    from metaprep.transfer.recommender import Recommender

    pools = [_pool(f"ds{i}", float(i), best) for i, best in enumerate((0, 1, 1, 2))]
    return Recommender.fit(pools, seed=0, steps=100, members=4, cost_steps=0, guard_folds=0)


def test_rank_puts_the_default_first_where_the_guard_says_so(tmp_path: Path, recommender, monkeypatch):
    from metaprep.transfer.recommender import Recommender, greedy_portfolio

    meta = {"m": 3.0}
    candidates = CONFIGS[::-1]  # not the evidence's order
    plain = recommender.rank(meta, candidates, k=3, guarded=False)
    default = int(best_default_order(recommender.evidence.pools(), candidates)[0])
    assert plain[0].config != candidates[default]  # the guard's pick changes the first pick here
    monkeypatch.setattr(recommender, "guard", DefaultGuard(
        [HeldOut("ds0", {"m": 0.0}, 0.9, 0.0), HeldOut("ds3", {"m": 3.0}, 0.9, 0.0)], 1.0, 2))
    picks = recommender.rank(meta, candidates, k=3)
    assert picks[0].picked_by == "best_default" and picks[0].config == candidates[default]
    assert [p.picked_by for p in picks[1:]] == ["surrogate", "surrogate"]
    members = recommender.surrogate.predict_members(candidates, meta)
    order, _ = greedy_portfolio(members, 3, first=default)
    assert [p.config for p in picks] == [candidates[i] for i in order]  # the portfolio continues from it
    assert all(p.picked_by == "surrogate" for p in plain)
    assert recommender.rank(meta, candidates, k=1, cost_aware=False, guarded=False)[0].config == plain[0].config
    # where the best default is the surrogate's own first pick, nothing is relabelled
    own = plain[0].config
    same, decision = recommender.first_pick(meta, [own, *[c for c in candidates if c != own]])
    assert decision.pick == "best_default" and (same is None) == decision.same_as_surrogate

    recommender.save(tmp_path / "rec")
    loaded = Recommender.load(tmp_path / "rec")
    assert loaded.guard.to_dict() == recommender.guard.to_dict()
    assert [p.config for p in loaded.rank(meta, candidates, k=3)] == [p.config for p in picks]
    monkeypatch.setattr(recommender, "guard", None)
    recommender.save(tmp_path / "rec")  # saved again without a guard: the old guard.json goes
    assert not (tmp_path / "rec" / "guard.json").exists() and Recommender.load(tmp_path / "rec").guard is None


@pytest.mark.parametrize("edit, message", [
    (lambda g: g["held_out"][1].update(regret_default=2.0), r"held_out\[1\]: 'regret_default' must be a number in"),
    (lambda g: g["held_out"][1].update(dataset="ds0"), r"held_out\[1\]: dataset 'ds0' is held out twice"),
    (lambda g: g["held_out"][0].update(meta_features={"size": 1.0}), r"held_out\[0\]: 'meta_features' must map"),
    (lambda g: g.update(folds=5), r"'held_out' must be a list of at least 'folds' \(5\)"),
    (lambda g: g.update(bandwidth=0), "'bandwidth' must be a positive number"),
    (lambda g: g.update(format_version=7), "not a default guard of format 1"),
])
def test_malformed_guard_json_is_one_line_error(tmp_path: Path, recommender, monkeypatch, edit, message):
    from metaprep.transfer.recommender import Recommender

    monkeypatch.setattr(recommender, "guard", DefaultGuard(
        [HeldOut("ds0", {"m": 0.0}, 0.9, 0.0), HeldOut("ds3", {"m": 3.0}, 0.9, 0.0)], 1.0, 2))
    folder = recommender.save(tmp_path / "rec")
    spec = json.loads((folder / "guard.json").read_text())
    edit(spec)
    (folder / "guard.json").write_text(json.dumps(spec))
    with pytest.raises(ModelLoadError, match=message) as exc:
        Recommender.load(folder)
    assert "\n" not in str(exc.value) and str(folder / "guard.json") in str(exc.value)


def test_guard_without_its_evidence_is_refused(tmp_path: Path, recommender, monkeypatch):
    from metaprep.transfer.recommender import Recommender

    monkeypatch.setattr(recommender, "guard", DefaultGuard(
        [HeldOut("ds0", {"m": 0.0}, 0.9, 0.0), HeldOut("ds3", {"m": 3.0}, 0.9, 0.0)], 1.0, 2))
    folder = recommender.save(tmp_path / "rec")
    (folder / "evidence.json").unlink()
    with pytest.raises(ModelLoadError, match="a guard needs the training evidence"):
        Recommender.load(folder)


def test_recommend_job_explains_the_first_pick(tmp_path: Path, capsys):
    from jobs import recommend
    from jobs._cli import run_main

    rows = [{"dataset": f"ds{i}", "config": c, "meta": {"m": float(i)}, "performance": float(p)}
            for i, best in enumerate((0, 1, 1, 2, 2)) for c, p in zip(CONFIGS, _pool("x", 0, best).performance,
                                                                    strict=True)]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--train-meta", str(path), "--meta-features", '{"m": 2.5}', "--fit-steps", "50", "--top-k", "2"]
    with pytest.raises(SystemExit) as exc:
        run_main(recommend.main, [*argv, "--format", "json"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    summary = json.loads(out)
    first = summary["first_pick"]
    assert first["picked_by"] in ("surrogate", "best_default")
    assert summary["portfolio"][0]["picked_by"] == first["picked_by"]
    assert (first["delta_regret"] > 0) == (first["picked_by"] == "best_default")
    assert len(first["held_out_neighbours"]) == 3 and "picked_by" in summary["scales"]
    with pytest.raises(SystemExit) as exc:
        run_main(recommend.main, [*argv, "--format", "table"])
    assert exc.value.code == 0 and "first pick: " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        run_main(recommend.main, [*argv, "--format", "json", "--guard-folds", "0"])
    assert exc.value.code == 0 and json.loads(capsys.readouterr().out)["first_pick"] is None
    for bad, message in ((["--guard-folds", "1"], "--guard-folds must be 0 (off) or >= 2, got 1"),
                         (["--guard-folds", "-2"], "--guard-folds must be 0 (off) or >= 2, got -2")):
        with pytest.raises(SystemExit) as exc:
            run_main(recommend.main, [*argv, *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and message in err[0]
