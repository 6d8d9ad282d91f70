"""Math of the Meta-LoRA linear experiment (metaprep.bench.linear_theory) and its benchmark suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "service") not in sys.path:  # the library lives in service/ (jobs add it the same way)
    sys.path.insert(0, str(REPO / "service"))

from metaprep.bench.linear_theory import (  # noqa: E402
    DTYPE,
    LinearConfig,
    Stats,
    finetune_lora,
    insample_test_loss,
    lora_grads,
    lora_loss,
    make_problem,
    meta_lora_grads,
    meta_lora_loss,
    population_test_loss,
    run_experiment,
    sample_stats,
    standard_retraining,
    standard_retraining_gd,
    task_grad,
    task_loss,
)


def _raw_data(seed: int, num_tasks: int = 3, d: int = 4, n: int = 50):
    gen = torch.Generator().manual_seed(seed)
    m_star = torch.randn(num_tasks, d, d, generator=gen, dtype=DTYPE)
    x = torch.randn(num_tasks, n, d, generator=gen, dtype=DTYPE)
    y = x @ m_star.mT + 0.1 * torch.randn(num_tasks, n, d, generator=gen, dtype=DTYPE)
    stats = Stats(sigma=x.mT @ x / n, cross=y.mT @ x / n, q=(y * y).sum((-2, -1)) / n, n=n)
    return gen, x, y, stats


def _fd_grad(f, t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central finite differences of a scalar function ``f`` at ``t``."""
    grad = torch.zeros_like(t)
    flat, gflat = t.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        hi = float(f(t))
        flat[i] = old - eps
        lo = float(f(t))
        flat[i] = old
        gflat[i] = (hi - lo) / (2 * eps)
    return grad


def test_loss_matches_sample_sum():
    _, x, y, stats = _raw_data(0)
    m = torch.randn(3, 4, 4, dtype=DTYPE)
    direct = ((x @ m.mT - y) ** 2).sum((-2, -1)) / (2 * x.shape[1])
    torch.testing.assert_close(task_loss(m, stats), direct)


def test_task_grad_matches_finite_differences():
    _, _, _, stats = _raw_data(1)
    m = torch.randn(3, 4, 4, dtype=DTYPE)
    fd = _fd_grad(lambda t: task_loss(t, stats).sum(), m.clone())
    torch.testing.assert_close(task_grad(m, stats), fd, atol=1e-6, rtol=1e-6)


def test_meta_lora_grads_match_finite_differences():
    _, _, _, stats = _raw_data(2)
    a = torch.randn(4, 4, dtype=DTYPE)
    u = torch.randn(3, 4, 2, dtype=DTYPE)
    g_a, g_u = meta_lora_grads(a, u, stats)
    fd_a = _fd_grad(lambda t: meta_lora_loss(t, u, stats), a.clone())
    # the inner step uses ∇_{U_t} L_t, i.e. the gradient of the *sum* T · mean_t L_t w.r.t. U_t
    fd_u = _fd_grad(lambda t: 3 * meta_lora_loss(a, t, stats), u.clone())
    torch.testing.assert_close(g_a, fd_a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_u, fd_u, atol=1e-6, rtol=1e-6)


def test_lora_grads_match_finite_differences():
    _, _, _, stats = _raw_data(3, num_tasks=1)
    one = Stats(stats.sigma[0], stats.cross[0], stats.q[0], stats.n)
    a, u, v = (torch.randn(4, 4, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE))
    g_u, g_v = lora_grads(a, u, v, one)
    fd_u = _fd_grad(lambda t: lora_loss(a, t, v, one), u.clone())
    fd_v = _fd_grad(lambda t: lora_loss(a, u, t, one), v.clone())
    torch.testing.assert_close(g_u, fd_u, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_v, fd_v, atol=1e-6, rtol=1e-6)


def test_finetune_matches_plain_gd_and_decreases_loss():
    _, _, _, stats = _raw_data(4, num_tasks=1)
    one = Stats(stats.sigma[0], stats.cross[0], stats.q[0], stats.n)
    a = torch.randn(4, 4, dtype=DTYPE)
    u0, v0 = 0.1 * torch.randn(4, 2, dtype=DTYPE), 0.1 * torch.randn(4, 2, dtype=DTYPE)
    u, v = u0.clone(), v0.clone()
    for _ in range(50):  # reference: simultaneous GD with the (FD-checked) gradients
        g_u, g_v = lora_grads(a, u, v, one)
        u, v = u - 0.01 * g_u, v - 0.01 * g_v
    m = finetune_lora(a, one, u0, v0, lr=0.01, steps=50)
    torch.testing.assert_close(m, a + u @ v.mT)
    assert task_loss(m, one) < task_loss(a + u0 @ v0.mT, one)


def test_standard_retraining_closed_form_is_gd_limit():
    _, x, y, stats = _raw_data(5)
    closed = standard_retraining(stats)
    gd = standard_retraining_gd(stats, lr=0.3, steps=2000)
    torch.testing.assert_close(gd, closed, atol=1e-9, rtol=1e-9)
    # and it is the pooled least-squares solution of the raw samples
    xs, ys = x.reshape(-1, 4), y.reshape(-1, 4)
    torch.testing.assert_close(closed, torch.linalg.lstsq(xs, ys).solution.mT)


def test_test_losses_closed_forms():
    gen = torch.Generator().manual_seed(6)
    prob = make_problem(gen, d=5, k=1, max_tasks=3)
    m_star, m_hat = prob.test_matrix(), prob.a_star
    stats = sample_stats(gen, m_star, 20000, 0.0)
    pop = population_test_loss(m_hat, m_star, 100)
    assert pop == pytest.approx(100 * float(((prob.u_test @ prob.u_test.mT) ** 2).sum()))
    # the in-sample value over N samples is N/100 × a Monte-Carlo estimate of the population value
    assert insample_test_loss(m_hat, m_star, stats) / 200 == pytest.approx(pop, rel=0.05)


def test_meta_lora_recovers_a_star_at_t3_and_sr_does_not():
    cfg = LinearConfig().quick()
    out = run_experiment(seed=0, num_tasks=3, cfg=cfg, max_tasks=5)
    meta, sr = out["meta_lora"], out["standard_retraining"]
    assert meta["a_error"] < 1e-2  # ‖Â − A*‖_F² (‖A*‖_F² ≈ 50)
    assert sr["a_error"] > 5.0  # SR converges to A* + mean_t U*_t U*_tᵀ
    assert sr["test_loss"] > 1e3 * meta["test_loss"]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("meta_lora_linear") / "x.json"
    env = {**os.environ, "PYTHONPATH": "service"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.benchmark", "--suite", "meta_lora_linear", "--quick",
         "--out", str(out), "--no-mlflow"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()), out


def test_quick_suite_end_to_end(quick_report):
    report, out = quick_report
    assert report["suite"] == "meta_lora_linear"
    assert isinstance(report["runtime_s"], float | int)
    rows = report["results"]
    assert {(r["method"], r["metric"]) for r in rows} >= {("standard_retraining", "test_loss"),
                                                          ("meta_lora", "test_loss")}
    for r in rows:
        assert set(r) == {"method", "metric", "mean", "ci95", "n", "setting"}
        assert r["n"] >= 3 and r["setting"]["T"] in (2, 3, 5) and r["setting"]["k"] == 1
    assert len(report["runs"]) == 9 and all(r["wall_s"] > 0 for r in report["runs"])
    assert report["gap"]["T=3"] > 1e3 and report["gap"]["T=2"] < 10
    assert Path(report["plots"][0]).is_file()
    assert out.with_suffix(".md").is_file()
