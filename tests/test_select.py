"""checkpoint.select: a run registers the weights of its best meta-val evaluation (or its last step)."""

from __future__ import annotations

import torch

from metaprep.config import MetaTrainConfig, load_config
from metaprep.train.select import BestWeights

TINY = ["model.tiny.dim=16", "model.tiny.hidden_dim=32", "model.tiny.layers=1", "model.tiny.heads=2",
        "tasks.seq_len=12", "registry.register=false"]


def test_best_weights_keep_the_best_evaluation_and_restore_it() -> None:
    layer = torch.nn.Linear(3, 2)
    best = BestWeights(enabled=True, zero3=False, rank=0)
    best.offer(layer, 0, 2.0)
    kept = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    best.offer(layer, 2, 2.5)  # worse: not kept
    best.offer(layer, 4, float("nan"))  # not finite: never kept
    assert best.restore(layer, last_step=4) == {"selected_step": 0, "selected_meta_val_loss": 2.0, "select": "best"}
    assert torch.equal(layer.weight, kept)
    off = BestWeights(enabled=False, zero3=False, rank=0)
    off.offer(layer, 0, 1.0)
    assert off.restore(layer, last_step=4) == {"selected_step": 4, "select": "last"}


def _run(monkeypatch, tmp_path, select: str, vals: list[float]):
    import metaprep.train.loop as loop
    from metaprep.registry.artifacts import load_prepared
    from metaprep.train.local import meta_train_local

    seen = iter(vals)
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: next(seen))  # meta-val at steps 0, 2, 4
    cfg = load_config(MetaTrainConfig, None, [*TINY, "meta.meta_steps=4", "meta.eval_every=2",
                                              f"checkpoint.select={select}"])
    res = meta_train_local(cfg, export=True)
    model, _, _ = load_prepared(res.export_dir / "base", res.export_dir / "controller")
    return res, model


def test_the_run_exports_the_best_evaluation_not_the_last(monkeypatch, tmp_path) -> None:
    res, exported = _run(monkeypatch, tmp_path, "best", [3.0, 2.0, 2.5])
    assert res.final["selected_step"] == 2 and res.final["selected_meta_val_loss"] == 2.0
    last_res, last_exported = _run(monkeypatch, tmp_path, "last", [3.0, 2.0, 2.5])
    assert last_res.final["selected_step"] == 4
    # same seed and batches: the step-4 weights differ from the step-2 weights that "best" registered
    a, b = dict(exported.lm.named_parameters()), dict(last_exported.lm.named_parameters())
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(p, dict(res.model.lm.named_parameters())[k]) for k, p in a.items())
