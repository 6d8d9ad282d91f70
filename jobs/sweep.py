"""Sweep meta-training hyperparameters on Ray Tune: ``python -m jobs.sweep --config RECIPE [--num-samples N]``.

The search space is the recipe's ``sweep:`` section (see :mod:`metaprep.tune.space`; a recipe without
one, e.g. ``jobs/configs/tiny.yaml``, sweeps log-uniform ``meta.inner_lr`` and ``meta.outer_lr`` and
``meta.inner_steps``). Each trial is one Ray Train run; ASHA stops poor trials on the meta-validation
loss; MLflow gets a parent run with a child run per trial; the best trial is registered with alias
``candidate`` and becomes ``champion`` only if it beats the current one on the same meta-val tasks.
Prints, one plain line each: whether ASHA is on (its rungs) or off and why; progress at every trial's end
and at least every 30 s (trials done by outcome, running, pending, best meta-val loss so far); each
trial's outcome; the plot's path (local and MLflow artifact); the verdict on ``champion`` and why
(``python -m jobs.promote --name NAME`` shows the rule and every version's scores). Writes a summary
JSON (``--summary-out``: n_trials, n_failed, best_config, best_metric, registered_version,
champion_comparison, plot, asha_off_reason, ...). Submit to a cluster with::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.sweep --config jobs/configs/sweep_tiny.yaml
"""

from __future__ import annotations

import argparse
import json
import os

from jobs._cli import job_parser, run_main, write_summary
from metaprep.errors import ConfigError, TrainingDivergedError


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("python -m jobs.sweep", __doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML recipe, optionally with a sweep: section")
    p.add_argument("--num-samples", type=int, help="trials in total (overrides sweep.num_samples)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set meta.meta_steps=20 or --set sweep.searcher=random")
    p.add_argument("--summary-out", help="write the sweep summary JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError(f"--num-samples: must be >= 1, got {args.num_samples}")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # Train-in-Tune; read when Ray Train is imported
    from metaprep.tune.sweep import sweep_recipe

    summary = sweep_recipe(args.config, args.overrides, args.num_samples)
    write_summary(args.summary_out, summary)
    if summary["best_config"] is None:
        raise TrainingDivergedError(
            f"sweep {summary['sweep_name']}: none of the {summary['n_trials']} trials completed with a finite "
            f"{summary['metric']} ({summary['n_diverged']} diverged, {summary['n_errored']} "
            f"failed, {summary['n_early_stopped']} stopped early); lower the learning-rate ranges. "
            f"Nothing was registered.")
    print(json.dumps({k: v for k, v in summary.items() if k != "trials"}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    run_main(main)
