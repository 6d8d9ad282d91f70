"""meta.early_stopping_patience: meta-training stops when meta-val stops improving (issue 19, item 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaprep.config import MetaTrainConfig, config_reference, load_config
from metaprep.errors import ConfigError
from metaprep.train.select import EarlyStopping

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.tiny.dim=16", "model.tiny.hidden_dim=32", "model.tiny.layers=1", "model.tiny.heads=2",
        "tasks.seq_len=12", "registry.register=false", "meta.eval_tasks=4"]


def test_patience_counts_evaluations_that_do_not_beat_the_best_by_min_delta() -> None:
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    assert [stopper.update(step, val) for step, val in
            [(0, 3.0), (2, 2.0), (4, 1.95), (6, float("nan")), (8, 1.0)]] == [False, False, False, True, False]
    assert (stopper.best, stopper.best_step) == (1.0, 8)
    never = EarlyStopping(patience=0, min_delta=0.0)
    assert not any(never.update(step, 5.0) for step in range(10))


@pytest.mark.parametrize("override, expected", [
    ("meta.early_stopping_patience=-1", "meta.early_stopping_patience: must be >= 0, got -1"),
    ("meta.early_stopping_min_delta=-0.5", "meta.early_stopping_min_delta: must be a finite number >= 0"),
    ("meta.early_stopping_patience=1.5", "meta.early_stopping_patience: expected int"),
])
def test_bad_early_stopping_values_are_refused(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(MetaTrainConfig, None, [override])
    with pytest.raises(ConfigError, match="algorithm finetune does not meta-train"):
        load_config(MetaTrainConfig, None, ["algorithm=finetune", "meta.early_stopping_patience=2"])
    assert "meta.early_stopping_patience (int, default 0)" in config_reference()


def test_a_run_stops_when_meta_val_stops_improving(monkeypatch, tmp_path, capsys) -> None:
    """Meta-val 3.0, 2.0, 2.5, 2.6 at steps 0, 2, 4, 6 with patience 2: the run stops at step 6 of 20, says why,
    logs ``stopped_early_at_step`` and registers the step-2 weights (checkpoint.select=best)."""
    import mlflow

    import metaprep.train.loop as loop
    from metaprep.train.local import meta_train_local

    seen = iter([3.0, 2.0, 2.5, 2.6])
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: next(seen))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("stop", artifact_location=str(tmp_path / "a"))).info.run_id
    cfg = load_config(MetaTrainConfig, None, [*TINY, "meta.meta_steps=20", "meta.eval_every=2",
                                              "meta.early_stopping_patience=2"])
    res = meta_train_local(cfg, tracking={"uri": uri, "run_id": run_id}, export=True)
    assert res.final["meta_steps"] == res.final["stopped_early_at_step"] == 6
    assert res.final["selected_step"] == 2 and [s for s, _ in res.final["meta_val_curve"]] == [0, 2, 4, 6]
    assert "stopping early at meta-step 6/20: 2 meta-val evaluations without improving on the best 2.0000 " \
           "(meta-step 2)" in capsys.readouterr().out
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "stopped_early_at_step")] == [(6, 6.0)]
    assert client.get_metric_history(run_id, "meta_loss")[-1].step == 6


@pytest.mark.integration
def test_two_workers_stop_at_the_same_step_as_one(ray_cluster, tmp_path) -> None:
    """No evaluation improves by min_delta 100, so with patience 1 the run stops at the first evaluation after
    step 0, on both workers (the job ends; a rank left waiting would hang it) and as a single worker does."""
    import uuid

    from metaprep.train.local import meta_train_local
    from metaprep.train.ray_job import build_trainer

    base = [*TINY, "meta.meta_steps=8", "meta.eval_every=2", "meta.early_stopping_patience=1",
            "meta.early_stopping_min_delta=100"]
    one = meta_train_local(load_config(MetaTrainConfig, None, base))
    two = build_trainer(load_config(MetaTrainConfig, None, [*base, "distributed.num_workers=2"]),
                        f"stop-{uuid.uuid4().hex[:6]}", str(tmp_path), None).fit().metrics
    assert one.final["stopped_early_at_step"] == two["stopped_early_at_step"] == two["meta_steps"] == 2
    assert two["meta_val_loss_end"] == pytest.approx(one.final["meta_val_loss_end"], rel=1e-4)
