"""Regenerate RESULTS.md, the README's summary of it, and CONFIG.md: ``python -m jobs.readme_results``.

Each ``results/*.json`` written by ``jobs.benchmark`` contributes to ``RESULTS.md`` its markdown table
(the ``.md`` next to it), its runtime and the command recorded in ``results/COMMANDS.md``, and one row
(headline metric per method, targets met) to the README's summary table; nothing is typed by hand.
Lines ``- compare: `A.json:METHOD B.json:METHOD``` in that file add a table of paired comparisons
across runs, computed here by :func:`jobs.compare.compare`. ``results/READING.md`` (written by people:
what the numbers mean) opens ``RESULTS.md``. ``CONFIG.md`` lists every recipe key from the config dataclasses.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from jobs._cli import job_parser

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
RESULTS, READING, CONFIG = ROOT / "RESULTS.md", ROOT / "results" / "READING.md", ROOT / "CONFIG.md"
HEADLINE_METRIC = {"throughput": "tasks_per_s"}  # suites whose first metric is a machine probe
SUMMARY_METHODS = 6  # methods shown per row of the README's summary (RESULTS.md has them all)


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
    from jobs.compare import HEADER, compare, markdown_row, side_label
    from metaprep.errors import MetaprepError

    lines = [HEADER]
    for a, b in pairs:
        try:
            out = compare(str(ROOT / a), str(ROOT / b))
        except MetaprepError as exc:
            raise SystemExit(f"error: results/COMMANDS.md: compare {a} {b}: {exc}") from None
        lines.append(markdown_row(out, lambda side: f"`{Path(side['file']).stem}` {side_label(side)}"))
    return ("#### Paired comparisons across runs (`python -m jobs.compare A.json:METHOD B.json:METHOD`)\n\n"
            "Same fold, seed and test task; negative = A has the lower query loss; 95 % t-interval.\n\n"
            + "\n".join(lines) + "\n")


def _num(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def reports() -> list[tuple[Path, dict]]:
    """Every benchmark output in ``results/`` (files without ``suite`` and ``results`` are not reports)."""
    found = []
    for path in sorted((ROOT / "results").glob("*.json")):
        report = json.loads(path.read_text())
        if "suite" in report and "results" in report:
            found.append((path, report))
    return found


def section() -> str:
    """RESULTS.md's per-file sections: command, the suite's table, targets, paired and cost tables."""
    parts, cmds = [], commands()
    for path, report in reports():
        summary_md = path.with_name(f"{path.stem}_summary.md")  # suites with a condensed table (throughput)
        md = summary_md if summary_md.exists() else path.with_suffix(".md")
        table = md.read_text() if md.exists() else ""
        if table.startswith("### "):  # the suite's own heading; RESULTS.md has its own
            table = table.split("\n", 1)[-1]
        cmd = cmds.get(path.name, f"python -m jobs.benchmark --suite {report['suite']} --out results/{path.name}")
        parts.append(f"### {path.stem}\n\nSuite `{report['suite']}`, {report['runtime_s']} s.\n\n"
                     f"```\n{cmd}\n```\n\n{table.strip()}\n{targets(report)}{paired(report)}{meta_val_and_cost(report)}")
    if not parts:
        return "_No benchmark outputs yet._\n"
    extra = comparisons()
    return "\n".join(parts) + (f"\n{extra}" if extra else "")


def headline(report: dict) -> tuple[str, str]:
    """(metric, "method value · ...") of a report: its first metric (``tasks_per_s`` for throughput), one
    value per method; where a method has several settings (throughput), the range over them."""
    rows = [r for r in report["results"] if isinstance(r, dict) and {"method", "metric", "mean"} <= r.keys()]
    if not rows:
        return "-", "-"
    metric = HEADLINE_METRIC.get(report["suite"], rows[0]["metric"])
    values: dict[str, list[float]] = {}
    for r in rows:
        if r["metric"] == metric:
            values.setdefault(r["method"], []).append(r["mean"])
    shown = [f"{m} {_num(v[0])}" if len(v) == 1 else f"{m} {_num(min(v))}..{_num(max(v))}"
             for m, v in list(values.items())[:SUMMARY_METHODS]]
    more = len(values) - len(shown)
    return metric, " · ".join(shown) + (f" (+{more} more)" if more > 0 else "")


def summary() -> str:
    """The README's results table: one row per result file, linking to its section in RESULTS.md."""
    lines = ["| result | suite | metric | per method (mean) | targets met |", "|---|---|---|---|---|"]
    for path, report in reports():
        metric, values = headline(report)
        found = [t for t in (report.get("targets") or {}).values() if isinstance(t, dict) and "met" in t]
        met = f"{sum(bool(t['met']) for t in found)} / {len(found)}" if found else "-"
        lines.append(f"| [{path.stem}](RESULTS.md#{path.stem}) | {report['suite']} | {metric} | {values} | {met} |")
    return "\n".join(lines) + "\n"


def results_md() -> str:
    """The whole of RESULTS.md."""
    reading = READING.read_text().strip() + "\n\n" if READING.exists() else ""
    return ("# Results\n\n_Generated by `python -m jobs.readme_results` from `results/*.json`, `results/COMMANDS.md` "
            "and `results/READING.md`; do not edit by hand._\n\n" + reading + "## Result files\n\n" + section())


def config_md() -> str:
    """The whole of CONFIG.md: every recipe key (``metaprep.config.config_keys``) in a table per section."""
    from metaprep.config import config_keys

    def cell(text: object) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    out = ["# Config reference\n\n_Generated by `python -m jobs.readme_results` from the recipe dataclasses in "
           "`service/metaprep/config.py`; do not edit by hand. The same list: `python -m jobs.meta_train "
           "--help-config`._\n\nSet a key in a YAML recipe (`jobs/configs/*.yaml`, nested by section) or on the "
           "command line with `--set KEY=VALUE` (dotted). Every value is type-checked and range-checked on load "
           "(`service/metaprep/config_bounds.py`: lower bounds, size caps and a memory estimate against this "
           "machine); an error names the file:line or the `--set` flag, the key and what is valid. The `sweep:` "
           "section of a sweep recipe is described in `service/metaprep/tune/space.py`.\n"]
    header = "| key | type | default | valid values | meaning |\n|---|---|---|---|---|"
    rows: list[str] = [f"## (top level)\n\n{header}"]
    for k in config_keys():
        if k.section:
            rows.append(f"\n## `{k.key}`\n\n{cell(k.help)}\n\n{header}")
            continue
        valid = ", ".join(f"`{c}`" for c in k.choices)
        rows.append(f"| `{k.key}` | {cell(k.type)} | `{k.default!r}` | {valid} | {cell(k.help)} |")
    return "\n".join(out + rows) + "\n"


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
    readme.write_text(f"{head}{BEGIN}\n{summary()}{END}{tail}")
    RESULTS.write_text(results_md())
    CONFIG.write_text(config_md())


if __name__ == "__main__":
    main()
