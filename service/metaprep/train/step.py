"""The outer meta-step: the one place a meta-batch becomes a DeepSpeed update.

Used by the Ray Train worker loop, the in-process runner (:mod:`metaprep.train.local`, the
benchmarks) and the throughput suite, so what is timed is what trains.

Every worker draws the same meta-batch (a function of seed and step), takes tasks
``rank::world`` and computes ``(world / B) · Σ_{its tasks} L_t``; DeepSpeed averages gradients over
workers, so W workers with meta-batch B compute exactly the meta-gradient of one worker with B
(mean over tasks). Fast weights stay outside the engine (DESIGN.md §2).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from metaprep.config import MetaTrainConfig
from metaprep.meta.build import MetaLearner, trainable_parameters
from metaprep.meta.precision import mixed_precision
from metaprep.tasks.base import Task, TaskBatch, sample_meta_batch
from metaprep.train.zero3 import hold_gathered

CPU_SHM_ENV = "METAPREP_DS_CPU_SHM"


def deepspeed_config(cfg: MetaTrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.meta.grad_clip if cfg.meta.grad_clip > 0 else 0.0,
        "zero_optimization": _zero_section(cfg.distributed.zero_stage),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _zero_section(stage: int) -> dict:
    """ZeRO settings. Stages 1-2 without ``contiguous_gradients``: that option copies every gradient into a
    bucket as backward produces it, which profiled at 40 % of a SmolLM2 fomaml backward on CPU (issue 17);
    it only guards against fragmentation, which stage 3 needs and stages 1-2 do not."""
    return {"stage": stage} if stage == 3 else {"stage": stage, "contiguous_gradients": False}


def skip_cpu_shm_build(deepspeed) -> None:
    """Do not JIT-compile DeepSpeed's shared-memory all-reduce op on CPU (``$METAPREP_DS_CPU_SHM=1`` opts in).

    DeepSpeed builds it with the C++ compiler at the first ``initialize`` of every fresh machine
    (about a minute and 1 GB per compiler process), and a build killed midway (OOM, SIGKILL)
    leaves a lock file in the torch-extensions cache on which every later job waits forever. The
    op only speeds up inference all-reduce; training collectives go through gloo either way.
    """
    if os.environ.get(CPU_SHM_ENV) != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def make_engine(cfg: MetaTrainConfig, learner: MetaLearner):
    """A DeepSpeed engine over ``learner`` with AdamW on its trainable parameters (the outer optimizer)."""
    os.environ.setdefault("DS_ACCELERATOR", cfg.distributed.device)
    import deepspeed

    if not cfg.distributed.use_gpu:
        skip_cpu_shm_build(deepspeed)
    params = trainable_parameters(learner)
    config = deepspeed_config(cfg)
    if not params:  # finetune: nothing is meta-trained, no step is taken; ZeRO needs trainable parameters
        params = list(learner.model.fast_init.parameters())
        config["zero_optimization"] = {"stage": 0}
    # fused: one pass over parameters, gradients and moments (on CPU 0.1 s instead of 1.2 s for 135M)
    optimizer = torch.optim.AdamW(params, lr=cfg.meta.outer_lr, weight_decay=cfg.meta.weight_decay, fused=True)
    engine, *_ = deepspeed.initialize(model=learner, optimizer=optimizer, config=config)
    return engine


def autocast_dtype(cfg: MetaTrainConfig) -> torch.dtype | None:
    """The autocast dtype of ``distributed.precision`` (None: fp32, no autocast)."""
    return torch.bfloat16 if cfg.distributed.bf16 else None


def autocast(cfg: MetaTrainConfig) -> torch.autocast:
    """The mixed precision of ``distributed.precision`` on the workers' device, for calls outside the engine."""
    return mixed_precision(cfg.distributed.device, autocast_dtype(cfg))


def noise_seed(seed: int, step: int, slot: int) -> int:
    """Seed of the TAMS Gumbel noise of the task in ``slot`` of meta-step ``step`` (stable across processes)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{slot}".encode()).digest()[:4], "little")


@dataclass
class MetaBatches:
    """Draws this worker's share of meta-batch ``step`` from the meta-training tasks and encodes it."""

    cfg: MetaTrainConfig
    tasks: list[Task]
    encode: Callable[..., TaskBatch]  # the task family's batch encoder
    tokenizer: object
    rank: int = 0
    world: int = 1

    def __call__(self, step: int, device: torch.device | str = "cpu") -> tuple[TaskBatch, TaskBatch]:
        cfg, b = self.cfg, self.cfg.meta.meta_batch_size
        index = {t.name: i for i, t in enumerate(self.tasks)}
        episodes = sample_meta_batch(self.tasks, b, cfg.tasks.shots, cfg.tasks.query_size, cfg.seed, step)
        mine = episodes[self.rank::self.world]
        support = self.encode(mine, "support", self.tokenizer, cfg.tasks.seq_len, index).to(device)
        # Gumbel noise of the task in slot i of this meta-batch: a function of (seed, step, i) on any worker
        support.noise_seeds = [noise_seed(cfg.seed, step, i) for i in range(b)][self.rank::self.world]
        query = self.encode(mine, "query", self.tokenizer, cfg.tasks.seq_len, index).to(device)
        return support, query


def meta_step(engine, cfg: MetaTrainConfig, support: TaskBatch, query: TaskBatch, step: int,
              world: int = 1) -> tuple[torch.Tensor, dict, bool]:
    """One outer update on this worker's tasks: per-task losses (T,), metrics, and whether DeepSpeed
    skipped the step because its gradients overflowed (divergence)."""
    learner = engine.module
    # ZeRO-3 frees gathered weights that a second-order (double-backward) graph still reads
    hold = cfg.distributed.zero_stage == 3 and cfg.second_order
    skipped = engine.skipped_steps
    with hold_gathered(learner, enabled=hold):
        losses, metrics = engine(support, query, step, autocast_dtype(cfg))  # autocast inside (MetaLearner)
        engine.backward(losses.float().sum() * (world / cfg.meta.meta_batch_size))
    engine.step()
    return losses, metrics, engine.skipped_steps > skipped
