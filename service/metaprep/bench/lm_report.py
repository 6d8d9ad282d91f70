"""What an LM-suite run reports: result rows, paired differences, the issue's targets, curves.

* **Metrics**: ``perplexity`` = exp(mean query NLL of the target tokens) per task after adaptation;
  ``steps_to_match`` = the first adaptation step at which a method's query loss on a task is at or
  below ``finetune``'s final query loss on the same task and seed (0 = already before adapting;
  ``adapt_steps + 1`` = not reached within the budget, a censored value); a suite's hook adds its
  own per-task metrics (summarization: ROUGE-1/2/L; convai2_mc: accuracy). Every row is the mean
  and 95 % t-interval over test tasks x seeds (:func:`~metaprep.bench.report.result`).
* **Paired differences** against ``multitask`` on the same (fold, seed, task), the test of
  "method below reference" (:func:`paired_differences`).

Input: the records of :func:`metaprep.bench.harness.run_folds`. No torch here (``jobs.compare``
and ``jobs.readme_results`` read stored runs).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from metaprep.bench.report import mean_ci95, mean_or_nan, result
from metaprep.jsonio import is_finite_number

if TYPE_CHECKING:
    from metaprep.bench.protocol import Protocol

# Targets of issue 8 (paper anchors in DESIGN.md §1.1): mltd perplexity <= ratio x finetune's and below
# multitask's; mltd needs <= 1/3 of finetune's adaptation steps to reach finetune's final query loss.
PPL_RATIO_TARGET = {"persona": 0.85, "multidomain": 0.75}
STEPS_RATIO_TARGET = 1 / 3
MC_GAP_TARGET = 0.04  # convai2_mc: meta_lora accuracy >= multitask + 0.04 (paper: 0.458 vs 0.415)


def model_label(model_path: str) -> str:
    name = Path(model_path.split(":", 1)[-1]).name
    known = {"smollm2": "SmolLM2-135M", "all-minilm-l6-v2": "all-MiniLM-L6-v2"}
    return next((label for key, label in known.items() if key in model_path.lower()), name)


def steps_to_match(curve: list[float], target: float, rel_tol: float = 1e-6) -> int:
    """First step whose loss is <= ``target`` (0 = before adapting); ``len(curve)`` if never (censored)."""
    for step, loss in enumerate(curve):
        if loss <= target + rel_tol * abs(target):
            return step
    return len(curve)


def per_task_steps(records: list[dict]) -> dict[int, list[int]]:
    """steps_to_match of every (record index) per task, against finetune of the same fold and seed."""
    ref = {(r["fold"], r["seed"]): r for r in records if r["method"] == "finetune"}
    out = {}
    for i, r in enumerate(records):
        base = ref.get((r["fold"], r["seed"]))
        if base is None:
            continue
        targets = base["curve"][-1]
        out[i] = [steps_to_match([step[t] for step in r["curve"]], targets[t]) for t in range(len(targets))]
    return out


def aggregate(records: list[dict], proto: Protocol, extra_metrics: tuple[str, ...] = (),
              **setting) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Result rows (per method x metric over tasks x seeds) and a {method: {metric: mean}} summary."""
    steps = per_task_steps(records)
    rows, summary = [], {}
    for method in proto.methods:
        idx = [i for i, r in enumerate(records) if r["method"] == method]
        if not idx:
            continue
        values = {"perplexity": [math.exp(min(v, 50.0)) for i in idx for v in records[i]["curve"][-1]],
                  "query_loss": [v for i in idx for v in records[i]["curve"][-1]],
                  "steps_to_match": [float(s) for i in idx for s in steps.get(i, [])]}
        for metric in extra_metrics:
            values[metric] = [v for i in idx for v in records[i]["extras"].get(metric, [])]
        summary[method] = {}
        for metric in (*extra_metrics, "perplexity", "query_loss", "steps_to_match"):
            if values[metric]:
                rows.append(result(method, metric, values[metric], **setting))
                summary[method][metric] = rows[-1]["mean"]
    return rows, summary


def _paired(values: dict[tuple, float], reference: str) -> dict[str, tuple[float, float, int]]:
    """``values`` keyed by (method, fold, seed, task): per method, mean and 95 % CI of the difference
    to ``reference`` on the same (fold, seed, task), and the number of pairs (>= 2)."""
    out = {}
    for method in dict.fromkeys(k[0] for k in values):
        diffs = [values[(method, *k[1:])] - v for k, v in values.items()
                 if k[0] == reference and method != reference and (method, *k[1:]) in values]
        if len(diffs) >= 2:
            out[method] = (*mean_ci95(diffs), len(diffs))
    return out


RUN_FIELDS = ("method: str, fold: str, seed: int, tasks: [task names], curve: [per adaptation step: [query loss "
              "per task]]")


def run_record_problem(record: object) -> str | None:
    """What makes ``record`` unusable by :func:`paired_differences` (``None`` when it is fine): a stored run must
    have :data:`RUN_FIELDS`, every curve step one finite loss per task."""
    if not isinstance(record, dict):
        return f"must be an object with {RUN_FIELDS}"
    for key, types in (("method", str), ("fold", (str, int)), ("seed", (str, int)), ("tasks", list), ("curve", list)):
        if key not in record:
            return f"missing field {key!r} ({RUN_FIELDS})"
        if not isinstance(record[key], types) or isinstance(record[key], bool):
            return f"field {key!r} is {type(record[key]).__name__}; expected {RUN_FIELDS}"
    tasks, curve = record["tasks"], record["curve"]
    if not tasks or not all(isinstance(t, str) for t in tasks):
        return "field 'tasks' must be a non-empty list of task names"
    if not curve:
        return "field 'curve' is empty; expected per adaptation step a list of query losses, one per task"
    for step, losses in enumerate(curve):
        if not isinstance(losses, list) or len(losses) != len(tasks):
            return f"curve[{step}] must be a list of {len(tasks)} query losses (one per task)"
        bad = next((i for i, v in enumerate(losses) if not is_finite_number(v)), None)
        if bad is not None:
            return f"curve[{step}][{bad}] is {losses[bad]!r}; query losses must be finite numbers"
    return None



def paired_differences(records: list[dict], reference: str = "multitask") -> dict[str, dict[str, float]]:
    """Per method: final query loss minus ``reference``'s on the same (fold, seed, task), mean and 95 % CI.

    Pairing removes the task-to-task spread that dominates the per-method intervals, so this is
    the test of "method below reference" (negative = better than the reference). Also reported
    before adaptation (step 0), which separates what meta-training put into the initialisation
    from what the adaptation steps added.
    """
    def at(step: int) -> dict[tuple, float]:
        return {(r["method"], r["fold"], r["seed"], task): r["curve"][step][i]
                for r in records for i, task in enumerate(r["tasks"])}

    after, before = _paired(at(-1), reference), _paired(at(0), reference)
    return {m: {"after": a[0], "after_ci95": a[1], "before": before[m][0], "before_ci95": before[m][1], "n": a[2]}
            for m, a in after.items()}


def paired_val_differences(records: list[dict], reference: str = "multitask") -> dict[str, dict[str, float]]:
    """Per method: meta-val query loss after adaptation minus ``reference``'s on the same (fold, seed,
    meta-val task), mean and 95 % CI: the numbers settings are chosen on (never the test tasks)."""
    values = {(r["method"], r["fold"], r["seed"], task): v for r in records
              for task, v in zip(r.get("val_tasks", []), r.get("val_query_loss", []), strict=False)}
    return {m: {"mean": mean, "ci95": ci, "n": n} for m, (mean, ci, n) in _paired(values, reference).items()}


def compute(records: list[dict]) -> dict[str, dict[str, float]]:
    """Meta-training cost per method, mean over (fold, seed): wall and CPU seconds, so methods can be
    compared at equal compute as well as at equal meta-steps."""
    out: dict[str, dict[str, float]] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == method]
        out[method] = {"meta_train_s": round(mean_or_nan([r["meta_train_s"] for r in rs]), 2),
                       "cpu_s": round(mean_or_nan([r["cpu_s"] for r in rs]), 2), "runs": len(rs)}
    return out


def tams_diversity(records: list[dict]) -> dict[str, dict]:
    """Per TAMS method, over its test tasks: how many distinct architectures the controller picks and the
    entropy (bits) of each edge's op choice across tasks, per seed (one controller each), then the mean
    over seeds. Collapse to one architecture (the known weakness of MLtD's controller) shows as 1
    distinct architecture and all-zero entropies."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        by_seed: dict[int, list[tuple[int, ...]]] = {}
        for r in records:
            if r["method"] == method:
                by_seed.setdefault(r["seed"], []).extend(tuple(a) for a in r["extras"].get("architecture", []))
        by_seed = {seed: archs for seed, archs in by_seed.items() if archs}
        if not by_seed:
            continue
        entropies = [[_entropy_bits([a[edge] for a in archs]) for edge in range(len(archs[0]))]
                     for archs in by_seed.values()]
        edges = [mean_or_nan([e[i] for e in entropies]) for i in range(len(entropies[0]))]
        out[method] = {"distinct_architectures": mean_or_nan([len(set(a)) for a in by_seed.values()]),
                       "tasks_per_seed": mean_or_nan([len(a) for a in by_seed.values()]),
                       "edge_entropy_bits": [round(e, 4) for e in edges], "mean_edge_entropy_bits": mean_or_nan(edges)}
    return out


def _entropy_bits(choices: list[int]) -> float:
    counts = [choices.count(c) for c in set(choices)]
    return max(0.0, -sum(c / len(choices) * math.log2(c / len(choices)) for c in counts))


def paired_extra_differences(records: list[dict], metric: str, reference: str = "multitask") -> dict[str, dict]:
    """Per method: a per-task extra metric (e.g. ``accuracy``) minus ``reference``'s on the same
    (fold, seed, task), mean and 95 % CI (positive = higher than the reference)."""
    values = {(r["method"], r["fold"], r["seed"], task): v
              for r in records for task, v in zip(r["tasks"], r["extras"].get(metric, []), strict=False)}
    return {m: {"mean": mean, "ci95": ci, "n": n} for m, (mean, ci, n) in _paired(values, reference).items()}


def mean_curves(records: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Mean query loss per adaptation step, per fold and method (over tasks and seeds)."""
    out: dict[str, dict[str, list[float]]] = {}
    for fold in dict.fromkeys(r["fold"] for r in records):
        for method in dict.fromkeys(r["method"] for r in records):
            rs = [r for r in records if r["fold"] == fold and r["method"] == method]
            if rs:
                steps = len(rs[0]["curve"])
                out.setdefault(fold, {})[method] = [mean_or_nan([v for r in rs for v in r["curve"][s]])
                                                    for s in range(steps)]
    return out


def check_targets(suite: str, summary: dict[str, dict[str, float]]) -> dict:
    """Issue 8's targets against the measured means (missing methods are reported as not evaluated)."""
    out: dict = {}

    def get(method: str, metric: str) -> float | None:
        return summary.get(method, {}).get(metric)

    ft_ppl, mltd_ppl, mt_ppl = get("finetune", "perplexity"), get("mltd", "perplexity"), get("multitask", "perplexity")
    if suite in PPL_RATIO_TARGET and ft_ppl and mltd_ppl:
        ratio = mltd_ppl / ft_ppl
        out["mltd_vs_finetune_ppl"] = {"ratio": ratio, "target": PPL_RATIO_TARGET[suite],
                                       "met": ratio <= PPL_RATIO_TARGET[suite]}
        if mt_ppl:
            out["mltd_below_multitask_ppl"] = {"mltd": mltd_ppl, "multitask": mt_ppl, "met": mltd_ppl < mt_ppl}
    if suite == "summarization" and get("mltd", "rougeL") is not None and get("finetune", "rougeL") is not None:
        out["mltd_above_finetune_rouge"] = {
            m: {"mltd": get("mltd", m), "finetune": get("finetune", m), "met": get("mltd", m) > get("finetune", m)}
            for m in ("rouge1", "rouge2", "rougeL")}
    if suite == "convai2_mc" and get("meta_lora", "accuracy") is not None and get("multitask", "accuracy") is not None:
        gap = get("meta_lora", "accuracy") - get("multitask", "accuracy")
        out["meta_lora_vs_multitask_accuracy"] = {"meta_lora": get("meta_lora", "accuracy"),
                                                  "multitask": get("multitask", "accuracy"), "gap": gap,
                                                  "target": MC_GAP_TARGET, "met": gap >= MC_GAP_TARGET}
    ft_steps, mltd_steps = get("finetune", "steps_to_match"), get("mltd", "steps_to_match")
    if ft_steps is not None and mltd_steps is not None:
        out["mltd_steps_to_match"] = {"mltd": mltd_steps, "finetune": ft_steps,
                                      "ratio": mltd_steps / ft_steps if ft_steps else float("nan"),
                                      "target": STEPS_RATIO_TARGET,
                                      "met": mltd_steps <= STEPS_RATIO_TARGET * ft_steps}
    return out


def plot_curves(curves: dict[str, dict[str, list[float]]], path: Path, title: str) -> Path:
    """Adaptation curves: mean query loss vs adaptation step, one line per method, one panel per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folds = list(curves)
    fig, axes = plt.subplots(1, len(folds), figsize=(5.2 * len(folds), 3.8), squeeze=False)
    for ax, fold in zip(axes[0], folds, strict=True):
        for method, values in curves[fold].items():
            ax.plot(range(len(values)), values, marker="o", markersize=3, label=method,
                    linestyle="--" if method == "finetune" else "-")
        ax.set_xlabel("adaptation step")
        ax.set_ylabel("query loss (nats/token)")
        ax.set_title(fold if len(folds) > 1 else title, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    if len(folds) > 1:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(suite: str, records: list[dict], proto: Protocol, model_path: str, args: argparse.Namespace,
                 extra_metrics: tuple[str, ...] = (), **extra) -> dict:
    label = model_label(model_path)
    rows, summary = aggregate(records, proto, extra_metrics, model=label, shots=proto.shots,
                              steps=proto.adapt_steps)
    curves = mean_curves(records)
    timing: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for r in records:
        timing[r["method"]] = timing.get(r["method"], 0.0) + r["meta_train_s"] + r["tune_s"] + r["eval_s"]
        cpu[r["method"]] = cpu.get(r["method"], 0.0) + r["cpu_s"]
    report = {"results": rows, "summary": summary, "targets": check_targets(suite, summary),
              "paired_vs_multitask": paired_differences(records),
              "paired_val_vs_multitask": paired_val_differences(records),
              "meta_train_cost": compute(records),
              "tams_diversity": tams_diversity(records),
              "paired_extras_vs_multitask": {m: paired_extra_differences(records, m) for m in extra_metrics},
              "curves": curves,
              "lr_choice": {f"{r['fold']}/{r['method']}": {"lr": r["lr"], "val": r["val_scores"]}
                            for r in records if r["seed"] == 0},
              "timing_s": {k: round(v, 1) for k, v in timing.items()},
              "cpu_s": {k: round(v, 1) for k, v in cpu.items()},
              "protocol": {**asdict(proto), "model": label, "model_path": model_path,
                           "quick": bool(getattr(args, "quick", False))},
              "runs": records, **extra}
    out = getattr(args, "out", None)
    if out:
        path = Path(out).with_name(Path(out).stem + "_curves.png")
        report["plots"] = [str(plot_curves(curves, path, f"{suite} ({label}): query loss during adaptation"))]
    return report
