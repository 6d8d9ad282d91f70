"""Adapt a prepared model from the registry to a new task: ``python -m jobs.adapt --base URI --controller URI
--tasks FILE.jsonl [--task NAME] --shots K --steps N`` (or ``--meta-test``: a held-out task of the recipe's
family and fixed split, e.g. a ConvAI2 persona the model never saw).

Loads ``NAME-base`` and ``NAME-controller`` by URI (``models:/NAME-base@champion``, a version, or a
local exported folder), takes K support examples of the task (JSONL: ``{"task", "text"}`` or
``{"task", "prompt", "target"}``), adapts for N steps and reports query metrics before and after.
Every run is logged to the MLflow experiment ``metaprep-adapt`` (config, task meta-features,
learning curve, cost, adapted fast weights) — the meta-dataset the configuration recommender
learns from.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

from jobs._cli import run_main, write_summary
from metaprep.errors import ConfigError, DataError

ADAPT_EXPERIMENT = "metaprep-adapt"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.adapt", description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="models:/NAME-base@ALIAS, models:/NAME-base/VERSION or a folder")
    p.add_argument("--controller", required=True, help="models:/NAME-controller@ALIAS, .../VERSION or a folder")
    p.add_argument("--tasks", help="JSONL file (or folder of *.jsonl) with the new task's examples")
    p.add_argument("--meta-test", action="store_true",
                   help="instead of --tasks: a held-out meta-test task of the recipe the model was prepared with "
                        "(its task family and fixed split)")
    p.add_argument("--data-dir", help="with --meta-test: the family's data root (default: the recipe's, "
                                      "$METAPREP_DATA_DIR, ../shared/data)")
    p.add_argument("--task", help="task name inside --tasks (required when the file holds several tasks); with "
                                  "--meta-test, default the first meta-test task")
    p.add_argument("--shots", type=int, default=8, help="support examples (k)")
    p.add_argument("--steps", type=int, default=10, help="adaptation steps")
    p.add_argument("--lr", type=float, default=None, help="adaptation learning rate (default: the recipe's inner lr)")
    p.add_argument("--query-size", type=int, default=32, help="max query examples (the rest of the task)")
    p.add_argument("--seed", type=int, default=0, help="seed of the support/query draw")
    p.add_argument("--summary-out", help="write the summary JSON here")
    p.add_argument("--export-merged", metavar="DIR", help="save a merged transformers model (static kinds)")
    p.add_argument("--export-peft", metavar="DIR", help="save a PEFT LoRA adapter (reparam.kind lora)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if (args.tasks is None) == (not args.meta_test):
        raise ConfigError("--tasks / --meta-test: give exactly one (a JSONL file of the new task, or --meta-test for "
                          "a held-out task of the recipe's family)")
    if args.data_dir and not args.meta_test:
        raise ConfigError("--data-dir: only used with --meta-test")
    for name, low in (("shots", 1), ("steps", 1), ("query_size", 1)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= {low}, got {getattr(args, name)}")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise ConfigError(f"--lr: must be a finite number > 0, got {args.lr}")


def pick_task(tasks, name: str | None, source: str):
    names = [t.name for t in tasks]
    if name is None:
        if len(tasks) > 1:
            raise DataError(f"{source}: holds {len(tasks)} tasks; choose one with --task ({', '.join(names[:10])})")
        return tasks[0]
    for t in tasks:
        if t.name == name:
            return t
    raise DataError(f"{source}: no task named {name!r} (available: {', '.join(names[:10])})")


def meta_test_task(cfg, data_dir: str | None, name: str | None) -> tuple:
    """A task of the meta-test split of the recipe ``cfg`` (same family, same fixed split seed)."""
    import dataclasses

    from metaprep.train.loop import load_split

    if data_dir is not None:
        cfg = dataclasses.replace(cfg, tasks=dataclasses.replace(cfg.tasks, data_dir=data_dir))
    split = load_split(cfg)
    source = f"--meta-test (tasks.family={cfg.tasks.family}, split seed {cfg.tasks.split_seed})"
    if not split.test:
        raise DataError(f"{source}: the recipe's meta-test split is empty; pass --tasks FILE")
    return (pick_task(split.test, name, source) if name else split.test[0]), source


def check_size(task, shots: int, source: str):
    if len(task.examples) < shots + 1:
        raise DataError(f"{source}: task {task.name!r} has {len(task.examples)} examples; --shots {shots} "
                        f"needs at least {shots + 1} (support + 1 query)")
    return task


def meta_features(task, support, tokenizer, zero_shot_loss: float) -> dict[str, float]:
    """Cheap, model-aware descriptors of the task (inputs of the configuration recommender)."""
    lengths = [len(tokenizer.encode(e.prompt + e.target)) for e in task.examples]
    return {"n_examples": float(len(task.examples)), "mean_tokens": sum(lengths) / len(lengths),
            "prompt_fraction": sum(len(e.prompt) for e in task.examples) /
            max(1, sum(len(e.prompt) + len(e.target) for e in task.examples)),
            "zero_shot_loss": zero_shot_loss, "shots": float(support.input_ids.shape[1])}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    t0 = time.perf_counter()
    from metaprep.registry.artifacts import load_prepared
    from metaprep.registry.resolve import resolve_artifact
    from metaprep.tasks.base import Episode, make_batch
    from metaprep.tasks.jsonl import load_jsonl_tasks

    if args.tasks is not None:  # the user's task is read before any model is loaded: bad input fails fast
        task = check_size(pick_task(load_jsonl_tasks(args.tasks), args.task, args.tasks), args.shots, args.tasks)
    base_dir = resolve_artifact(args.base, None)
    ctrl_dir = resolve_artifact(args.controller, None)
    model, loaded, cfg = load_prepared(base_dir, ctrl_dir)
    if args.meta_test:
        task, source = meta_test_task(cfg, args.data_dir, args.task)
        task = check_size(task, args.shots, source)
    lr = args.lr if args.lr is not None else cfg.meta.inner_lr

    rng = random.Random(args.seed)
    idx = rng.sample(range(len(task.examples)), len(task.examples))
    support_ex = [task.examples[i] for i in idx[: args.shots]]
    query_ex = [task.examples[i] for i in idx[args.shots: args.shots + args.query_size]]
    episode = Episode(task.name, support_ex, query_ex)
    seq_len = cfg.tasks.seq_len
    support = make_batch([episode], "support", loaded.tokenizer, seq_len)
    query = make_batch([episode], "query", loaded.tokenizer, seq_len)

    from metaprep.meta.adapt import adapt
    from metaprep.search.controller import describe_architecture

    result = adapt(model, support, query, args.steps, lr, cfg.meta.inner_optimizer)
    curve = [c[0] for c in result.curve]
    if not all(math.isfinite(c) for c in curve):
        raise DataError(f"adaptation diverged (query loss {curve[-1]}) at --lr {lr}; use a smaller --lr")
    wall = time.perf_counter() - t0
    summary = {
        "task": task.name, "shots": args.shots, "steps": args.steps, "lr": lr, "n_query": len(query_ex),
        "query_loss_before": curve[0], "query_loss_after": curve[-1],
        "perplexity_before": math.exp(min(curve[0], 50)), "perplexity_after": math.exp(min(curve[-1], 50)),
        "curve": curve, "wall_s": round(wall, 3), "algorithm": cfg.algorithm, "reparam": cfg.reparam.kind,
        "base": args.base, "controller": args.controller,
    }
    if result.arch is not None:
        summary["architecture"] = describe_architecture(result.arch, cfg.search.ops)[0]
    from metaprep.registry.export import export_merged, export_peft

    if args.export_merged:
        from metaprep.registry.artifacts import save_tokenizer

        export_merged(model, result.fast, 0, Path(args.export_merged),
                      lambda out: save_tokenizer(loaded.tokenizer, out))
        summary["export_merged"] = args.export_merged
    if args.export_peft:
        export_peft(model, result.fast, 0, Path(args.export_peft), args.base)
        summary["export_peft"] = args.export_peft
    if not args.no_mlflow:
        summary["mlflow_run_id"] = _log_run(args, cfg, task, support, loaded.tokenizer, result, summary, lr)
    write_summary(args.summary_out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, indent=1))
    return 0


def _log_run(args, cfg, task, support, tokenizer, result, summary: dict, lr: float) -> str:
    import mlflow

    from metaprep.registry.export import save_fast_weights
    from metaprep.registry.tracking import check_reachable, tracking_uri

    uri = tracking_uri(None)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(ADAPT_EXPERIMENT)
    with mlflow.start_run(run_name=f"adapt-{task.name}"[:200]) as run:
        mlflow.log_params({"config.lr": lr, "config.steps": args.steps, "config.shots": args.shots,
                           "config.rank": cfg.reparam.rank, "config.reparam": cfg.reparam.kind,
                           "config.algorithm": cfg.algorithm, "config.inner_optimizer": cfg.meta.inner_optimizer,
                           "base": args.base, "controller": args.controller, "task": task.name})
        for key, value in meta_features(task, support, tokenizer, summary["query_loss_before"]).items():
            mlflow.log_param(f"meta_feature.{key}", f"{value:.6g}")
        for step, value in enumerate(summary["curve"]):
            mlflow.log_metric("query_loss", value, step=step)
        mlflow.log_metrics({"final_query_loss": summary["query_loss_after"], "cost_s": summary["wall_s"],
                            "query_loss_before": summary["query_loss_before"],
                            "perplexity_after": summary["perplexity_after"]})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "adapted_fast_weights.safetensors"
            save_fast_weights(result.fast, path)
            mlflow.log_artifact(str(path))
            (Path(tmp) / "summary.json").write_text(json.dumps(summary, indent=1))
            mlflow.log_artifact(str(Path(tmp) / "summary.json"))
        return run.info.run_id


if __name__ == "__main__":
    run_main(main)
