"""The outer-objective options of issue 18: ``meta.support_weight`` and ``meta.warm_start_steps``."""

from __future__ import annotations

import pytest
import torch

from metaprep.config import MetaTrainConfig, load_config
from metaprep.errors import ConfigError
from metaprep.meta.algorithm import algorithm_names
from metaprep.meta.build import build_learner
from tests.test_algorithms import _setup


def _grads(learner, losses: torch.Tensor) -> dict[str, torch.Tensor]:
    params = [(n, p) for n, p in learner.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(losses.sum(), [p for _, p in params], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params, grads, strict=True)}


@pytest.mark.parametrize("algorithm, kind", [("fomaml", "lora"), ("maml", "lora"), ("mltd_tarp", "tarp_bilinear")])
def test_support_weight_adds_lambda_times_the_support_loss_at_the_init(algorithm: str, kind: str) -> None:
    cfg, learner, _, s, q = _setup(algorithm, kind)
    plain = learner(s, q, 0)[0]
    learner.algorithm.support_weight = 0.5
    weighted = learner(s, q, 0)[0]
    model = learner.model
    at_init = model.task_losses(s, model.fast_init(s.num_tasks), None)
    torch.testing.assert_close(weighted, plain + 0.5 * at_init)
    # and the meta-gradient is the papers' one plus λ times the support loss's gradient at the init
    g_weighted, g_plain, g_support = _grads(learner, weighted), _grads(learner, plain), _grads(learner, at_init)
    for name in g_plain:
        torch.testing.assert_close(g_weighted[name], g_plain[name] + 0.5 * g_support[name], atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in g_support.values())


def test_warm_start_steps_optimise_the_multitask_objective_first() -> None:
    cfg, learner, _, s, q = _setup("fomaml", "lora")
    learner.algorithm.warm_start_steps = 2
    multitask = learner.model.task_losses(s.concat(q), None, None)
    for step in (0, 1):
        torch.testing.assert_close(learner(s, q, step)[0], multitask)
    learner.algorithm.warm_start_steps = 0
    torch.testing.assert_close(learner(s, q, 2)[0], learner(s, q, 2)[0])
    assert not torch.allclose(learner(s, q, 2)[0], multitask)


def test_the_options_reach_the_algorithm_from_the_config() -> None:
    cfg, learner, _, _, _ = _setup("mltd", "tarp_dynamic")
    cfg.meta.support_weight, cfg.meta.warm_start_steps = 0.25, 3
    algorithm = build_learner(cfg.validate(), learner.model, num_train_tasks=4).algorithm
    assert (algorithm.support_weight, algorithm.warm_start_steps) == (0.25, 3)


@pytest.mark.parametrize("overrides, needle", [
    (["meta.support_weight=-1"], "meta.support_weight: must be a finite number >= 0"),
    (["meta.support_weight=nan"], "meta.support_weight: must be a finite number >= 0"),
    (["algorithm=multitask", "meta.support_weight=1"], "only the episodic algorithms use it"),
    (["meta.warm_start_steps=-1"], "meta.warm_start_steps"),
    (["meta.meta_steps=5", "meta.warm_start_steps=5"], "must be < meta.meta_steps (5)"),
    (["algorithm=finetune", "meta.warm_start_steps=1"], "meta.warm_start_steps"),
])
def test_bad_values_are_one_line_errors_naming_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(MetaTrainConfig, None, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_episodic_is_the_maml_family() -> None:
    assert set(algorithm_names(episodic=True)) == {"fomaml", "maml", "mltd_tarp", "mltd"}


def test_benchmark_method_variants_carry_config_overrides(tmp_path) -> None:
    """``ALGO+KEY=VALUE`` methods compare variants of one algorithm paired, in one benchmark run."""
    from metaprep.bench.harness import Fold, make_config
    from metaprep.bench.protocol import parse_methods, protocol_for

    proto = protocol_for("persona", "tiny", quick=True, seeds=1,
                         methods="finetune,mltd,mltd+meta.support_weight=1+meta.inner_steps=3")
    assert proto.methods == ("finetune", "mltd", "mltd+meta.support_weight=1+meta.inner_steps=3")
    fold = Fold("f", {"family": "synthetic"})
    plain, variant = (make_config(m, 0, proto, fold, "tiny") for m in proto.methods[1:])
    assert variant.algorithm == "mltd" and variant.reparam.kind == proto.tarp_kind
    assert (variant.meta.support_weight, variant.meta.inner_steps) == (1.0, 3)
    assert (plain.meta.support_weight, plain.meta.inner_steps) == (proto.support_weight, proto.inner_steps)
    for bad, needle in (("finetune,mltd+meta.support_weigt=1", "unknown key"),
                        ("finetune,multitask+meta.support_weight=1", "only the episodic algorithms"),
                        ("finetune,mltd,mltd", "each once")):
        with pytest.raises(ConfigError, match=needle):
            parse_methods(bad)


def test_report_pairs_meta_val_losses_and_counts_tams_architectures() -> None:
    from metaprep.bench.lm_report import compute, paired_val_differences, tams_diversity

    def record(method, seed, val, archs=None):
        return {"method": method, "fold": "f", "seed": seed, "val_tasks": ["a", "b"], "val_query_loss": val,
                "meta_train_s": 2.0 * (seed + 1), "cpu_s": 3.0, "extras": {"architecture": archs} if archs else {}}

    records = [record("multitask", 0, [2.0, 3.0]), record("multitask", 1, [2.5, 3.5]),
               record("mltd", 0, [1.5, 2.5], [[0, 1], [0, 2]]), record("mltd", 1, [2.0, 3.0], [[0, 1], [0, 1]])]
    d = paired_val_differences(records)["mltd"]
    assert d["n"] == 4 and abs(d["mean"] + 0.5) < 1e-12 and d["ci95"] == 0.0
    div = tams_diversity(records)
    assert set(div) == {"mltd"} and div["mltd"]["distinct_architectures"] == 1.5  # 2 on seed 0, 1 on seed 1
    assert div["mltd"]["edge_entropy_bits"] == [0.0, 0.5]  # per seed: edge 1 is 1 bit on seed 0, 0 on seed 1
    assert compute(records)["mltd"] == {"meta_train_s": 3.0, "cpu_s": 3.0, "runs": 2}


def test_tams_cell_skips_unselected_ops_only_when_alpha_is_constant() -> None:
    """With α carrying no gradient the cell runs only the ops some task selected: same losses, and with
    α attached every op still runs (the controller's straight-through gradient needs them)."""
    _, learner, _, s, _ = _setup("mltd", "tarp_bilinear")
    model = learner.model
    arch = model.architecture(s, tau=1.0, sample=True)
    assert arch.requires_grad
    fast = model.fast_init(s.num_tasks)
    with torch.no_grad():
        for cell_fast in fast.values():
            for v in cell_fast.values():
                v.add_(0.05)  # the zero-initialised up-projection would hide every op
    attached = model.task_losses(s, fast, arch)
    constant = model.task_losses(s, fast, arch.detach())
    torch.testing.assert_close(attached, constant, atol=1e-6, rtol=1e-6)
    grads = torch.autograd.grad(attached.sum(), arch)[0]
    assert grads.abs().sum() > 0


def test_meta_training_prints_progress_lines(capsys) -> None:
    from metaprep.train.local import meta_train_local

    cfg = load_config(MetaTrainConfig, None, ["model.tiny.dim=16", "model.tiny.hidden_dim=32", "model.tiny.layers=1",
                                              "model.tiny.heads=2", "tasks.seq_len=12", "meta.meta_steps=3",
                                              "meta.eval_every=2", "registry.register=false"])
    meta_train_local(cfg)
    out = capsys.readouterr().out
    for step in (1, 2, 3):
        assert f"[meta-train] step {step}/3 meta-loss " in out
    assert "meta-val" in out.split("step 2/3")[1] and "tasks/s" in out and "ETA" in out
