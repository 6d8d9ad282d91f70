"""Register a prepared model as two MLflow registered models with lineage and aliases.

``NAME-base`` and ``NAME-controller`` (DESIGN.md §2): each version points at plain artifact
folders of the source run (safetensors + JSON), carries lineage tags (method, hyperparameters,
task family and split, data fingerprint, meta-val metrics, where early stopping stopped, code version,
source run) and gets the alias ``candidate``. A base whose weights are a transformers model is also an
MLflow ``transformers`` model (tag ``transformers_flavor``: its pipeline task, or ``none: WHY``;
:func:`metaprep.registry.artifacts.add_transformers_flavor`). ``champion`` moves only through
:mod:`metaprep.registry.promotion`. MLflow stages are deprecated and unused.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from metaprep import __version__
from metaprep.config import MetaTrainConfig
from metaprep.registry.artifacts import SPLIT, read_base_info
from metaprep.registry.client import log_params, retry

KINDS = ("base", "controller")


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def lineage_tags(cfg: MetaTrainConfig, final: dict, fingerprint: str, run_id: str) -> dict[str, str]:
    return {
        "method": cfg.algorithm, "algorithm": cfg.algorithm, "reparam.kind": cfg.reparam.kind,
        "reparam.rank": str(cfg.reparam.rank), "meta.inner_lr": str(cfg.meta.inner_lr),
        "meta.outer_lr": str(cfg.meta.outer_lr), "meta.inner_steps": str(cfg.meta.inner_steps),
        "meta.meta_batch_size": str(cfg.meta.meta_batch_size), "meta.meta_steps": str(final["meta_steps"]),
        "task_family": cfg.tasks.family, "data_fingerprint": fingerprint, "base_model": cfg.model.path,
        "meta_val_loss_start": f"{final['meta_val_loss_start']:.6g}",
        "meta_val_loss_end": f"{final['meta_val_loss_end']:.6g}",
        "selected_step": str(final.get("selected_step", final["meta_steps"])),
        "checkpoint.select": cfg.checkpoint.select,
        "code_version": code_version(), "source_run": run_id,
        "distributed.num_workers": str(cfg.distributed.num_workers),
        "distributed.zero_stage": str(cfg.distributed.zero_stage),
        "meta.early_stopping_patience": str(cfg.meta.early_stopping_patience),
        **({"stopped_early_at_step": str(final["stopped_early_at_step"])} if final.get("stopped_early_at_step")
           else {}),
    }


TAG_CHARS = 4000  # a tag value cut here (MLflow's limit is larger; names beyond it are in task_split.json)


def split_tags(ctrl: Path) -> dict[str, str]:
    """Tags of the task split recorded in ``ctrl/task_split.json`` (none for an export without one)."""
    if not (ctrl / SPLIT).is_file():
        return {}
    split = json.loads((ctrl / SPLIT).read_text())
    counts = split["counts"]
    return {"task_split": ", ".join(f"{n} {part.replace('_', '-')}" for part, n in counts.items()),
            **{f"task_split.{part}": ", ".join(split[part])[:TAG_CHARS] for part in ("meta_val", "meta_test")}}


def register_prepared(uri: str, run_id: str, export: Path, cfg: MetaTrainConfig, final: dict,
                      fingerprint: str, config_json: str) -> dict[str, str]:
    """Log ``export/{base,controller}`` to the run and register one version of each with alias candidate."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    tags = {**lineage_tags(cfg, final, fingerprint, run_id), **split_tags(export / "controller")}
    flavor = read_base_info(export / "base").get("transformers_flavor", "none: exported without the flavor")
    kind_tags = {"base": {"transformers_flavor": flavor}, "controller": {}}
    if "task_split" in tags:
        counts = json.loads((export / "controller" / SPLIT).read_text())["counts"]
        retry(lambda: log_params(client, run_id, {f"task_split.{k}": n for k, n in counts.items()}),
              "log the task split")
    uris = {}
    for kind in KINDS:
        retry(lambda k=kind: client.log_artifacts(run_id, str(export / k), k), f"upload {kind} artifacts")
    for kind in KINDS:
        name = f"{cfg.registry.name}-{kind}"
        description = (f"metaprep {kind} prepared by {cfg.algorithm} ({cfg.reparam.kind}, r={cfg.reparam.rank}) "
                       f"on task family {cfg.tasks.family}; see tags for lineage.")

        def create(name=name, kind=kind, description=description):
            try:
                client.create_registered_model(name, description=f"metaprep prepared {kind}s")
            except MlflowException as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                    raise
            existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
            if existing:  # a retried registration: never create a second version for one run
                return existing[0]
            return client.create_model_version(name, source=f"{run.info.artifact_uri}/{kind}", run_id=run_id,
                                               tags={**tags, **kind_tags[kind], "config": config_json[:TAG_CHARS]},
                                               description=description)

        version = retry(create, f"register {name}")
        retry(lambda name=name, v=version.version: client.set_registered_model_alias(name, "candidate", v),
              f"alias {name}")
        uris[kind] = f"models:/{name}/{version.version}"
        uris[f"{kind}_version"] = str(version.version)
    return uris
