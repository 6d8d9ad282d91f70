"""One table over every registered algorithm x compatible reparam kind (the shared tests of STYLE.md).

Adding an algorithm is one module in ``metaprep/meta/algorithms/`` plus one row of ``TRAINS``: which
parameter groups its meta-gradient must reach. Every case checks that per-task losses are finite with
shape (T,), that gradients reach exactly the declared groups, that a batch of tasks equals the tasks
one at a time, and that export and load round-trip.
"""

from __future__ import annotations

import copy

import pytest
import torch

from metaprep.config import MetaTrainConfig, load_config
from metaprep.meta.algorithm import ALGORITHMS
from metaprep.meta.build import build_learner, build_meta_model
from metaprep.reparam.kinds import REPARAM_KINDS
from metaprep.tasks.base import make_batch, sample_meta_batch, split_tasks
from metaprep.tasks.families import load_tasks

# algorithm -> parameter groups its meta-gradient reaches (base = the LM's weights)
TRAINS = {
    "finetune": set(),
    "multitask": {"base"},
    "fomaml": {"base", "fast_init"},
    "maml": {"base", "fast_init"},
    "reptile": {"base", "fast_init"},
    "meta_lora": {"base"},
    "mltd_tarp": {"base", "fast_init"},
    "mltd": {"base", "fast_init", "controller"},
}
CASES = [(a, k) for a in ALGORITHMS for k in REPARAM_KINDS if REPARAM_KINDS[k].tarp or not ALGORITHMS[a].needs_tarp]
OVERRIDES = ["model.tiny.dim=16", "model.tiny.hidden_dim=32", "model.tiny.layers=1", "model.tiny.heads=2",
             "tasks.seq_len=12", "reparam.rank=2", "reparam.targets=[q_proj,v_proj,down_proj]", "search.width=4"]


def _setup(algorithm: str, kind: str):
    cfg = load_config(MetaTrainConfig, None, [*OVERRIDES, f"algorithm={algorithm}", f"reparam.kind={kind}"])
    model, loaded = build_meta_model(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # away from the zero init, so every factor (and the TAMS cell's output) matters
        for p in model.fast_init.parameters():
            p.add_(0.1 * torch.randn_like(p))
    learner = build_learner(cfg, model, num_train_tasks=4)
    split = split_tasks(load_tasks(cfg.tasks), 0.15, 0.15, 1)
    eps = sample_meta_batch(split.train, 2, 2, 2, seed=0, step=0)
    index = {t.name: i for i, t in enumerate(split.train[:4])}
    index.update({ep.task: i % 4 for i, ep in enumerate(eps)})
    s = make_batch(eps, "support", loaded.tokenizer, cfg.tasks.seq_len, index)
    q = make_batch(eps, "query", loaded.tokenizer, cfg.tasks.seq_len, index)
    s.noise_seeds = [11, 12]
    return cfg, learner, loaded, s, q


def _group(name: str) -> str:
    return name.split(".")[1] if name.startswith("model.") and name.split(".")[1] != "lm" else "base"


def test_the_table_covers_the_registry() -> None:
    assert set(TRAINS) == set(ALGORITHMS)
    assert {a for a, _ in CASES} == set(ALGORITHMS) and {k for _, k in CASES} == set(REPARAM_KINDS)


@pytest.mark.parametrize("algorithm, kind", CASES)
def test_losses_and_gradients_reach_exactly_the_declared_parameters(algorithm: str, kind: str) -> None:
    _, learner, _, s, q = _setup(algorithm, kind)
    trainable = {_group(n) for n, p in learner.named_parameters() if p.requires_grad}
    assert trainable == TRAINS[algorithm]
    if not ALGORITHMS[algorithm].meta_trains:
        with pytest.raises(RuntimeError):
            learner(s, q, 0)
        return
    losses, metrics = learner(s, q, 0)
    assert losses.shape == (2,) and torch.isfinite(losses).all() and metrics
    losses.sum().backward()
    reached = {_group(n) for n, p in learner.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == TRAINS[algorithm]


@pytest.mark.parametrize("algorithm, kind", [c for c in CASES if ALGORITHMS[c[0]].meta_trains])
def test_a_batch_of_tasks_equals_the_tasks_one_at_a_time(algorithm: str, kind: str) -> None:
    _, learner, _, s, q = _setup(algorithm, kind)
    batched, _ = copy.deepcopy(learner)(s, q, 0)
    for i in range(2):
        alone, _ = copy.deepcopy(learner)(s.select([i]), q.select([i]), 0)
        assert torch.allclose(alone, batched[i:i + 1], rtol=1e-4, atol=1e-5), (algorithm, kind, i)


@pytest.mark.parametrize("algorithm, kind", CASES)
def test_export_and_load_round_trip(algorithm: str, kind: str, tmp_path) -> None:
    from metaprep.registry.artifacts import export_prepared, load_prepared

    cfg, learner, loaded, s, _ = _setup(algorithm, kind)
    model = learner.model
    base, ctrl = export_prepared(model, loaded, cfg, tmp_path)
    again, _, cfg_again = load_prepared(base, ctrl)
    assert cfg_again.algorithm == algorithm and cfg_again.reparam.kind == kind
    with torch.no_grad():
        arch = model.architecture(s, sample=False)
        expected = model.task_losses(s, model.fast_init(2), arch)
        got = again.task_losses(s, again.fast_init(2), again.architecture(s, sample=False))
    assert torch.allclose(expected, got, atol=1e-5)


def test_finetune_runs_through_the_worker_loop_and_exports_the_base(tmp_path) -> None:
    """``finetune`` takes no outer step, but ``jobs.meta_train`` still prepares (exports) the base with its init."""
    from metaprep.registry.artifacts import load_prepared
    from metaprep.train.local import meta_train_local

    cfg = load_config(MetaTrainConfig, None, [*OVERRIDES, "algorithm=finetune", "meta.meta_steps=2"])
    res = meta_train_local(cfg, export=True)
    assert res.final["meta_steps"] == 0 and res.final["diverged_at"] is None
    model, _, cfg_again = load_prepared(res.export_dir / "base", res.export_dir / "controller")
    assert cfg_again.algorithm == "finetune"
    for (name, p), (_, q) in zip(model.fast_init.named_parameters(), res.model.fast_init.named_parameters(),
                                 strict=True):
        assert torch.equal(p, q), name
