"""Launch the worker loop on Ray Train (V2): ``TorchTrainer`` + DeepSpeed in every worker.

Checkpoints: every rank saves its DeepSpeed shard into a local folder and all ranks report it
in the same ``ray.train.report`` call, which Ray merges into one checkpoint directory. Re-running
with the same ``RunConfig(name, storage_path)`` restores from the latest checkpoint (Train V2's
snapshot restore); ``FailureConfig`` does the same automatically after a worker dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path

from metaprep.config import MetaTrainConfig, from_dict
from metaprep.runtime import quiet_env


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    from metaprep.train.loop import WorkerEnv, run_worker

    cfg = from_dict(MetaTrainConfig, config["cfg"]).validate()
    ctx = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()
    scratch = Path(tempfile.mkdtemp(prefix="metaprep-"))

    def report(metrics: dict, path: Path | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(path)) if path else None)

    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as restore:
        status = config.get("status_path")
        env = WorkerEnv(ctx.get_world_rank(), ctx.get_world_size(), report,
                        Path(restore) if restore else None, scratch, Path(status) if status else None)
        run_worker(cfg, env, config.get("tracking"))


def build_trainer(cfg: MetaTrainConfig, name: str, storage_path: str, tracking: dict | None,
                  status_path: str | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    d = cfg.distributed
    env_vars = {**quiet_env(), "DS_ACCELERATOR": "cuda" if d.use_gpu else "cpu",
                "OMP_NUM_THREADS": str(d.torch_threads or d.cpus_per_worker)}
    for key in ("METAPREP_DATA_DIR", "METAPREP_CACHE_DIR", "MLFLOW_TRACKING_URI", "METAPREP_FAULT_CHECKPOINT_AT",
                "METAPREP_FAULT_CRASH_AT"):
        if os.environ.get(key):
            env_vars[key] = os.environ[key]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "tracking": tracking, "status_path": status_path},
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker={"CPU": d.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep + 1),
            worker_runtime_env={"env_vars": env_vars},
        ),
    )
