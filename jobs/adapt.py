"""Adapt a prepared model from the registry to a new task: ``python -m jobs.adapt --base URI [--controller URI]
--tasks FILE.jsonl [--task NAME] --shots K --steps N`` (or ``--meta-test``: a held-out task of the recipe's
family and fixed split, e.g. a ConvAI2 persona the model never saw).

Loads ``NAME-base`` and ``NAME-controller`` by URI (``models:/NAME-base@champion``, a version, or a
local exported folder; the controller defaults to the one prepared with the base), takes K support
examples of the task (JSONL: ``{"task", "text"}`` or ``{"task", "prompt", "target"}``), adapts for N
steps (or, with ``--settings recommended``, the lr, steps and optimizer that the base's settings model
chooses for the task: see ``jobs.learn_settings``) and reports query metrics before and after (a line per
step with its query loss, then the summary JSON). Every run is logged to the MLflow experiment
``metaprep-adapt`` (config, task meta-features, learning curve, cost, adapted fast weights) — the
meta-dataset the configuration recommender learns from. The adapted model can be exported for
transformers (``--export-merged``) or transformers + peft (``--export-peft``), and registered as an MLflow
pyfunc model that ``mlflow models serve`` serves (``--register NAME``); exports and names the model cannot
take are refused before any adaptation.
"""

from __future__ import annotations

import argparse
import json

from jobs._cli import job_parser, run_main, write_summary
from metaprep.transfer.adapt_settings import MODES


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("python -m jobs.adapt", __doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="models:/NAME-base@ALIAS, models:/NAME-base/VERSION or a folder")
    p.add_argument("--controller", help="models:/NAME-controller@ALIAS, .../VERSION or a folder (default: the "
                                        "controller registered by --base's run, or the controller/ folder next to it)")
    p.add_argument("--tasks", help="JSONL file (or folder of *.jsonl) with the new task's examples")
    p.add_argument("--meta-test", action="store_true",
                   help="instead of --tasks: a held-out meta-test task of the recipe the model was prepared with "
                        "(its task family and fixed split)")
    p.add_argument("--data-dir", help="with --meta-test: the family's data root (default: the recipe's, "
                                      "$METAPREP_DATA_DIR, ../shared/data)")
    p.add_argument("--task", help="task name inside --tasks (required when the file holds several tasks); with "
                                  "--meta-test, default the first meta-test task")
    p.add_argument("--shots", type=int, default=8, help="support examples (k)")
    p.add_argument("--steps", type=int, default=None, help="adaptation steps (default 10)")
    p.add_argument("--lr", type=float, default=None, help="adaptation learning rate (default: the recipe's inner lr)")
    p.add_argument("--settings", choices=MODES, default=MODES[0],
                   help="recommended: choose lr, steps and optimizer for this task from the base's settings model "
                        "(learned by python -m jobs.learn_settings) and say why; given: --lr/--steps")
    p.add_argument("--settings-model", help="with --settings recommended: a settings folder or models:/ URI (default: "
                                            "NAME-base-settings registered for --base's version, or X/settings next to "
                                            "a folder base X/base)")
    p.add_argument("--query-size", type=int, default=32, help="max query examples (the rest of the task)")
    p.add_argument("--seed", type=int, default=0, help="seed of the support/query draw")
    p.add_argument("--summary-out", help="write the summary JSON here")
    p.add_argument("--export-merged", metavar="DIR",
                   help="save a merged transformers model + tokenizer (static reparam kinds; not TAMS/mltd)")
    p.add_argument("--export-peft", metavar="DIR",
                   help="save a PEFT LoRA adapter + tokenizer, its base model in DIR/base (reparam.kind lora)")
    p.add_argument("--register", metavar="NAME",
                   help="register the adapted model (any algorithm) as MLflow pyfunc model NAME, served by "
                        "`mlflow models serve -m models:/NAME/VERSION`")
    p.add_argument("--overwrite", action="store_true",
                   help="let --export-merged/--export-peft write into a non-empty folder (same-named files replaced); "
                        "without it such a folder is refused before any work")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from metaprep.train.adapt_task import adapt_registered

    summary = adapt_registered(
        args.base, args.controller, tasks=args.tasks, task=args.task, meta_test=args.meta_test,
        data_dir=args.data_dir, shots=args.shots, steps=args.steps, lr=args.lr, query_size=args.query_size,
        seed=args.seed, settings=args.settings, settings_model=args.settings_model,
        export_merged=args.export_merged, export_peft=args.export_peft, overwrite=args.overwrite,
        register=args.register, log_mlflow=not args.no_mlflow)
    write_summary(args.summary_out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, indent=1))
    return 0


if __name__ == "__main__":
    run_main(main)
