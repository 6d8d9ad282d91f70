"""Suite ``meta_lora_linear``: SR vs Meta-LoRA on the linear experiment of Block et al. (2024).

For T ∈ {2, 3, 5} (k = 1, d = 10, N = 5000, N' = 100) and each seed,
:func:`metaprep.bench.linear_theory.run_experiment` trains standard retraining (closed-form pooled
least squares) and Meta-LoRA (alternating GD, 3000 outer steps), then LoRA-finetunes both on a
fresh test task. Rows, per
method and T, over seeds:

* ``test_loss`` — ``N' ‖M* − M̂‖_F²`` after finetuning: the population value (expectation over fresh
  inputs) of the paper's "test task loss", which sums the noise-free squared error over N' = 100
  samples. Released run: T=3 ≈ 1.5e-3 (Meta-LoRA) vs ≈ 3.0e3 (SR).
* ``test_loss_insample`` — the released metric exactly (on the N' finetuning inputs).
* ``a_error`` — ``‖Â − A*‖_F²`` of the retrained base (Meta-LoRA recovers A* for T ≥ 3).

Extra keys: ``runs`` (T, seed, wall_s and the per-run values), ``gap`` (SR / Meta-LoRA mean test
loss per T, target ≥ 1e4 at T = 3), ``config`` and ``plots`` (test loss vs T, next to ``--out``).
``--quick`` uses :meth:`LinearConfig.quick` (N = 1000, 600 outer / 3000 finetuning steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

from metaprep.bench.linear_theory import LinearConfig, run_experiment
from metaprep.bench.report import result
from metaprep.progress import Progress

METHODS = ("standard_retraining", "meta_lora")
METRICS = ("test_loss", "test_loss_insample", "a_error")
TASK_COUNTS = (2, 3, 5)
GAP_TARGET = 1e4  # SR / Meta-LoRA test loss at T = 3
OFFICIAL_S_PER_RUN = 240.0  # the released numpy script, ~4 min per (seed, T) on 2 cores


def run(args: argparse.Namespace) -> dict:
    quick = bool(getattr(args, "quick", False))
    cfg = LinearConfig().quick() if quick else LinearConfig()
    n_seeds = args.seeds or (3 if quick else 5)
    runs = []
    progress = Progress("meta_lora_linear", (n_seeds, "seed"), (len(TASK_COUNTS), "task count"))
    for seed in range(n_seeds):
        for num_tasks in TASK_COUNTS:
            unit = f"seed {seed} T={num_tasks} methods {'+'.join(METHODS)}"
            progress.start(unit)
            start = time.perf_counter()
            values = run_experiment(seed, num_tasks, cfg, max_tasks=max(TASK_COUNTS))
            runs.append({"T": num_tasks, "seed": seed, "wall_s": round(time.perf_counter() - start, 3),
                         **values})
            progress.done(unit, "test loss " + ", ".join(f"{m} {values[m]['test_loss']:.4g}" for m in METHODS))
    progress.finish()

    results = []
    for method in METHODS:
        for metric in METRICS:
            for num_tasks in TASK_COUNTS:
                vals = [r[method][metric] for r in runs if r["T"] == num_tasks]
                results.append(result(method, metric, vals, T=num_tasks, k=cfg.k))
    gap = {}
    for num_tasks in TASK_COUNTS:
        mean = {m: statistics.fmean(r[m]["test_loss"] for r in runs if r["T"] == num_tasks) for m in METHODS}
        gap[f"T={num_tasks}"] = mean["standard_retraining"] / mean["meta_lora"]
    walls = [r["wall_s"] for r in runs]
    report = {
        "results": results,
        "runs": runs,
        "gap": gap,
        "gap_target_met": gap["T=3"] >= GAP_TARGET,
        "config": {**dataclasses.asdict(cfg), "quick": quick, "seeds": n_seeds, "T": list(TASK_COUNTS)},
        "wall_s_per_run": {"mean": statistics.fmean(walls), "max": max(walls),
                           "official": OFFICIAL_S_PER_RUN},
        "reference": {"T=3": {"meta_lora": 1.5e-3, "standard_retraining": 3.0e3}},
    }
    out = getattr(args, "out", None)
    if out:
        report["plots"] = [str(_plot(runs, Path(out).with_name(Path(out).stem + "_test_loss.png")))]
    return report


def _plot(runs: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for method, marker in zip(METHODS, ("o", "v"), strict=True):
        per_t = {t: [r[method]["test_loss"] for r in runs if r["T"] == t] for t in TASK_COUNTS}
        means = [statistics.fmean(per_t[t]) for t in TASK_COUNTS]
        lo = [m - min(per_t[t]) for m, t in zip(means, TASK_COUNTS, strict=True)]
        hi = [max(per_t[t]) - m for m, t in zip(means, TASK_COUNTS, strict=True)]
        ax.errorbar(TASK_COUNTS, means, yerr=[lo, hi], marker=marker, capsize=3, label=method)
        for t in TASK_COUNTS:
            ax.scatter([t] * len(per_t[t]), per_t[t], s=8, alpha=0.4, color=ax.lines[-1].get_color())
    ax.set_yscale("log")
    ax.set_xticks(TASK_COUNTS)
    ax.set_xlabel("number of training tasks T")
    ax.set_ylabel("test-task loss  N'‖M* − M̂‖²_F")
    ax.set_title("after LoRA finetuning (rank 3k at T=2, else k); d=10, k=1;\n"
                 "mean and min–max over seeds", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
