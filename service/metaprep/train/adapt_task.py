"""Adapt a registered prepared model to one new task: what ``jobs.adapt`` runs.

:func:`adapt_registered` loads ``NAME-base`` / ``NAME-controller`` (a ``models:/`` URI or an exported
folder), takes the task from a JSONL file or from the meta-test split of the recipe the model was
prepared with, draws K support examples and a query set (:func:`draw_episode`), adapts for N steps and
returns the summary: query loss and perplexity before and after, the curve and the cost. The run is
logged to MLflow as an adapt run (:mod:`metaprep.registry.adapt_runs`), the recommender's meta-dataset.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from metaprep.errors import ConfigError, DataError
from metaprep.progress import duration, say

DEFAULT_STEPS = 10  # jobs.adapt --steps

if TYPE_CHECKING:  # torch loads only once the arguments are checked
    from metaprep.tasks.base import Episode, Task


def pick_task(tasks: list[Task], name: str | None, source: str) -> Task:
    names = [t.name for t in tasks]
    if name is None:
        if len(tasks) > 1:
            raise DataError(f"{source}: holds {len(tasks)} tasks; choose one with --task ({', '.join(names[:10])})")
        return tasks[0]
    for t in tasks:
        if t.name == name:
            return t
    raise DataError(f"{source}: no task named {name!r} (available: {', '.join(names[:10])})")


def meta_test_task(cfg, data_dir: str | None, name: str | None) -> tuple[Task, str]:
    """A task of the meta-test split of the recipe ``cfg`` (same family, same fixed split seed)."""
    from metaprep.train.loop import load_split

    if data_dir is not None:
        cfg = dataclasses.replace(cfg, tasks=dataclasses.replace(cfg.tasks, data_dir=data_dir))
    split = load_split(cfg)
    source = f"--meta-test (tasks.family={cfg.tasks.family}, split seed {cfg.tasks.split_seed})"
    if not split.test:
        raise DataError(f"{source}: the recipe's meta-test split is empty; pass --tasks FILE")
    return (pick_task(split.test, name, source) if name else split.test[0]), source


def check_size(task: Task, shots: int, source: str) -> Task:
    if len(task.examples) < shots + 1:
        raise DataError(f"{source}: task {task.name!r} has {len(task.examples)} examples; --shots {shots} "
                        f"needs at least {shots + 1} (support + 1 query)")
    return task


def draw_episode(task: Task, shots: int, query_size: int, seed: int) -> Episode:
    """``shots`` support examples and up to ``query_size`` query examples (the rest of the task), drawn
    as one seeded permutation of the task's examples."""
    from metaprep.tasks.base import sample_episode

    episode = sample_episode(task, shots, len(task.examples) - shots, random.Random(seed))
    return dataclasses.replace(episode, query=episode.query[:query_size])


def meta_features(task: Task, support, tokenizer, support_loss: float) -> dict[str, float]:
    """Cheap, model-aware descriptors of the task (inputs of the configuration recommender)."""
    return task_meta_features(task, int(support.input_ids.shape[1]), tokenizer, support_loss)


def task_meta_features(task: Task, shots: int, tokenizer, support_loss: float) -> dict[str, float]:
    """:func:`meta_features` of ``task`` adapted from ``shots`` support examples: its size, example lengths in
    tokens, prompt share, ``shots`` and ``support_loss``, the prepared model's loss on the support examples
    before adapting (:func:`metaprep.meta.adapt.support_losses`; no query example is used, so a setting chosen
    from these never sees the examples it is judged on)."""
    lengths = [len(tokenizer.encode(e.prompt + e.target)) for e in task.examples]
    return {"n_examples": float(len(task.examples)), "mean_tokens": sum(lengths) / len(lengths),
            "prompt_fraction": sum(len(e.prompt) for e in task.examples) /
            max(1, sum(len(e.prompt) + len(e.target) for e in task.examples)),
            "support_loss": support_loss, "shots": float(shots)}


def report_step(steps: int) -> Callable[[int, list[float]], None]:
    """The ``on_step`` of :func:`metaprep.meta.adapt.adapt`: one line per adaptation step, as it is measured
    (step 0: before adapting)."""
    def line(step: int, losses: list[float]) -> None:
        say("adapt", f"step {step}/{steps} query loss {losses[0]:.4f}{' (before adapting)' if step == 0 else ''}")
    return line


def report_curve(curve: list[float], seconds: float) -> None:
    """Query loss and perplexity before -> after adaptation, and the time it took."""
    steps = len(curve) - 1
    say("adapt", f"query loss {curve[0]:.4f} -> {curve[-1]:.4f}, perplexity {math.exp(min(curve[0], 50)):.4g} -> "
                 f"{math.exp(min(curve[-1], 50)):.4g} ({steps} steps in {duration(seconds)})")


def adapt_registered(base: str, controller: str | None = None, *, tasks: str | None = None,
                     task: str | None = None, meta_test: bool = False, data_dir: str | None = None, shots: int = 8,
                     steps: int | None = None, lr: float | None = None, query_size: int = 32, seed: int = 0,
                     settings: str = "given", settings_model: str | None = None,
                     export_merged: str | None = None, export_peft: str | None = None, overwrite: bool = False,
                     register: str | None = None, log_mlflow: bool = True) -> dict:
    """Adapt the prepared model ``base`` + ``controller`` to one task and return the summary.

    ``controller`` defaults to the one prepared with ``base`` (:func:`~metaprep.registry.resolve.
    companion_controller`). The task is ``task`` of the JSONL ``tasks`` (read before any model is loaded: bad
    input fails fast), or with ``meta_test`` a held-out task of the model's own recipe (``data_dir``: its data
    root). ``lr`` defaults to the recipe's inner lr, ``steps`` to 10; ``settings="recommended"`` chooses lr, steps
    and optimizer instead, from the base's settings model (``settings_model``, default: the one
    ``jobs.learn_settings`` registered for this base version, or ``X/settings`` next to a folder base ``X/base``)
    and the task's meta-features. ``export_merged`` / ``export_peft``: folders to save the
    adapted model to, each new or empty unless ``overwrite``, checked before any work (what the model cannot
    export is refused as soon as its spec is read) and written only once the rest has succeeded;
    ``register``: a registered-model name for the adapted model as an MLflow pyfunc model (checked before any
    work); ``log_mlflow``: log the adapt run (``mlflow_run_id`` in the summary). Errors name the ``jobs.adapt``
    flag at fault.
    """
    _check_args(tasks, meta_test, data_dir, shots, steps, query_size, lr)
    _check_settings(settings, settings_model, lr, steps)
    exports = _check_exports({"merged": export_merged, "peft": export_peft}, overwrite)
    tracking = _check_register(register, log_mlflow)
    t0 = time.perf_counter()
    from metaprep.tasks.families import batch_encoder_for
    from metaprep.tasks.jsonl import load_jsonl_tasks

    if tasks is not None:
        picked = check_size(pick_task(load_jsonl_tasks(tasks), task, tasks), shots, tasks)
    model_settings = None
    if settings == "recommended":  # found (or refused) before any weights load
        from metaprep.train.learn_settings import load_settings_for

        model_settings = load_settings_for(base, settings_model)
    say("adapt", f"loading {base} ...")
    model, loaded, cfg, controller = _load_checked(base, controller, exports, register)
    if meta_test:
        picked, source = meta_test_task(cfg, data_dir, task)
        picked = check_size(picked, shots, source)
    _check_family(picked, cfg.tasks.family, tasks or "--meta-test")
    lr = lr if lr is not None else cfg.meta.inner_lr
    steps = steps if steps is not None else DEFAULT_STEPS
    optimizer = cfg.meta.inner_optimizer
    episode = draw_episode(picked, shots, query_size, seed)
    encode = batch_encoder_for(cfg)
    support = encode([episode], "support", loaded.tokenizer, cfg.tasks.seq_len)
    query = encode([episode], "query", loaded.tokenizer, cfg.tasks.seq_len)

    from metaprep.meta.adapt import adapt
    from metaprep.runtime import configure_process
    from metaprep.search.controller import describe_architecture

    # the recipe's worker settings: its thread count (the default of a busy 2-core machine oversubscribes)
    # and its precision
    configure_process(cfg.distributed.torch_threads or cfg.distributed.cpus_per_worker)
    from metaprep.train.step import autocast_dtype

    chosen = None
    if model_settings is not None:
        chosen = recommend_settings(model_settings, model, picked, support, loaded.tokenizer, autocast_dtype(cfg))
        lr, steps, optimizer = chosen["setting"]["lr"], int(chosen["setting"]["steps"]), chosen["setting"]["optimizer"]

    say("adapt", f"task {picked.name}: {shots} support / {len(episode.query)} query examples, {steps} steps at lr "
                 f"{lr:g} with {optimizer} ({cfg.algorithm}, {cfg.reparam.kind}) ...")
    t_adapt = time.perf_counter()
    result = adapt(model, support, query, steps, lr, optimizer, autocast_dtype=autocast_dtype(cfg),
                   on_step=report_step(steps))
    curve = [c[0] for c in result.curve]
    report_curve(curve, time.perf_counter() - t_adapt)
    if not all(math.isfinite(c) for c in curve):
        fix = ("use --settings given with a smaller --lr" if chosen is not None else "use a smaller --lr")
        raise DataError(f"adaptation diverged (query loss {curve[-1]}) at lr {lr:g}; {fix}")
    summary = {
        "task": picked.name, "shots": shots, "steps": steps, "lr": lr, "optimizer": optimizer,
        "n_query": len(episode.query),
        "query_loss_before": curve[0], "query_loss_after": curve[-1],
        "perplexity_before": math.exp(min(curve[0], 50)), "perplexity_after": math.exp(min(curve[-1], 50)),
        "curve": curve, "wall_s": round(time.perf_counter() - t0, 3), "algorithm": cfg.algorithm,
        "reparam": cfg.reparam.kind, "base": base, "controller": controller,
    }
    if chosen is not None:
        summary["settings"] = chosen
    if hasattr(model, "accuracy"):  # a multiple-choice scorer: gold-candidate accuracy on the query set
        with torch.no_grad():
            summary["accuracy_before"] = model.accuracy(query, model.fast_init(1)).item()
            summary["accuracy_after"] = model.accuracy(query, result.fast).item()
    if result.arch is not None:
        summary["architecture"] = describe_architecture(result.arch, cfg.search.ops)[0]
    from metaprep.registry.export import export_merged as save_merged
    from metaprep.registry.export import export_peft as save_peft
    from metaprep.registry.export import staged_exports

    summary.update({f"export_{key}": str(target) for key, target in exports.items()})
    with staged_exports(exports) as (staged, publish):
        if "merged" in staged:
            save_merged(model, result.fast, 0, staged["merged"], loaded.tokenizer)
        if "peft" in staged:
            save_peft(model, result.fast, 0, staged["peft"], loaded.tokenizer, published=exports["peft"])
        if log_mlflow:
            from metaprep.meta.adapt import support_losses

            features = chosen["meta_features"] if chosen is not None else meta_features(
                picked, support, loaded.tokenizer, support_losses(model, support, autocast_dtype(cfg))[0])
            summary["mlflow_run_id"] = _log_run(cfg, picked, features, result.fast, summary)
        if register:
            from metaprep.registry.pyfunc import register_adapted

            tags = {k: str(summary[k]) for k in ("task", "algorithm", "reparam", "base", "controller",
                                                 "query_loss_after", "mlflow_run_id")}
            summary["registered_model"] = register_adapted(tracking, summary["mlflow_run_id"], register, model,
                                                           loaded, cfg, result.fast, result.arch, tags)
        publish()
    return summary


def recommend_settings(found: tuple, model, task: Task, support, tokenizer, dtype) -> dict:
    """``--settings recommended``: the setting that the base's settings model (``found``: the model and where it
    came from, :func:`~metaprep.train.learn_settings.load_settings_for`) chooses for ``task`` from its
    meta-features (no query example among them), printed with the reason; the summary's ``settings``."""
    from metaprep.meta.adapt import support_losses
    from metaprep.transfer.adapt_settings import describe

    model_settings, source = found
    features = meta_features(task, support, tokenizer, support_losses(model, support, dtype)[0])
    setting, why = model_settings.choose(features)
    say("adapt", f"settings from {source}: {describe(setting)}: {why}")
    return {"source": source, "setting": setting, "rule": model_settings.rule, "reason": why,
            "meta_features": features}


def _check_settings(settings: str, settings_model: str | None, lr: float | None, steps: int | None) -> None:
    from metaprep.transfer.adapt_settings import MODES

    if settings not in MODES:
        raise ConfigError(f"--settings {settings!r}: choose from {list(MODES)}")
    if settings == "recommended" and (lr is not None or steps is not None):
        raise ConfigError("--settings recommended chooses --lr and --steps; drop them, or use --settings given")
    if settings_model and settings != "recommended":
        raise ConfigError("--settings-model: only used with --settings recommended")


def _load_checked(base: str, controller: str | None, exports: dict[str, Path], register: str | None):
    """(model, loaded, cfg, controller URI) of the prepared model. The exports and ``register`` it cannot give
    are refused from the controller's spec, before the base is downloaded or any weights load."""
    from metaprep.registry.artifacts import load_prepared, read_base_info, read_spec
    from metaprep.registry.export import check_exportable
    from metaprep.registry.resolve import companion_controller, resolve_artifact

    controller = controller or companion_controller(base, None)
    # a base folder is checked first (a bad --base is named before anything else); a registry base downloads last
    base_dir = None if base.startswith("models:/") else resolve_artifact(base, None)
    if base_dir is not None:
        read_base_info(base_dir)  # a controller given as --base is named as swapped, as loading would
    ctrl_dir = resolve_artifact(controller, None)
    algorithm, kind, family = read_spec(ctrl_dir)
    check_exportable(algorithm, kind, family, merged="merged" in exports, peft="peft" in exports,
                     register=register is not None)
    model, loaded, cfg = load_prepared(base_dir or resolve_artifact(base, None), ctrl_dir)
    return model, loaded, cfg, controller


def _check_register(name: str | None, log_mlflow: bool) -> str | None:
    """The tracking URI to register ``name`` into (checked to answer), or None without ``--register``."""
    if name is None:
        return None
    from metaprep.registry.names import check_model_name
    from metaprep.registry.tracking import reachable_tracking_uri

    check_model_name(name, "--register")
    if not log_mlflow:
        raise ConfigError("--register: the model is logged into the adapt run's MLflow record; drop --no-mlflow")
    return reachable_tracking_uri(None)


def _check_family(task: Task, family: str, source: str) -> None:
    """A multiple-choice scorer adapts on multiple-choice examples, a language model on text."""
    from metaprep.tasks.convai2_mc import ChoiceExample
    from metaprep.tasks.families import ENCODER_FAMILIES

    choice = all(isinstance(e, ChoiceExample) for e in task.examples)
    if family in ENCODER_FAMILIES and not choice:
        raise DataError(f"{source}: the model is a multiple-choice scorer (tasks.family={family}); every line of "
                        f"task {task.name!r} needs 'prompt', 'candidates' and 'label'")
    if family not in ENCODER_FAMILIES and any(isinstance(e, ChoiceExample) for e in task.examples):
        raise DataError(f"{source}: task {task.name!r} has multiple-choice lines ('candidates'), but the model is a "
                        f"language model (tasks.family={family}); give 'text' or 'prompt'/'target' lines")


def _check_args(tasks: str | None, meta_test: bool, data_dir: str | None, shots: int, steps: int | None,
                query_size: int, lr: float | None) -> None:
    if (tasks is None) == (not meta_test):
        raise ConfigError("--tasks / --meta-test: give exactly one (a JSONL file of the new task, or --meta-test for "
                          "a held-out task of the recipe's family)")
    if data_dir and not meta_test:
        raise ConfigError("--data-dir: only used with --meta-test")
    for flag, value, low in (("--shots", shots, 1), ("--steps", steps, 1), ("--query-size", query_size, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag}: must be >= {low}, got {value}")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"--lr: must be a finite number > 0, got {lr}")


def _check_exports(paths: dict[str, str | None], overwrite: bool) -> dict[str, Path]:
    """The export folders, refused before any work unless each is new or empty (or ``overwrite``), writable,
    and not ``/``, the home folder or a folder holding the current one."""
    from metaprep.jsonio import check_writable

    given = {key: path for key, path in paths.items() if path}
    if len(given) == 2 and Path(given["merged"]).resolve() == Path(given["peft"]).resolve():
        raise ConfigError("--export-merged / --export-peft: must be different folders")
    exports = {}
    for key, path in given.items():
        flag, target = f"--export-{key}", Path(path).expanduser()
        resolved = target.resolve()
        if resolved in (Path(resolved.anchor), Path.home().resolve()) or Path.cwd().resolve().is_relative_to(resolved):
            raise ConfigError(f"{flag} {path}: refusing to export into /, the home folder or a folder that holds the "
                              f"current one; choose a new folder")
        if target.exists() and not target.is_dir():
            raise ConfigError(f"{flag} {path}: is a file; expected a new or empty folder")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise ConfigError(f"{flag} {path}: folder is not empty; choose a new folder or pass --overwrite "
                              f"(files of the same name are replaced)")
        check_writable(target, f"the {flag} folder", ConfigError, folder=True)
        exports[key] = target
    return exports


def _log_run(cfg, task: Task, features: dict[str, float], fast, summary: dict) -> str:
    from metaprep.registry.adapt_runs import AdaptRun, log_adapt_run
    from metaprep.registry.export import save_fast_weights
    from metaprep.registry.tracking import reachable_tracking_uri

    run = AdaptRun(
        task=task.name, meta_features=features, curve=summary["curve"], final_loss=summary["query_loss_after"],
        cost_s=summary["wall_s"],
        config={"lr": summary["lr"], "steps": summary["steps"], "shots": summary["shots"], "rank": cfg.reparam.rank,
                "reparam": cfg.reparam.kind, "algorithm": cfg.algorithm, "optimizer": summary["optimizer"]},
        extra_params={"base": summary["base"], "controller": summary["controller"]},
        extra_metrics={"query_loss_before": summary["query_loss_before"],
                       "perplexity_after": summary["perplexity_after"]})
    return log_adapt_run(reachable_tracking_uri(None), run, f"adapt-{task.name}", artifacts={
        "adapted_fast_weights.safetensors": lambda path: save_fast_weights(fast, path),
        "summary.json": lambda path: path.write_text(json.dumps(summary, indent=1))})
