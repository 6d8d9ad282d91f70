"""Learn how to adapt a registered prepared model from its own adapt runs: what ``jobs.learn_settings`` runs.

:func:`learn_settings` loads ``NAME-base`` (+ its controller), adapts it to up to ``max_tasks`` of its own
meta-train and meta-val tasks (the recipe's split, or a JSONL file of tasks) from every support size of
``shots`` under every (lr, optimizer, steps) of the grid, logs each as an adapt run to the MLflow experiment
:data:`~metaprep.transfer.adapt_settings.EXPERIMENT` (tags ``prepared_model`` = ``NAME-base/VERSION`` and
``batch``, one per job), fits :class:`~metaprep.transfer.adapt_settings.AdaptSettings` on this job's runs as
MLflow gives them back and registers it as ``NAME-base-settings``, tagged ``base_model`` / ``base_version``: the model
``jobs.adapt --settings recommended`` uses for that base. A folder base saves the settings to ``X/settings``
next to ``X/base``, where ``jobs.adapt`` finds them.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
import uuid
from pathlib import Path

from metaprep.errors import ConfigError, DataError, RegistryError
from metaprep.progress import Progress, duration, say
from metaprep.transfer.adapt_settings import OPTIMIZERS, SHOTS, STEPS

SETTINGS_SUFFIX = "-settings"
EVAL_CHUNK = 8  # tasks adapted together in one batched inner loop


def settings_name(base_name: str) -> str:
    """The registered name of a base's settings model: ``NAME-base`` -> ``NAME-base-settings``."""
    return base_name + SETTINGS_SUFFIX


def learn_settings(base: str, controller: str | None = None, *, tasks: str | None = None, data_dir: str | None = None,
                   max_tasks: int = 20, shots: tuple[int, ...] = SHOTS, steps: tuple[int, ...] = STEPS,
                   lrs: tuple[float, ...] | None = None, optimizers: tuple[str, ...] = OPTIMIZERS,
                   query_size: int = 8, seed: int = 0, out: str | None = None, overwrite: bool = False,
                   register: str | None = None, log_mlflow: bool = True) -> dict:
    """Adapt ``base`` to its own tasks under a settings grid, learn the settings model, save and register it.

    ``lrs`` default to the recipe's inner lr x :data:`~metaprep.transfer.adapt_settings.LR_FACTORS`; ``out``:
    where the settings model is saved (default: ``X/settings`` for a folder base ``X/base``, a temporary folder
    for a registered base); ``register``: the registered name (default ``NAME-base-settings`` for a registered
    base; a folder base is registered only when it is given); ``log_mlflow``: log the runs and register (off:
    fit on the runs in memory, save only).
    """
    from metaprep.transfer import adapt_settings as ts

    _check_args(shots, steps, optimizers, max_tasks, query_size)
    if register:
        from metaprep.registry.names import check_model_name

        check_model_name(register, "--register")
    registry_base = base.startswith("models:/")
    if not log_mlflow and register:
        raise ConfigError("--register: needs MLflow; drop --no-mlflow")
    if not registry_base and out is None and not Path(base).is_dir():
        raise ConfigError(f"--base {base}: not a folder, nor models:/NAME-base@ALIAS or models:/NAME-base/VERSION")
    tracking = None
    if log_mlflow:
        from metaprep.registry.tracking import reachable_tracking_uri

        tracking = reachable_tracking_uri(None)
    label, base_name, base_version = _label(base, tracking)
    name = register or (settings_name(base_name) if registry_base and log_mlflow else None)
    target = Path(out).expanduser() if out else (None if registry_base else Path(base).parent / "settings")
    if target is not None:
        _check_target(target, overwrite)

    say("learn_settings", f"loading {base} ...")
    from metaprep.registry.artifacts import load_prepared
    from metaprep.registry.resolve import companion_controller, resolve_artifact

    controller = controller or companion_controller(base, tracking)
    model, loaded, cfg = load_prepared(resolve_artifact(base, tracking), resolve_artifact(controller, tracking))
    pool = _training_tasks(cfg, tasks, data_dir, max(shots) + query_size)
    if tasks is not None:
        from metaprep.train.adapt_task import _check_family

        for task in pool:
            _check_family(task, cfg.tasks.family, tasks)
    chosen = random.Random(seed).sample(pool, min(max_tasks, len(pool)))
    grid = ts.settings_grid(lrs or [cfg.meta.inner_lr * f for f in ts.LR_FACTORS], optimizers, steps)
    pairs = sorted({(s["lr"], s["optimizer"]) for s in grid})

    from metaprep.meta.adapt import adapt_in_chunks, support_losses_in_chunks
    from metaprep.runtime import configure_process
    from metaprep.tasks.base import fixed_episodes
    from metaprep.tasks.families import batch_encoder_for
    from metaprep.train.step import autocast_dtype

    configure_process(cfg.distributed.torch_threads or cfg.distributed.cpus_per_worker)
    encode_batch, dtype, seq_len = batch_encoder_for(cfg), autocast_dtype(cfg), cfg.tasks.seq_len
    progress = Progress("learn_settings", (len(shots), "support size"), (len(pairs), "lr x optimizer"),
                        plan=f"{len(chosen)} tasks x {len(shots)} support sizes x {len(grid)} settings "
                             f"= {len(chosen) * len(shots) * len(grid)} adapt runs")
    episodes = {k: fixed_episodes(chosen, k, query_size, seed) for k in shots}
    results = {}
    def encode(chunk: list, part: str):
        return encode_batch(chunk, part, loaded.tokenizer, seq_len)

    for k, eps in episodes.items():
        def adapt_curve(lr: float, optimizer: str, most: int, eps=eps, k=k) -> list[list[float]]:
            unit = f"shots {k}, lr {lr:g} {optimizer}, {most} steps, {len(eps)} tasks"
            progress.start(unit)
            curve = adapt_in_chunks(model, eps, encode, most, lr, optimizer, chunk=EVAL_CHUNK, autocast_dtype=dtype)
            progress.done(unit, f"mean query loss {_mean(curve[0]):.4f} -> {_mean(curve[-1]):.4f}")
            return curve
        support = support_losses_in_chunks(model, eps, encode, chunk=EVAL_CHUNK, autocast_dtype=dtype)
        results[k] = ts.adapt_grid(adapt_curve, support, grid)
    progress.finish()
    batch = uuid.uuid4().hex[:12]
    runs = ts.build_runs(chosen, episodes, loaded.tokenizer, grid, results, label, batch)

    metadataset = None
    if tracking:
        from mlflow.exceptions import MlflowException

        from metaprep.registry.adapt_runs import log_adapt_runs
        from metaprep.transfer.formats import read_mlflow_adapt_runs

        tags = {"prepared_model": label, "batch": batch}
        say("learn_settings", f"logging {len(runs)} adapt runs to {tracking} (experiment {ts.EXPERIMENT}, tags "
                              f"prepared_model={label}, batch={batch}) ...")
        try:
            log_adapt_runs(tracking, runs, ts.EXPERIMENT, tags=tags)
            # the surrogate learns from exactly these runs as MLflow returns them: the rows its rule was
            # cross-validated on (another job's runs of the same model are another batch)
            metadataset = read_mlflow_adapt_runs(tracking, ts.EXPERIMENT, where=" and ".join(
                f"tags.{k} = '{v}'" for k, v in tags.items()))
        except MlflowException as exc:
            raise RegistryError(f"{tracking}: cannot log or read back the adapt runs "
                                f"({exc.message.splitlines()[0]})") from None
        if len(metadataset.rows) != len(runs):
            raise RegistryError(f"{tracking}: logged {len(runs)} adapt runs of batch {batch} but read back "
                                f"{len(metadataset.rows)}; nothing was registered")
        say("learn_settings", f"read back {len(metadataset.rows)} adapt runs of {label} from MLflow")
    say("learn_settings", f"fitting the surrogate and cross-validating it over {len(chosen)} tasks ...")
    settings = ts.AdaptSettings.learn(runs, grid, label, seed=seed, metadataset=metadataset)
    settings.extra = {"base": base, "controller": controller, "shots": list(shots), "query_size": query_size,
                      "tasks": len(chosen)}
    say("learn_settings", f"rule: {settings.rule} (held-out regret surrogate {settings.cv['surrogate']:.4f}, "
                          f"best fixed setting {settings.cv['fixed']:.4f} nats over {settings.cv['n']} (task, shots) "
                          f"pairs); best fixed setting {ts.describe(settings.fixed)}")
    summary = {"base": base, "controller": controller, "prepared_model": label, "batch": batch, "runs": len(runs),
               "logged_runs": len(metadataset.rows) if metadataset is not None else None, "tasks": len(chosen),
               "grid": grid, "rule": settings.rule, "cross_validation": settings.cv, "fixed_setting": settings.fixed,
               "wall_s": round(progress.elapsed(), 1)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = settings.save(target if target is not None else Path(tmp) / "settings")  # atomic
        if target is not None:
            summary["settings_dir"] = str(folder)
        if name:
            from metaprep.transfer.registry import register_surrogate

            tags = {"base_model": base_name or "", "base_version": base_version or "", "prepared_model": label,
                    "rule": settings.rule, "cv_regret_surrogate": f"{settings.cv['surrogate']:.6f}",
                    "cv_regret_fixed": f"{settings.cv['fixed']:.6f}", "adapt_runs": str(len(runs)),
                    "purpose": "adaptation settings (jobs.adapt --settings recommended)"}
            reg = register_surrogate(folder, name, tracking, tags=tags)
            summary["registered_model"] = f"models:/{reg['name']}/{reg['version']}"
            say("learn_settings", f"registered {summary['registered_model']} for {label}")
    say("learn_settings", f"done in {duration(progress.elapsed())}: use it with python -m jobs.adapt --base {base} "
                          "--settings recommended ...")
    return summary


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


def _label(base: str, tracking: str | None) -> tuple[str, str | None, str | None]:
    """(``prepared_model`` tag, registered base name, version) of ``base``: ``NAME-base/VERSION`` for a registry
    URI (an alias resolved to its version, so runs stay with the weights they were measured on), else a new
    ``local-<id>`` for a folder (nothing identifies a folder's weights across runs)."""
    if base.startswith("models:/"):
        if tracking is None:
            raise ConfigError("--no-mlflow: a registered --base (models:/...) needs MLflow; give an exported folder")
        from metaprep.registry.resolve import registered_version

        name, version = registered_version(base, tracking)
        return f"{name}/{version}", name, version
    return f"local-{uuid.uuid4().hex[:12]}", None, None


def _training_tasks(cfg, tasks: str | None, data_dir: str | None, need: int) -> list:
    """The tasks to learn from: the JSONL ``tasks``, else the recipe's meta-train + meta-val split; only those
    with ``need`` examples (largest support + query)."""
    if tasks is not None:
        from metaprep.tasks.jsonl import load_jsonl_tasks

        found, source = load_jsonl_tasks(tasks), tasks
    else:
        from metaprep.train.loop import load_split

        if data_dir is not None:
            cfg = dataclasses.replace(cfg, tasks=dataclasses.replace(cfg.tasks, data_dir=data_dir))
        split = load_split(cfg)
        found, source = split.train + split.val, f"the recipe's meta-train + meta-val tasks ({cfg.tasks.family})"
    pool = [t for t in found if len(t.examples) >= need]
    if len(pool) < 2:
        raise DataError(f"{source}: {len(pool)} of {len(found)} tasks have >= {need} examples (largest --shots + "
                        f"--query-size); need >= 2")
    return pool


def _check_args(shots, steps, optimizers, max_tasks: int, query_size: int) -> None:
    bad = [o for o in optimizers if o not in OPTIMIZERS]
    if bad:
        raise ConfigError(f"--optimizers: {bad} not valid; choose from {list(OPTIMIZERS)}")
    if max_tasks < 2:
        raise ConfigError(f"--max-tasks: must be >= 2 (the rule is cross-validated over tasks), got {max_tasks}")
    if query_size < 1:
        raise ConfigError(f"--query-size: must be >= 1, got {query_size}")
    if not shots or not steps or not optimizers:
        raise ConfigError("--shots / --steps / --optimizers: give at least one value each")


def _check_target(target: Path, overwrite: bool) -> None:
    """The settings folder: new, or an earlier settings model replaced only with ``overwrite``; writable."""
    from metaprep.jsonio import check_writable
    from metaprep.transfer.adapt_settings import SPEC_FILE

    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out {target}: is a file; expected a new folder")
    if target.is_dir() and any(target.iterdir()):
        if not (target / SPEC_FILE).is_file():
            raise ConfigError(f"--out {target}: a non-empty folder that is not a settings model; choose a new folder")
        if not overwrite:
            raise ConfigError(f"--out {target}: holds a settings model from an earlier run; pass --overwrite to "
                              "replace it (written whole, then swapped in)")
    # the model is staged beside the folder and renamed into place: its parent must take new entries
    check_writable(target.parent, "the settings folder", ConfigError, folder=True)


def load_settings_for(base: str, settings_model: str | None, tracking: str | None = None):
    """(settings model, where it came from) for ``jobs.adapt --settings recommended``: ``settings_model`` (a folder
    or ``models:/`` URI) when given; else for ``models:/NAME-base@ALIAS|/VERSION`` the newest ``NAME-base-settings``
    version tagged with that base version; else ``X/settings`` next to a folder base ``X/base``."""
    from metaprep.transfer.adapt_settings import AdaptSettings

    hint = f"learn one with python -m jobs.learn_settings --base {base}, or pass --settings-model"
    if settings_model is None and not base.startswith("models:/"):
        folder = Path(base).parent / "settings"
        if not folder.is_dir():
            raise ConfigError(f"--settings recommended: no settings model next to --base {base} ({folder} is "
                              f"missing); {hint}")
        return AdaptSettings.load(folder), str(folder)
    if settings_model is not None and not settings_model.startswith("models:/"):
        found = AdaptSettings.load(Path(settings_model).expanduser())
        _note_other_base(found, base, settings_model)
        return found, settings_model
    from metaprep.registry.tracking import reachable_tracking_uri

    tracking = reachable_tracking_uri(tracking)
    uri = settings_model or _registered_settings(base, tracking, hint)
    from metaprep.transfer.registry import download_surrogate

    with tempfile.TemporaryDirectory() as tmp:  # AdaptSettings.load reads everything into memory
        found = AdaptSettings.load(download_surrogate(uri, tmp, tracking))
    _note_other_base(found, base, uri)
    return found, uri


def _note_other_base(found, base: str, source: str) -> None:
    """A line when an explicitly given settings model was learned for another base than ``base``."""
    if found.extra.get("base") not in (None, base):
        say("adapt", f"note: --settings-model {source} was learned for {found.extra['base']}, not for --base {base}")


def _registered_settings(base: str, tracking: str, hint: str) -> str:
    """``models:/NAME-base-settings/V``: the newest version whose tags name ``base``'s registered version."""
    from mlflow.exceptions import MlflowException

    from metaprep.registry.client import mlflow_client
    from metaprep.registry.resolve import registered_version

    name, version = registered_version(base, tracking)
    try:
        versions = mlflow_client(tracking).search_model_versions(f"name='{settings_name(name)}'")
    except MlflowException as exc:
        raise RegistryError(f"{tracking}: cannot search {settings_name(name)} "
                            f"({exc.message.splitlines()[0]})") from None
    found = [mv for mv in versions if mv.tags.get("base_model") == name and mv.tags.get("base_version") == version]
    if not found:
        raise ConfigError(f"--settings recommended: no {settings_name(name)} version is tagged with {name} version "
                          f"{version}; {hint}")
    newest = max(found, key=lambda mv: int(mv.version))
    return f"models:/{newest.name}/{newest.version}"
