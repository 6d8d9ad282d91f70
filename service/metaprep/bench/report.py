"""Result rows, confidence intervals and the markdown table every suite writes."""

from __future__ import annotations

import math
import statistics
from typing import Any

# two-sided 95 % Student-t quantiles for small n (df = n - 1); normal beyond the table
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    if df <= 0:
        return float("nan")
    keys = [k for k in sorted(_T95) if k <= df]
    return _T95[keys[-1]] if df <= 30 else 1.96


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95 % t-interval (nan half-width for n = 1)."""
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def mean_or_nan(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def result(method: str, metric: str, values: list[float], **setting: Any) -> dict:
    """One row of the ``results`` list: mean, ci95 and n over tasks x seeds."""
    mean, ci = mean_ci95(values)
    return {"method": method, "metric": metric, "mean": mean, "ci95": ci, "n": len(values),
            "setting": setting}


def markdown_table(report: dict) -> str:
    """A markdown table of a suite's results (what the README results section embeds)."""
    rows = report.get("results", [])
    setting_keys = sorted({k for r in rows for k in r.get("setting", {})})
    head = ["method", "metric", "mean", "ci95", "n", *setting_keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["metric"], _fmt(r["mean"]), _fmt(r["ci95"]), str(r["n"])]
        cells += [str(r.get("setting", {}).get(k, "")) for k in setting_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x: float) -> str:
    if x != x:
        return "–"
    return f"{x:.4g}"
