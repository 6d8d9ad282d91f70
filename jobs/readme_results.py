"""Regenerate the README's results section from benchmark outputs: ``python -m jobs.readme_results``.

Each ``results/*.json`` written by ``jobs.benchmark`` contributes its markdown table (the ``.md``
next to it), its runtime and the command recorded in ``results/COMMANDS.md``; nothing is typed by hand.
Lines ``- compare: `A.json:METHOD B.json:METHOD``` in that file add a table of paired comparisons
across runs, computed here by :func:`jobs.compare.compare`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from jobs._cli import job_parser

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def commands() -> dict[str, str]:
    path = ROOT / "results" / "COMMANDS.md"
    if not path.exists():
        return {}
    found = re.findall(r"^- `(?P<file>[^`]+)`: `(?P<cmd>[^`]+)`", path.read_text(), flags=re.M)
    return dict(found)


def targets(report: dict) -> str:
    """The suite's own verdict on its issue targets (``report["targets"]``), one line each."""
    found = report.get("targets")
    if not isinstance(found, dict) or not found:
        return ""
    lines = []
    for name, t in found.items():
        if not isinstance(t, dict) or "met" not in t:
            continue
        values = ", ".join(f"{k} {_num(v)}" for k, v in t.items() if k not in ("met", "explanation"))
        why = f" — {t['explanation']}" if t.get("explanation") else ""
        lines.append(f"- {'met' if t['met'] else '**missed**'}: `{name}` ({values}){why}")
    return "\nTargets:\n\n" + "\n".join(lines) + "\n" if lines else ""


def paired(report: dict) -> str:
    """LM suites: query loss minus multitask's on the same task and seed (computed from the stored runs)."""
    if not isinstance(report.get("runs"), list) or not report["runs"] or "curve" not in report["runs"][0]:
        return ""
    from metaprep.bench.lm_report import paired_differences

    diffs = report.get("paired_vs_multitask") or paired_differences(report["runs"])
    if not diffs:
        return ""
    lines = ["| method | Δ query loss after adaptation | Δ before adaptation | n |", "|---|---|---|---|"]
    for method, d in diffs.items():
        lines.append(f"| {method} | {d['after']:+.4f} ± {d['after_ci95']:.4f} | {d['before']:+.4f} ± "
                     f"{d['before_ci95']:.4f} | {d['n']} |")
    text = ("\nPaired against `multitask` (same fold, seed and task; negative = lower loss than multitask; "
            "95 % t-interval):\n\n" + "\n".join(lines) + "\n")
    return text + paired_extras(report["runs"])


def meta_val_and_cost(report: dict) -> str:
    """LM suites: the meta-val paired differences settings are chosen on, each method's meta-training cost
    (for comparisons at equal compute) and the TAMS controller's diversity, from the stored runs."""
    runs = report.get("runs")
    if not isinstance(runs, list) or not runs or "val_query_loss" not in runs[0]:
        return ""
    from metaprep.bench.lm_report import compute, paired_val_differences, tams_diversity

    val, cost, tams = paired_val_differences(runs), compute(runs), tams_diversity(runs)
    lines = ["| method | Δ meta-val loss vs multitask | meta-train s (wall) | meta-train CPU s | "
             "TAMS: distinct archs / tasks | TAMS: mean edge entropy (bits) |", "|---" * 6 + "|"]
    for method, c in cost.items():
        v = f"{val[method]['mean']:+.4f} ± {val[method]['ci95']:.4f} (n={val[method]['n']})" if method in val else "-"
        t = tams.get(method)
        arch = f"{t['distinct_architectures']:.3g} / {t['tasks_per_seed']:.3g}" if t else "-"
        ent = f"{t['mean_edge_entropy_bits']:.3f}" if t else "-"
        lines.append(f"| {method} | {v} | {c['meta_train_s']:.1f} | {c['cpu_s']:.1f} | {arch} | {ent} |")
    return ("\nMeta-val (where settings are chosen), cost per meta-training run (compare at equal compute as "
            "well as equal steps) and TAMS diversity per seed:\n\n" + "\n".join(lines) + "\n")


def paired_extras(runs: list[dict]) -> str:
    """The suite's per-task extra metrics (accuracy, ROUGE) minus multitask's, from the stored runs."""
    from metaprep.bench.lm_report import paired_extra_differences

    metrics = list(dict.fromkeys(m for r in runs for m, v in (r.get("extras") or {}).items()
                                 if v and isinstance(v[0], (int, float))))  # per-task numbers, not TAMS choices
    tables = {m: paired_extra_differences(runs, m) for m in metrics}
    tables = {m: t for m, t in tables.items() if t}
    if not tables:
        return ""
    lines = ["| method | " + " | ".join(f"Δ {m}" for m in tables) + " | n |", "|---" * (len(tables) + 2) + "|"]
    for method in dict.fromkeys(k for t in tables.values() for k in t):
        cells = [f"{t[method]['mean']:+.4f} ± {t[method]['ci95']:.4f}" if method in t else "-" for t in tables.values()]
        n = next(t[method]["n"] for t in tables.values() if method in t)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {n} |")
    return ("\nPaired against `multitask`, the suite's own metrics (positive = higher than multitask; "
            "95 % t-interval):\n\n" + "\n".join(lines) + "\n")


def comparisons() -> str:
    path = ROOT / "results" / "COMMANDS.md"
    pairs = re.findall(r"^- compare: `(\S+) (\S+)`", path.read_text(), flags=re.M) if path.exists() else []
    if not pairs:
        return ""
    from jobs.compare import HEADER, compare, markdown_row
    from metaprep.errors import MetaprepError

    lines = [HEADER]
    for a, b in pairs:
        try:
            out = compare(str(ROOT / a), str(ROOT / b))
        except MetaprepError as exc:
            raise SystemExit(f"error: results/COMMANDS.md: compare {a} {b}: {exc}") from None
        lines.append(markdown_row(out, lambda side: f"`{Path(side['file']).stem}` {side['method']} @ "
                                                    f"{side['meta_steps']} meta-steps"))
    return ("#### Paired comparisons across runs (`python -m jobs.compare A.json:METHOD B.json:METHOD`)\n\n"
            "Same fold, seed and test task; negative = A has the lower query loss; 95 % t-interval.\n\n"
            + "\n".join(lines) + "\n")


def _num(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def section() -> str:
    parts, cmds = [], commands()
    for path in sorted((ROOT / "results").glob("*.json")):
        report = json.loads(path.read_text())
        if "suite" not in report or "results" not in report:
            continue
        summary_md = path.with_name(f"{path.stem}_summary.md")  # suites with a condensed table (throughput)
        md = summary_md if summary_md.exists() else path.with_suffix(".md")
        table = md.read_text() if md.exists() else ""
        if table.startswith("### "):  # the suite's own heading; the README has its own
            table = table.split("\n", 1)[-1]
        cmd = cmds.get(path.name, f"python -m jobs.benchmark --suite {report['suite']} --out results/{path.name}")
        parts.append(f"#### `{path.stem}` (suite `{report['suite']}`, {report['runtime_s']} s)\n\n"
                     f"```\n{cmd}\n```\n\n{table.strip()}\n{targets(report)}{paired(report)}{meta_val_and_cost(report)}")
    if not parts:
        return "_No benchmark outputs yet._\n"
    extra = comparisons()
    return "\n".join(parts) + (f"\n{extra}" if extra else "")


def build_parser() -> argparse.ArgumentParser:
    return job_parser("python -m jobs.readme_results", __doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> None:
    build_parser().parse_args(argv)
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text:
        raise SystemExit(f"README.md has no {BEGIN} marker")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{BEGIN}\n{section()}{END}{tail}")


if __name__ == "__main__":
    main()
