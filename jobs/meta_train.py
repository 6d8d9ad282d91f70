"""Meta-train a base model and register it: ``python -m jobs.meta_train --config RECIPE [--set k=v ...]``.

Runs on Ray Train (``distributed.num_workers`` workers, a DeepSpeed engine each), logs params and
per-step metrics to MLflow, registers ``NAME-base`` and ``NAME-controller`` with alias
``candidate``, and writes a summary JSON (``--summary-out``). Submit to a cluster with::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.meta_train --config jobs/configs/tiny.yaml
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs._cli import job_parser, run_main, write_summary
from metaprep.config import MetaTrainConfig, load_config


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("python -m jobs.meta_train", __doc__.splitlines()[0])
    p.add_argument("--config", help="YAML recipe (jobs/configs/*.yaml); required unless --help-config")
    p.add_argument("--help-config", action="store_true",
                   help="print every config key with its type, default, valid values and help, then exit")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set meta.inner_lr=0.01 (repeatable)")
    p.add_argument("--model-path", help="shortcut for --set model.path=PATH")
    p.add_argument("--data-dir", help="shortcut for --set tasks.data_dir=DIR")
    p.add_argument("--summary-out", help="write the run summary JSON here")
    p.add_argument("--resume", metavar="RUN_NAME", help="continue a stopped run from its latest checkpoint")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.help_config:
        from metaprep.config import config_reference

        print("Config keys (set in the YAML recipe or with --set KEY=VALUE):\n" + config_reference())
        return 0
    if not args.config:
        parser.error("--config is required (or --help-config to list the config keys)")
    overrides = list(args.overrides)
    if args.model_path:
        overrides.append(f"model.path={args.model_path}")
    if args.data_dir:
        overrides.append(f"tasks.data_dir={args.data_dir}")
    cfg = load_config(MetaTrainConfig, args.config, overrides)
    for note in cfg.advisories():
        print(f"warning: {note}", file=sys.stderr)
    from metaprep.train.launch import launch_meta_training

    summary = launch_meta_training(cfg, resume=args.resume)
    write_summary(args.summary_out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "meta_val_curve"}, indent=1))
    return 0


if __name__ == "__main__":
    run_main(main)
