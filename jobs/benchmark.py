"""Quality and speed benchmarks: ``python -m jobs.benchmark --suite S --out FILE.json [--quick]``.

Suites (DESIGN.md §4): persona, multidomain, convai2_mc, summarization, meta_lora_linear,
config_transfer, throughput, adapt_transfer (adaptation settings learned from a prepared model's own runs).
Writes FILE.json (``suite``, ``runtime_s``, ``results`` rows of
method/metric/mean/ci95/n/setting) and FILE.md (the markdown table), and logs both to MLflow
when a tracking URI is set. Progress, line by line on stdout: the plan (e.g. folds x seeds x methods =
N units), then each unit as it starts and ends, with its time and the ETA (:mod:`metaprep.progress`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from pathlib import Path

from jobs._cli import job_parser, run_main, write_summary
from metaprep.bench import SUITES
from metaprep.bench.journal import journal_identity, journal_path
from metaprep.bench.report import markdown_table
from metaprep.errors import ConfigError
from metaprep.jsonio import check_writable
from metaprep.progress import say


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("python -m jobs.benchmark", __doc__.splitlines()[0])
    p.add_argument("--suite", required=True, help=f"one of {', '.join(SUITES)}")
    p.add_argument("--out", required=True, help="result JSON path (a .md table is written next to it)")
    p.add_argument("--quick", action="store_true", help="reduced run (tests, smoke checks)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds; unset: the suite's own (>= 3)")
    p.add_argument("--methods", default=None,
                   help="LM suites: comma-separated methods to run, including finetune; unset: the suite's")
    p.add_argument("--meta-steps", type=int, default=None,
                   help="LM suites: meta-training steps of every method; unset: the suite's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="LM suites: override a protocol key of the suite's recipe (jobs/configs/bench/*.yaml), e.g. "
                        "--set precision=bf16 --set threads=2 (repeatable)")
    p.add_argument("--data-dir", default=None, help="shared data root; unset: $METAPREP_DATA_DIR, ../shared/data")
    p.add_argument("--model-path", default=None, help="base model path (see model.path); unset: the suite's")
    p.add_argument("--mc-scorer", default=None,
                   help="convai2_mc: encoder (a sentence encoder scores context/candidate pairs; all-MiniLM-L6-v2 "
                        "unless --model-path), lm (the adapted causal LM ranks by likelihood) or auto; unset: auto "
                        "(follows --model-path)")
    p.add_argument("--persona-test-csv", default=None, help="Synthetic-Persona-Chat CSV as the persona test set")
    p.add_argument("--domains-dir", default=None, help="folder of <domain>.jsonl (multidomain; adapt_transfer: its "
                                                       "tasks instead of the persona split)")
    p.add_argument("--test-domains", default=None, help="comma-separated held-out domains (multidomain, "
                                                        "adapt_transfer)")
    p.add_argument("--train-meta", default=None, help="training meta-dataset (config_transfer)")
    p.add_argument("--test-meta", default=None, help="test meta-dataset (config_transfer)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="throughput: cpu (default; the issue's targets) or cuda (the recipe's `gpu` section: one GPU, "
                        "DeepSpeed ZeRO-2, utilisation against the GPU's measured matmul peak)")
    p.add_argument("--resume", action="store_true",
                   help="LM suites: reuse the finished units of an interrupted run with the same --out, suite, "
                        "protocol and tasks (kept in OUT.units.jsonl), or of the finished result OUT; seeds and "
                        "methods may be added")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow even if a URI is set")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.suite not in SUITES:
        raise ConfigError(f"--suite {args.suite!r} is not valid; choose one of {', '.join(SUITES)}")
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if args.meta_steps is not None and args.meta_steps < 1:
        raise ConfigError(f"--meta-steps must be >= 1, got {args.meta_steps}")
    if args.device is not None and args.suite != "throughput":
        raise ConfigError(f"--device: only --suite throughput takes it, got --suite {args.suite}")
    if args.overrides:
        from metaprep.bench.protocol import SUITE_RECIPES

        if args.suite not in SUITE_RECIPES:
            raise ConfigError(f"--set: only the LM suites have protocol keys ({', '.join(SUITE_RECIPES)}); "
                              f"--suite {args.suite} takes none")
    if args.methods is not None:
        from metaprep.bench.protocol import parse_methods

        parse_methods(args.methods)  # before any data is looked for
    for out in (Path(args.out), Path(args.out).with_suffix(".md")):  # before the run, which can take hours
        check_writable(out, "benchmark results", ConfigError)
    log_to_mlflow = bool(os.environ.get("MLFLOW_TRACKING_URI")) and not args.no_mlflow
    if log_to_mlflow:  # a store the results could not be logged to: refused before the run as well
        from metaprep.registry.tracking import reachable_tracking_uri

        reachable_tracking_uri(None)
    module, func = SUITES[args.suite].split(":")
    run = getattr(importlib.import_module(module), func)
    say(args.suite, f"benchmark{' --quick' if args.quick else ''}: results to {args.out}")
    start = time.perf_counter()
    report = run(args)
    report = {"suite": args.suite, "runtime_s": round(time.perf_counter() - start, 2), **report}
    identity = journal_identity(args.out)
    if identity is not None and identity.get("suite") == args.suite:  # --resume extends the result (journal.py)
        report["identity"] = identity
    write_summary(args.out, report)
    journal_path(args.out).unlink(missing_ok=True)  # the result holds every unit now
    table = markdown_table(report)
    md_path = Path(args.out).with_suffix(".md")
    md_path.write_text(f"### {args.suite}\n\n{table}\nruntime: {report['runtime_s']} s\n")
    print(table)
    if log_to_mlflow:
        from metaprep.registry.tracking import log_benchmark

        log_benchmark(report, [Path(args.out), md_path, *map(Path, report.get("plots", []))])
    print(json.dumps({"out": args.out, "runtime_s": report["runtime_s"]}))
    return 0


if __name__ == "__main__":
    run_main(main)
