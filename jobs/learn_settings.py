"""Learn how to adapt a prepared model from its own adapt runs (for jobs.adapt --settings recommended).

``python -m jobs.learn_settings --base models:/NAME-base@champion`` (or an exported folder) adapts the model to up
to ``--max-tasks`` of its own meta-train and meta-val tasks (the recipe's split, or ``--tasks FILE.jsonl``) from
each ``--shots`` support size under every (lr, optimizer, steps) of the grid, logs every run to the MLflow
experiment ``metaprep-adapt-transfer`` (tag ``prepared_model=NAME-base/VERSION``), fits the configuration surrogate
on the runs MLflow gives back, cross-validates it over the tasks against the best fixed setting, and registers the
result as ``NAME-base-settings`` (tags ``base_model``, ``base_version``): what ``python -m jobs.adapt --base ...
--settings recommended`` uses for a new task. A folder base ``X/base`` saves it to ``X/settings``. Prints a line per
(support size, lr, optimizer) with the ETA, then the summary JSON.
"""

from __future__ import annotations

import argparse
import json

from jobs._cli import job_parser, run_main, write_summary
from metaprep.transfer.adapt_settings import LR_FACTORS, OPTIMIZERS, SHOTS, STEPS


def _csv(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("python -m jobs.learn_settings", __doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="models:/NAME-base@ALIAS, models:/NAME-base/VERSION or a folder")
    p.add_argument("--controller", help="the controller prepared with --base (default: found as jobs.adapt does)")
    p.add_argument("--tasks", help="JSONL file (or folder of *.jsonl) of tasks to learn from (default: the "
                                   "recipe's meta-train + meta-val tasks)")
    p.add_argument("--data-dir", help="the recipe's data root, without --tasks (default: the recipe's, "
                                      "$METAPREP_DATA_DIR, ../shared/data)")
    p.add_argument("--max-tasks", type=int, default=20, help="tasks to adapt to (a seeded sample)")
    p.add_argument("--shots", default=_csv(SHOTS), help="support sizes, comma-separated")
    p.add_argument("--steps", default=_csv(STEPS), help="adaptation step counts, comma-separated")
    p.add_argument("--lrs", help="adaptation learning rates, comma-separated (default: the recipe's inner lr x "
                                 f"{_csv(LR_FACTORS)})")
    p.add_argument("--optimizers", default=_csv(OPTIMIZERS), help=f"adaptation optimizers, comma-separated "
                                                                  f"({', '.join(OPTIMIZERS)})")
    p.add_argument("--query-size", type=int, default=8, help="query examples per task")
    p.add_argument("--seed", type=int, default=0, help="seed of the task sample, the episodes and the surrogate")
    p.add_argument("--out", help="also save the settings model here (default for a folder base: X/settings)")
    p.add_argument("--overwrite", action="store_true", help="replace a settings model already in the folder")
    p.add_argument("--register", metavar="NAME", help="registered name (default NAME-base-settings for a "
                                                      "registered base; a folder base registers only with it)")
    p.add_argument("--summary-out", help="write the summary JSON here")
    p.add_argument("--no-mlflow", action="store_true", help="fit on the runs in memory; log and register nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from metaprep.train.learn_settings import learn_settings
    from metaprep.transfer.adapt_settings import parse_floats

    summary = learn_settings(
        args.base, args.controller, tasks=args.tasks, data_dir=args.data_dir, max_tasks=args.max_tasks,
        shots=tuple(parse_floats(args.shots, "--shots", integer=True)),
        steps=tuple(parse_floats(args.steps, "--steps", integer=True)),
        lrs=tuple(parse_floats(args.lrs, "--lrs")) if args.lrs else None,
        optimizers=tuple(o.strip() for o in args.optimizers.split(",") if o.strip()),
        query_size=args.query_size, seed=args.seed, out=args.out, overwrite=args.overwrite, register=args.register,
        log_mlflow=not args.no_mlflow)
    write_summary(args.summary_out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "grid"}, indent=1))
    return 0


if __name__ == "__main__":
    run_main(main)
