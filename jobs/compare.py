"""Paired comparison of two LM-suite runs: ``python -m jobs.compare A.json:METHOD B.json:METHOD``.

For runs of one suite that differ only in budget (``--meta-steps``), method list or precision
(``--set precision=...``), e.g. MLtD at 160 meta-steps against multitask at 80 (the same number of
outer-loss target tokens: multitask's loss reads support and query, MLtD's only query), or a method
in bf16 against the same method in fp32 (issue 17: bf16 is the default only where it costs no quality).
Pairs the final (and step-0) query loss of each (fold, seed, test task), as
:func:`metaprep.bench.lm_report.paired_differences` does within one run; negative = A better than B.
Refuses runs whose protocols differ in anything else.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs._cli import job_parser, run_main
from metaprep.bench.lm_report import RUN_FIELDS, paired_differences, run_record_problem
from metaprep.bench.protocol import method_override
from metaprep.errors import ConfigError
from metaprep.jsonio import read_json

MAY_DIFFER = ("meta_steps", "methods", "quick", "precision")


def _side(spec: str) -> tuple[Path, str, dict]:
    path, sep, method = spec.rpartition(":")
    if not sep or not path or not method:
        raise ConfigError(f"{spec!r}: expected RESULT.json:METHOD, e.g. results/persona_stories260k.json:mltd")
    report = read_json(Path(path), "result file", ConfigError)
    if not isinstance(report, dict) or "runs" not in report or "protocol" not in report:
        raise ConfigError(f"{path}: not an LM-suite result (no 'runs'/'protocol'); suites: persona, multidomain, "
                          f"summarization, convai2_mc")
    _check_report(report, path, method)
    methods = sorted({r["method"] for r in report["runs"]})
    if method not in methods:
        raise ConfigError(f"{path}: no runs of method {method!r}; it has {', '.join(methods)}")
    return Path(path), method, report


def _check_report(report: dict, path: str, method: str) -> None:
    """The parts of a result file that :func:`compare` reads: ``protocol.meta_steps``, every run's method and the
    fields of ``method``'s runs (:func:`metaprep.bench.lm_report.run_record_problem`)."""
    protocol, runs = report["protocol"], report["runs"]
    if not isinstance(protocol, dict) or isinstance(protocol.get("meta_steps"), bool) \
            or not isinstance(protocol.get("meta_steps"), int):
        raise ConfigError(f"{path}: 'protocol' must be an object with an integer 'meta_steps'")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{path}: 'runs' must be a non-empty list of run records ({RUN_FIELDS})")
    for i, record in enumerate(runs):
        if not isinstance(record, dict) or not isinstance(record.get("method"), str):
            raise ConfigError(f"{path}: runs[{i}]: {run_record_problem(record) or 'method must be a string'}")
        problem = run_record_problem(record) if record["method"] == method else None
        if problem:
            raise ConfigError(f"{path}: runs[{i}] (method {method!r}): {problem}")


def compare(a: str, b: str) -> dict:
    (pa, ma, ra), (pb, mb, rb) = _side(a), _side(b)
    if ra.get("suite") != rb.get("suite"):
        raise ConfigError(f"{pb}: suite {rb.get('suite')!r} differs from {pa}'s {ra.get('suite')!r}")
    differ = sorted(k for k in set(ra["protocol"]) | set(rb["protocol"])
                    if k not in MAY_DIFFER and ra["protocol"].get(k) != rb["protocol"].get(k))
    if differ:
        raise ConfigError(f"{pb}: protocol differs from {pa}'s in {', '.join(differ)} (only "
                          f"{', '.join(MAY_DIFFER)} may differ for a paired comparison)")
    label_a, label_b = f"A:{ma}", f"B:{mb}"
    records = ([{**r, "method": label_a} for r in ra["runs"] if r["method"] == ma]
               + [{**r, "method": label_b} for r in rb["runs"] if r["method"] == mb])
    paired = paired_differences(records, reference=label_b).get(label_a)
    if paired is None:
        raise ConfigError(f"{pa} and {pb}: fewer than 2 (fold, seed, task) pairs in common")
    side = lambda path, method, report: {  # noqa: E731
        "file": str(path), "method": method, "meta_steps": method_meta_steps(method, report["protocol"]["meta_steps"]),
        "precision": report["protocol"].get("precision")}
    return {"a": side(pa, ma, ra), "b": side(pb, mb, rb), **paired}


def method_meta_steps(method: str, protocol_steps: int) -> int:
    """The meta-steps ``method`` ran: its own ``+meta.meta_steps=N`` override (e.g. a compute-matched
    ``multitask+meta.meta_steps=130``), else the protocol's."""
    steps = method_override(method, "meta.meta_steps")
    return protocol_steps if steps is None else int(steps)


HEADER = ("| A | B | A − B query loss after adaptation (95 % CI) | before adaptation | pairs |\n"
          "|---|---|---|---|---|")


def side_label(side: dict) -> str:
    """``method @ N meta-steps``, with the precision where the run recorded one."""
    precision = f", {side['precision']}" if side.get("precision") else ""
    return f"{side['method']} @ {side['meta_steps']} meta-steps{precision}"


def markdown_row(out: dict, name=side_label) -> str:
    """One table row of :func:`compare`'s result; ``name`` labels a side."""
    return (f"| {name(out['a'])} | {name(out['b'])} | {out['after']:+.4f} ± {out['after_ci95']:.4f} | "
            f"{out['before']:+.4f} ± {out['before_ci95']:.4f} | {out['n']} |")


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("python -m jobs.compare", __doc__.splitlines()[0])
    p.add_argument("a", metavar="A.json:METHOD", help="run A: a jobs.benchmark result JSON and one of its methods")
    p.add_argument("b", metavar="B.json:METHOD", help="run B, the reference (negative = A better than B)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = compare(args.a, args.b)
    print(HEADER)
    print(markdown_row(out))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    run_main(main)
