"""Run the same worker loop in this process (world size 1): no Ray, same DeepSpeed engine.

Used by benchmarks (many small meta-trainings) and by the throughput suite to measure what Ray
adds on top of the identical loop.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch.distributed as dist

from metaprep.config import MetaTrainConfig
from metaprep.tasks.base import TaskSplit
from metaprep.train.loop import WorkerEnv, WorkerResult, run_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(device: str = "cpu") -> None:
    """A single-process group, which DeepSpeed needs even with one worker: gloo on CPU, nccl on ``cuda``."""
    if dist.is_initialized():
        return
    if device == "cuda":
        os.environ["DS_ACCELERATOR"] = "cuda"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                            rank=0, world_size=1)


def meta_train_local(cfg: MetaTrainConfig, tracking: dict | None = None, export: bool = False,
                     on_report=None, split: TaskSplit | None = None) -> WorkerResult:
    """Meta-train ``cfg`` in this process; returns final metrics and the trained model.

    ``split`` replaces the tasks ``cfg.tasks`` would load (a benchmark fold).
    """
    ensure_process_group(cfg.distributed.device)
    scratch = Path(tempfile.mkdtemp(prefix="metaprep-local-"))
    env = WorkerEnv(0, 1, on_report or (lambda metrics, path: None), None, scratch)
    return run_worker(cfg, env, tracking, export=export, split=split)
