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
from metaprep.train.storage import Storage, credentials_env


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

    status = config.get("status")  # (storage root URI, file name below it): the run's final status
    write_status = (lambda final: Storage(status[0]).write_json(final, status[1])) if status else None
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as restore:
        env = WorkerEnv(ctx.get_world_rank(), ctx.get_world_size(), report,
                        Path(restore) if restore else None, scratch, write_status)
        run_worker(cfg, env, config.get("tracking"))


def build_trainer(cfg: MetaTrainConfig, name: str, storage: Storage | str | Path, tracking: dict | None,
                  status: tuple[str, str] | None = None):
    """The ``TorchTrainer`` of run ``name`` under ``storage`` (a folder, a URI or a :class:`Storage`: any
    filesystem, :mod:`metaprep.train.storage`). ``status``: (storage root URI, file) where rank 0 writes the
    final metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = storage if isinstance(storage, Storage) else Storage.of(storage)
    d = cfg.distributed
    storage_path, filesystem = storage.ray_storage
    env_vars = {**quiet_env(), "DS_ACCELERATOR": d.device,
                "OMP_NUM_THREADS": str(d.torch_threads or d.cpus_per_worker)}
    for key in ("METAPREP_DATA_DIR", "METAPREP_CACHE_DIR", "MLFLOW_TRACKING_URI", "METAPREP_FAULT_CHECKPOINT_AT",
                "METAPREP_FAULT_CRASH_AT"):
        if os.environ.get(key):
            env_vars[key] = os.environ[key]
    env_vars.update(credentials_env())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "tracking": tracking, "status": status},
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker={"CPU": d.cpus_per_worker},
                                     placement_strategy=d.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep + 1),
            worker_runtime_env={"env_vars": env_vars},
        ),
    )
