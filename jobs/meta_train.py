"""Meta-train a base model and register it: ``python -m jobs.meta_train --config RECIPE [--set k=v ...]``.

Runs on Ray Train (``distributed.num_workers`` workers, a DeepSpeed engine each), logs params and
per-step metrics to MLflow, registers ``NAME-base`` and ``NAME-controller`` with alias
``candidate``, and writes a summary JSON (``--summary-out``). Submit to a cluster with::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.meta_train --config jobs/configs/tiny.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import uuid
from pathlib import Path

from jobs._cli import run_main, write_summary
from metaprep.config import MetaTrainConfig, flatten, load_config
from metaprep.errors import MetaprepError, TrainingDivergedError


def state_dir() -> Path:
    return Path(os.environ.get("METAPREP_STATE_DIR") or Path.home() / ".metaprep")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.meta_train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML recipe (jobs/configs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set meta.inner_lr=0.01 (repeatable)")
    p.add_argument("--model-path", help="shortcut for --set model.path=PATH")
    p.add_argument("--data-dir", help="shortcut for --set tasks.data_dir=DIR")
    p.add_argument("--summary-out", help="write the run summary JSON here")
    p.add_argument("--resume", metavar="RUN_NAME", help="continue a stopped run from its latest checkpoint")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.model_path:
        overrides.append(f"model.path={args.model_path}")
    if args.data_dir:
        overrides.append(f"tasks.data_dir={args.data_dir}")
    cfg = load_config(MetaTrainConfig, args.config, overrides)
    for note in cfg.advisories():
        print(f"warning: {note}", file=sys.stderr)
    t0 = time.perf_counter()

    from metaprep.registry.tracking import check_reachable, tracking_uri

    uri = tracking_uri(cfg.tracking.uri)
    check_reachable(uri)  # fail in seconds, before any training

    # Validate data and model on the driver: bad input fails here with one line, not in a worker.
    from metaprep.meta.build import build_meta_model
    from metaprep.tasks.base import fingerprint
    from metaprep.train.loop import load_split

    split = load_split(cfg)
    build_meta_model(cfg, num_train_tasks=len(split.train))
    data_fp = fingerprint(split.train + split.val + split.test)

    storage = Path(cfg.checkpoint.storage_path or state_dir() / "ray_results").resolve()
    name = args.resume or f"{cfg.registry.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_file = storage / name / "metaprep_run.json"
    if args.resume and not run_file.exists():
        raise MetaprepError(f"--resume {args.resume}: no such run under {storage} (run names are printed at start "
                            f"and stored in the summary JSON)")

    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if args.resume:
        run_id = json.loads(run_file.read_text())["run_id"]
    else:
        mlflow.set_tracking_uri(uri)
        exp = mlflow.set_experiment(cfg.tracking.experiment)
        run_id = client.create_run(exp.experiment_id, run_name=name,
                                   tags={"algorithm": cfg.algorithm, "ray_run_name": name}).info.run_id
        params = flatten(dataclasses.asdict(cfg))
        from mlflow.entities import Param

        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        run_file.parent.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    print(f"metaprep: run {name} (MLflow run {run_id}) -> {uri}", flush=True)

    import ray

    from metaprep.train.ray_job import build_trainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "service")}})
    status_file = storage / name / "metaprep_final.json"
    status_file.unlink(missing_ok=True)
    trainer = build_trainer(cfg, name, str(storage), {"uri": uri, "run_id": run_id}, str(status_file))
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; surface the user-facing cause as one line
        client.set_terminated(run_id, "FAILED")
        cause = _user_error(exc)
        if cause is not None:
            raise cause from None
        raise
    # the final metrics: Ray returns those of the last checkpointed report; a diverged run has none
    final = json.loads(status_file.read_text()) if status_file.exists() else result.metrics
    if final.get("diverged_at") is not None:
        client.set_terminated(run_id, "FAILED")
        raise TrainingDivergedError(
            f"meta-loss became NaN/inf at meta-step {final['diverged_at']} (meta.inner_lr={cfg.meta.inner_lr}, "
            f"meta.outer_lr={cfg.meta.outer_lr}); lower the learning rates. Nothing was registered.")
    export = Path(result.checkpoint.path)
    summary = {"run_id": run_id, "run_name": name, "meta_steps": final["meta_steps"],
               "meta_val_loss_start": final["meta_val_loss_start"], "meta_val_loss_end": final["meta_val_loss_end"],
               "meta_val_curve": final["meta_val_curve"], "algorithm": cfg.algorithm,
               "reparam": cfg.reparam.kind, "data_fingerprint": data_fp}
    client.log_dict(run_id, dataclasses.asdict(cfg), "config.json")
    if cfg.registry.register:
        from metaprep.registry.register import register_prepared

        uris = register_prepared(uri, run_id, export, cfg, final, data_fp, json.dumps(dataclasses.asdict(cfg)))
        summary.update(base_uri=uris["base"], controller_uri=uris["controller"],
                       base_version=uris["base_version"], controller_version=uris["controller_version"])
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    client.log_metric(run_id, "wall_s", summary["wall_s"])
    client.set_terminated(run_id, "FINISHED")
    write_summary(args.summary_out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "meta_val_curve"}, indent=1))
    return 0


def _user_error(exc: BaseException) -> MetaprepError | None:
    """Find a MetaprepError raised inside a Ray worker (wrapped in Ray's exception types)."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if isinstance(e, MetaprepError):
            return e
        for attr in ("cause", "__cause__", "__context__"):
            stack.append(getattr(e, attr, None))
        stack.extend(getattr(e, "worker_failures", {}).values() if hasattr(e, "worker_failures") else [])
    return None


if __name__ == "__main__":
    run_main(main)
