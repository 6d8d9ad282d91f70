"""The meta-training worker loop: one DeepSpeed engine per worker, meta-batches sharded by rank.

Each iteration is :func:`metaprep.train.step.meta_step` on this worker's share of the meta-batch;
around it the loop evaluates on meta-validation, logs, checkpoints, detects divergence, stops early when
meta-val stops improving (``meta.early_stopping_patience``) and (rank 0) exports the prepared model. It
runs inside a Ray Train worker (:mod:`metaprep.train.ray_job`) or in a plain process (``world = 1``,
:mod:`metaprep.train.local`). The task family decides the batch encoder and the model (a causal LM, or
the ``convai2_mc`` sentence-encoder scorer).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from metaprep.config import MetaTrainConfig
from metaprep.errors import CheckpointError
from metaprep.meta.adapt import adapt
from metaprep.meta.build import MetaLearner, build_learner, build_meta_model
from metaprep.meta.model import MetaModel
from metaprep.progress import duration
from metaprep.registry.artifacts import export_prepared
from metaprep.registry.tracking import MetricLogger
from metaprep.runtime import configure_process
from metaprep.tasks.base import TaskSplit, fixed_episodes, split_tasks
from metaprep.tasks.families import batch_encoder_for, load_tasks
from metaprep.train.select import BestWeights, EarlyStopping
from metaprep.train.step import MetaBatches, autocast, autocast_dtype, make_engine, meta_step
from metaprep.train.zero3 import zero3_gathered

STATE_FILE = "trainer_state.json"
FAULT_ENV = "METAPREP_FAULT_CHECKPOINT_AT"
CRASH_ENV = "METAPREP_FAULT_CRASH_AT"  # fault injection: an unexpected worker exception at this meta-step
DS_TAG = "meta"


@dataclass
class WorkerEnv:
    """How the loop talks to its launcher (Ray Train or a plain process)."""

    rank: int
    world: int
    report: Callable[[dict, Path | None], None]
    restore_dir: Path | None = None
    scratch: Path = Path("/tmp")
    # rank 0 hands the final metrics (a diverged run's too) to the driver; Ray's last checkpointed report lacks a
    # diverged run's. Ray Train writes them to the run's storage (``train/storage.py``), on any node.
    write_status: Callable[[dict], None] | None = None


def load_split(cfg: MetaTrainConfig) -> TaskSplit:
    return split_tasks(load_tasks(cfg.tasks), cfg.tasks.val_fraction, cfg.tasks.test_fraction, cfg.tasks.split_seed)


def _all_reduce(values: list[float], world: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def _write_status(env: WorkerEnv, final: dict) -> None:
    if env.rank == 0 and env.write_status is not None:
        env.write_status(final)


def save_checkpoint(engine, folder: Path, step: int, history: dict, seed: int, rank: int, *,
                    previous: bool = True) -> None:
    """Write this rank's DeepSpeed shard and (rank 0) the trainer state into a fresh folder.

    The folder is new for every checkpoint and only handed to Ray once complete, so a failed write
    (full disk, I/O error) never touches the previous checkpoint; it fails with one clear line, which says
    whether there is a ``previous`` checkpoint to ``--resume`` from.
    """
    try:
        if os.environ.get(FAULT_ENV) == str(step):  # fault injection for the reliability tests
            raise OSError(28, "No space left on device (injected)")
        engine.save_checkpoint(str(folder), tag=DS_TAG)
        if rank == 0:
            (folder / STATE_FILE).write_text(json.dumps({"step": step, "history": history, "seed": seed}))
    except OSError as exc:
        then = ("the previous checkpoint is intact, free space and --resume the run" if previous else
                "no checkpoint was written before it, free space and start the run again")
        raise CheckpointError(f"checkpoint write failed at meta-step {step} in {folder} ({exc.strerror or exc}); "
                              f"{then}") from None


def _updated(engine) -> bool:
    """Whether the outer step changed the weights: a meta-gradient of norm 0 (e.g. every output saturated by a
    huge inner lr) or a non-finite one leaves them as they were. DeepSpeed reports the norm after its
    all-reduce, so every rank agrees; an engine that does not report it counts as updated."""
    norm = engine.get_global_grad_norm()
    return norm is None or (math.isfinite(float(norm)) and float(norm) > 0)


def evaluate(model, cfg: MetaTrainConfig, support, query) -> float:
    """Meta-validation: mean query loss after adapting to each val task with the training budget."""
    result = adapt(model, support, query, cfg.meta.inner_steps, cfg.meta.inner_lr, cfg.meta.inner_optimizer,
                   autocast_dtype=autocast_dtype(cfg))
    return result.query_loss_after


class Progress:
    """One line per logged meta-step on rank 0, readable in ``ray job logs``: step/total, meta-loss,
    the latest meta-val loss, tasks/s, tokens/s and the ETA (every step for the first 5, then about
    20 lines per run, and at each evaluation)."""

    def __init__(self, total: int, start: int) -> None:
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.every = max(1, total // 20)
        self.val: float | None = None

    def step(self, done: int, m: dict) -> None:
        if "meta_val_loss" in m:
            self.val = m["meta_val_loss"]
        if not (done - self.start <= 5 or done % self.every == 0 or done == self.total or "meta_val_loss" in m):
            return
        rate = (time.perf_counter() - self.t0) / max(done - self.start, 1)
        eta = rate * (self.total - done)
        val = f" | meta-val {self.val:.4f}" if self.val is not None else ""
        print(f"[meta-train] step {done}/{self.total} meta-loss {m['meta_loss']:.4f}{val} | "
              f"{m['tasks_per_s']:.2f} tasks/s {m['tokens_per_s']:.0f} tok/s | ETA {duration(eta)}", flush=True)


@dataclass
class WorkerResult:
    final: dict
    learner: MetaLearner  # engine.module: the trained model and its algorithm (with its state)
    loaded: object  # LoadedModel: tokenizer, kind, source
    split: TaskSplit
    export_dir: Path | None = None  # rank 0's exported base/ and controller/ folders

    @property
    def model(self) -> MetaModel:
        return self.learner.model


def run_worker(cfg: MetaTrainConfig, env: WorkerEnv, tracking: dict | None, export: bool = True,
               split: TaskSplit | None = None) -> WorkerResult:
    """Meta-train on this worker; rank 0 also exports the prepared model (when ``export``).

    ``split``: the tasks to use instead of loading and splitting ``cfg.tasks`` (the benchmarks' folds).
    """
    configure_process(cfg.distributed.torch_threads or cfg.distributed.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    split = split or load_split(cfg)
    model, loaded = build_meta_model(cfg)
    learner = build_learner(cfg, model, num_train_tasks=len(split.train))
    encode, tok, seq_len = batch_encoder_for(cfg), loaded.tokenizer, cfg.tasks.seq_len
    val_eps = fixed_episodes(split.val[: cfg.meta.eval_tasks], cfg.tasks.shots, cfg.tasks.query_size, cfg.seed)
    val_s, val_q = encode(val_eps, "support", tok, seq_len), encode(val_eps, "query", tok, seq_len)
    batches = MetaBatches(cfg, split.train, encode, tok, env.rank, env.world)

    engine = make_engine(cfg, learner)
    device = engine.device
    module = engine.module.model  # the MetaModel being trained

    start, history = 0, {"meta_val_loss": []}
    if env.restore_dir is not None:
        engine.load_checkpoint(str(env.restore_dir), tag=DS_TAG)
        state = json.loads((env.restore_dir / STATE_FILE).read_text())
        start, history = state["step"], state["history"]

    logger = None
    if env.rank == 0 and tracking:
        last = MetricLogger.last_logged_step(tracking["uri"], tracking["run_id"], "meta_loss")
        logger = MetricLogger(tracking["uri"], tracking["run_id"], skip_through=last)

    def log(metrics: dict, step: int) -> None:
        if logger is not None:
            logger.log(metrics, step)

    meta_steps = cfg.meta.meta_steps if learner.algorithm.meta_trains else 0
    if start == 0:
        with autocast(cfg):
            history["meta_val_loss"].append([0, evaluate(module, cfg, val_s.to(device), val_q.to(device))])
        log({"meta_val_loss": history["meta_val_loss"][-1][1]}, 0)

    b = cfg.meta.meta_batch_size
    diverged = None
    progress = Progress(meta_steps, start)
    best = BestWeights(cfg.checkpoint.select == "best" and meta_steps > 0, cfg.distributed.zero_stage == 3, env.rank)
    if start == 0:
        best.offer(module, 0, history["meta_val_loss"][0][1])
    stopper = EarlyStopping(cfg.meta.early_stopping_patience, cfg.meta.early_stopping_min_delta)
    for evaluated, val in history["meta_val_loss"]:  # a resumed run counts on from its checkpointed curve
        stopper.update(evaluated, val)
    stopped_early = None
    for step in range(start, meta_steps):
        if os.environ.get(CRASH_ENV) == str(step):  # fault injection for the reliability tests
            raise RuntimeError(f"injected worker crash at meta-step {step}")
        t0 = time.perf_counter()
        support, query = batches(step, device)
        # DeepSpeed skips (rather than applies) a step whose gradients overflowed: that is divergence
        losses, metrics, overflow = meta_step(engine, cfg, support, query, step, env.world)
        tokens = int(support.attention_mask.sum() + query.attention_mask.sum())
        loss_sum, n_bad, tok_sum = _all_reduce(
            [float(losses.detach().float().sum()), float((~torch.isfinite(losses.detach())).sum()) + float(overflow),
             tokens], env.world)
        if n_bad:
            diverged = step
            break
        if not _updated(engine):
            history["no_update_steps"] = history.get("no_update_steps", 0) + 1
        dt = time.perf_counter() - t0
        step_metrics = {"meta_loss": loss_sum / b, "tasks_per_s": b / dt, "tokens_per_s": tok_sum / dt,
                        "step_time_s": dt, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        **{k: v for k, v in metrics.items() if isinstance(v, float)}}
        done = step + 1
        stop = False
        if done % cfg.meta.eval_every == 0 or done == meta_steps:
            with autocast(cfg):
                history["meta_val_loss"].append([done, evaluate(module, cfg, val_s.to(device), val_q.to(device))])
            step_metrics["meta_val_loss"] = history["meta_val_loss"][-1][1]
            best.offer(module, done, step_metrics["meta_val_loss"])
            stop = stopper.update(done, step_metrics["meta_val_loss"]) and done < meta_steps
            if stopper.patience:  # every rank votes, so a rank that disagreed could not leave the others waiting
                stop = _all_reduce([float(stop)], env.world)[0] > 0
            if stop:
                stopped_early = step_metrics["stopped_early_at_step"] = done
        log(step_metrics, done)
        if env.rank == 0:
            progress.step(done, step_metrics)
        if stop:
            if env.rank == 0:
                print(stopper.reason(done, meta_steps), flush=True)
            break
        if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < meta_steps:
            ckpt = env.scratch / f"ckpt-{done}-rank{env.rank}"
            save_checkpoint(engine, ckpt, done, history, cfg.seed, env.rank,
                            previous=start > 0 or done > cfg.checkpoint.every)
            env.report({"meta_step": done, "meta_loss": step_metrics["meta_loss"]}, ckpt)

    final = {"meta_steps": diverged if diverged is not None else stopped_early or meta_steps,
             "stopped_early_at_step": stopped_early,
             "meta_val_loss_start": history["meta_val_loss"][0][1],
             "meta_val_loss_end": history["meta_val_loss"][-1][1], "diverged_at": diverged,
             "meta_val_curve": history["meta_val_loss"], "no_update_steps": history.get("no_update_steps", 0)}
    if diverged is not None or not all(math.isfinite(v) for _, v in history["meta_val_loss"]):
        final["diverged_at"] = diverged if diverged is not None else meta_steps
        _write_status(env, final)
        env.report(final, None)
        return WorkerResult(final, engine.module, loaded, split)
    if not export:
        return WorkerResult(final, engine.module, loaded, split)
    out = env.scratch / f"export-rank{env.rank}"
    gathered = (zero3_gathered(module) if cfg.distributed.zero_stage == 3 else contextlib.nullcontext())
    with gathered:
        if env.rank == 0:
            if logger is not None:
                logger.flush()
            final.update(best.restore(module, final["meta_steps"]))
            if final["selected_step"] != final["meta_steps"]:
                print(f"[meta-train] registering the weights of step {final['selected_step']} (best meta-val "
                      f"{final['selected_meta_val_loss']:.4f}; checkpoint.select=last keeps the last step)", flush=True)
            export_prepared(module, loaded, cfg, out, split=split)
    _write_status(env, final)
    env.report(final, out if env.rank == 0 else None)
    return WorkerResult(final, engine.module, loaded, split, out if env.rank == 0 else None)
