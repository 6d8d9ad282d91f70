"""Runs in fresh processes: peak memory of one batched meta-step, and the worker loop in a plain process / Ray.

Each probe is ``python -m metaprep.bench.throughput MODE JSON`` (:mod:`.__main__`); its last stdout line is JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from metaprep.bench.throughput.plan import MEMORY_ORDERS, META_BATCH, ModelPlan, Plan, meta_config
from metaprep.bench.throughput.setup import Setup
from metaprep.config import MetaTrainConfig, from_dict, to_dict
from metaprep.models.base import load_base_model
from metaprep.progress import Progress
from metaprep.runtime import configure_process, use_loopback_ray, use_stack_token


def _probe(mode: str, payload: dict, timeout: float) -> dict:
    """Run ``python -m metaprep.bench.throughput MODE JSON`` in a fresh process; its last line is JSON."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": str(payload.get("threads", 1))}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "metaprep.bench.throughput", mode, json.dumps(payload)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return {**json.loads(lines[-1]), "process_wall_s": time.perf_counter() - start}


def _rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) of this process in MB, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", float("nan")), fields.get("VmHWM", float("nan"))


def _memory_main(payload: dict) -> dict:
    configure_process(payload["threads"])  # as the worker loop
    model = ModelPlan(**payload["model"])
    base = load_base_model(meta_config(model, payload["algorithm"], 1).model)
    setup = Setup(model, payload["algorithm"], payload["inner_steps"], base,
                  inner_checkpointing=payload.get("inner_checkpointing", False))
    size = payload.get("meta_batch") or model.meta_batch
    setup = setup.subset(size) if size != setup.meta_batch else setup
    del base
    gc.collect()
    before, _ = _rss_mb()
    with contextlib.suppress(OSError):  # reset the peak (VmHWM) so the step's own peak is visible
        Path("/proc/self/clear_refs").write_text("5")
    setup.batched()
    _, step_peak = _rss_mb()
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_step_mb": before, "step_peak_rss_mb": step_peak,
            "step_growth_mb": step_peak - before}


def _local_main(payload: dict) -> dict:
    from metaprep.train.local import meta_train_local

    cfg = from_dict(MetaTrainConfig, payload["cfg"]).validate()
    start = time.perf_counter()
    meta_train_local(cfg, tracking=payload["tracking"])
    return {"wall_s": time.perf_counter() - start}


def _ray_main(payload: dict) -> dict:
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    from metaprep.train.launch import state_dir
    from metaprep.train.ray_job import build_trainer

    cfg = from_dict(MetaTrainConfig, payload["cfg"]).validate()
    use_loopback_ray(payload.get("address", "auto"))
    use_stack_token(state_dir())  # the probe's cluster is on this machine (the stack's, or its own)
    ray.init(address=payload.get("address", "auto"), log_to_driver=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="metaprep-throughput-") as storage:
        trainer = build_trainer(cfg, f"throughput-{cfg.distributed.num_workers}w-{int(time.time())}", storage,
                                payload["tracking"])
        trainer.fit()
    return {"wall_s": time.perf_counter() - start}


PROBES = {"memory": _memory_main, "local": _local_main, "ray": _ray_main}
FRAMEWORK_LAUNCHES = (("plain_process", 1), ("ray_train", 1), ("ray_train", 2))  # (launcher, workers)


def _tracking_store(tmp: Path) -> str:
    """Where the worker loop logs its step metrics: $MLFLOW_TRACKING_URI if it answers, else sqlite."""
    from metaprep.registry.tracking import check_reachable

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        try:
            check_reachable(uri, timeout_s=3.0)
            return uri
        except Exception:  # noqa: BLE001 - fall back to a private store
            pass
    return f"sqlite:///{tmp / 'throughput-mlflow.db'}"


def framework_overhead(plan: Plan, model: ModelPlan, plain_step_s: float, progress: Progress) -> dict:
    """The worker loop's step time in a plain process and in Ray Train with 1 and 2 workers.

    ``plain_step_s``: the in-process ``batched`` step of the same configuration (the same meta-step
    without the loop around it), reported as ``plain_torch_step_s``.
    """
    from mlflow.tracking import MlflowClient

    tmp = Path(tempfile.mkdtemp(prefix="metaprep-throughput-"))
    uri = _tracking_store(tmp)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("metaprep-throughput")
    exp_id = exp.experiment_id if exp else client.create_experiment("metaprep-throughput")
    launches = [(launcher, workers, max(1, plan.threads // workers)) for launcher, workers in FRAMEWORK_LAUNCHES]
    out = {"model": model.label, "algorithm": "fomaml", "tracking_uri": uri.split("?")[0],
           "plain_torch_step_s": plain_step_s, "launches": []}
    for launcher, workers, threads in launches:
        cfg = meta_config(model, "fomaml", plan.inner_steps, threads=threads)
        cfg.distributed.num_workers = workers
        cfg.meta.meta_steps = plan.framework_steps + 1
        run = client.create_run(exp_id, run_name=f"throughput-{launcher}-{workers}w",
                                tags={"suite": "throughput", "launcher": launcher})
        payload = {"cfg": to_dict(cfg), "tracking": {"uri": uri, "run_id": run.info.run_id}, "threads": threads}
        unit = f"framework {launcher} x{workers}"
        progress.start(unit)
        info = _probe("local" if launcher == "plain_process" else "ray", payload, timeout=600)
        progress.done(unit, f"FAILED: {info['error']}" if info.get("error") else "")
        client.set_terminated(run.info.run_id, "FINISHED" if "error" not in info else "FAILED")
        history = sorted(client.get_metric_history(run.info.run_id, "step_time_s"), key=lambda m: m.step)
        times = [m.value for m in history][1:]  # the first meta-step is the warm-up
        entry = {"launcher": launcher, "workers": workers, "threads_per_worker": threads,
                 "step_s": times, "wall_s": info.get("wall_s"), "error": info.get("error")}
        if times:
            med = statistics.median(times)
            entry.update(median_s=med, tasks_per_s=META_BATCH / med, overhead_vs_plain_torch=med / plain_step_s - 1)
        out["launches"].append(entry)
    by = {(e["launcher"], e["workers"]): e for e in out["launches"]}
    local, ray1 = by[("plain_process", 1)], by[("ray_train", 1)]
    if "median_s" in local and "median_s" in ray1:
        out["ray_vs_plain_process"] = ray1["median_s"] / local["median_s"] - 1
    return out


def memory_sweep(plan: Plan, progress: Progress) -> list[dict]:
    """Peak RSS of one batched meta-step per (order, inner steps), each in a fresh 1-thread process.

    Memory does not depend on timing, so the probes run ``plan.memory_parallel`` at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    model = next((m for m in plan.models if m.label == plan.memory_model), plan.models[0])
    jobs = [(order, algorithm, checkpointed, k) for order, algorithm, checkpointed in MEMORY_ORDERS
            for k in plan.memory_inner_steps]
    progress.say(f"memory {model.label}: {len(jobs)} probes, {plan.memory_parallel} at a time")

    def one(job):
        order, algorithm, checkpointed, k = job
        size = plan.memory_meta_batch or model.meta_batch
        unit = f"memory {model.label} {order} ({algorithm}) inner steps {k} T={size}"
        progress.start(unit)
        info = _probe("memory", {"model": dataclasses.asdict(model), "algorithm": algorithm, "inner_steps": k,
                                 "threads": 1, "meta_batch": size, "inner_checkpointing": checkpointed},
                      timeout=900)
        progress.done(unit, f"FAILED: {info['error']}" if info.get("error") else "")
        return {"model": model.label, "order": order, "algorithm": algorithm, "inner_checkpointing": checkpointed,
                "inner_steps": k, "meta_batch": size, **info}

    with ThreadPoolExecutor(max_workers=plan.memory_parallel) as pool:
        return list(pool.map(one, jobs))
