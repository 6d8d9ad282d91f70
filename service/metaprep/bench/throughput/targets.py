"""The issue's targets: value, goal, met; profiles of the configurations behind a missed one, and why it is missed."""

from __future__ import annotations

import gc

from metaprep.bench.throughput.plan import META_BATCH, TARGETS, ModelPlan, Plan, batch_of, log, meta_config
from metaprep.bench.throughput.setup import Setup
from metaprep.bench.throughput.tables import find, fmt, ratio
from metaprep.bench.throughput.timing import profile_step
from metaprep.models.base import load_base_model


def evaluate_targets(report: dict) -> dict:
    """The issue's targets: value, target, met, and an explanation (from the run's own numbers) when missed."""
    configs, labels = report["configs"], [m["label"] for m in report["plan"]["models"]]
    small, large = labels[0], (labels[-1] if len(labels) > 1 else None)

    def tps(model, algorithm, method, precision="fp32", meta_batch=META_BATCH):
        c = find(configs, model, algorithm, method, precision, meta_batch)
        return c.get("tasks_per_s") if c else None

    def target(name: str, model: str | None, values: dict, higher_is_better: bool = True) -> dict:
        values = {k: v for k, v in values.items() if v is not None}
        goal = TARGETS[name]
        if not values:
            return {"model": model, "target": goal, "value": None, "met": None, "by_algorithm": {}}
        worst = min(values.values()) if higher_is_better else max(values.values())
        met = worst >= goal if higher_is_better else worst <= goal
        return {"model": model, "target": goal, "value": worst, "met": met, "by_algorithm": values}

    algos = report["plan"]["algorithms"]
    out = {name: target(name, small, {a: ratio(tps(small, a, "batched"), tps(small, a, other)) for a in algos})
           for name, other in VERSUS.items()}
    for name, other in VERSUS.items():  # a baseline that failed (e.g. its outputs differ) is named, not dropped
        errors = {a: c["error"] for a in algos if (c := find(configs, small, a, other, "fp32")) and c.get("error")}
        if errors:
            out[name]["errors"] = errors
            if out[name]["value"] is None:
                out[name]["not_measured"] = "; ".join(f"{other} {a}: {e}" for a, e in errors.items())
    if large:
        plan = report["plan"]["models"][-1]
        pairs = {a: batch_of(plan, a, bf16=True) for a in algos}
        out["bf16_vs_fp32"] = target("bf16_vs_fp32", large, {
            a: ratio(tps(large, a, "batched", "bf16", t), tps(large, a, "batched", "fp32", t))
            for a, t in pairs.items()})
        out["bf16_vs_fp32"]["meta_batch"] = pairs
        for precision in ("fp32", "bf16"):
            sizes = {a: batch_of(plan, a, bf16=precision == "bf16") for a in algos}
            out[f"mfu_{precision}"] = target(f"mfu_{precision}", large, {
                a: (find(configs, large, a, "batched", precision, t) or {}).get("mfu") for a, t in sizes.items()})
            out[f"mfu_{precision}"]["meta_batch"] = sizes
        skipped = next((c["skipped"] for c in configs if c.get("model") == large and c.get("skipped")), None)
        for name in ("bf16_vs_fp32", "mfu_bf16"):
            if out[name]["value"] is None and skipped:
                out[name]["not_measured"] = skipped
    fw = report["framework"]
    ray1 = next((e for e in fw.get("launches", []) if e["launcher"] == "ray_train" and e["workers"] == 1), None)
    if ray1 is not None:
        out["ray_deepspeed_overhead"] = target("ray_deepspeed_overhead", fw["model"],
                                               {"fomaml": ray1.get("overhead_vs_plain_torch")},
                                               higher_is_better=False)
    memory = _second_order_memory(report.get("memory") or [])
    if memory:
        out["second_order_memory"] = {**target("second_order_memory", memory.pop("model"),
                                               memory.pop("ratios"), higher_is_better=False), **memory}
    return out


def _second_order_memory(memory: list[dict]) -> dict:
    """Goal 5: peak RSS of second order with meta.inner_checkpointing ÷ first order's, at the most inner steps
    both were probed at (and, for reference, the same ratio without the switch)."""
    peak = {(m["order"], m["inner_steps"]): m.get("step_peak_rss_mb") for m in memory if "step_peak_rss_mb" in m}
    steps = [k for (order, k) in peak if order == "second_order_checkpointed" and ("first_order", k) in peak]
    if not steps:
        return {}
    k = max(steps)
    first = peak[("first_order", k)]
    plain = peak.get(("second_order", k))
    return {"model": memory[0]["model"], "inner_steps": k,
            "ratios": {"maml": peak[("second_order_checkpointed", k)] / first},
            "without_inner_checkpointing": plain / first if plain else None}


VERSUS = {"batched_vs_sequential": "sequential", "batched_vs_higher": "higher", "batched_vs_torch_func": "torch_func"}


def _worst(target: dict, higher_is_better: bool = True) -> str:
    values = target["by_algorithm"]
    return (min if higher_is_better else max)(values, key=values.get) if values else "fomaml"


def profile_key(model: str, algorithm: str, method: str, precision: str, meta_batch: int = META_BATCH) -> str:
    return f"{model}/{algorithm}/{method}/{precision}/T={meta_batch}"


PROFILE_LARGE_META_BATCH = 1  # the large model is profiled one task per step: op shares per task, and
# torch.profiler's records of a SmolLM2-135M bf16 step at meta-batch 4 outgrew this machine's 24 GB


def profile_for_targets(plan: Plan, targets: dict) -> dict:
    """torch.profiler summaries of the configurations behind each missed target (fomaml, or the worst algorithm);
    the large model's at :data:`PROFILE_LARGE_META_BATCH`."""
    small, large = plan.models[0], plan.models[-1]
    wanted: list[tuple[ModelPlan, str, str, str, int]] = []
    for name, t in targets.items():
        if t["met"] is not False:
            continue
        if name == "bf16_vs_fp32":
            # SmolLM2 profiles: fomaml (the transformer and its LoRA factors; profiling mltd's TAMS cells
            # on SmolLM2 holds over 20 GB of profiler records)
            pair = PROFILE_LARGE_META_BATCH
            wanted += [(large, "fomaml", "batched", "fp32", pair), (large, "fomaml", "batched", "bf16", pair)]
        elif name in ("mfu_fp32", "mfu_bf16"):  # the worst algorithm (fomaml's TAMS-free step stands in for mltd)
            worst = _worst(t) if _worst(t) != "mltd" else "fomaml"
            wanted.append((large, worst, "batched", name.split("_")[1], PROFILE_LARGE_META_BATCH))
        elif name in VERSUS:
            other = VERSUS[name]
            wanted += [(small, _worst(t), "batched", "fp32", META_BATCH), (small, _worst(t), other, "fp32", META_BATCH)]
    out: dict[str, dict] = {}
    for model in {w[0].label: w[0] for w in wanted}.values():
        base = load_base_model(meta_config(model, "fomaml", 1).model)
        for algorithm in dict.fromkeys(w[1] for w in wanted if w[0].label == model.label):
            setup = Setup(model, algorithm, plan.inner_steps, base)
            for method, precision, meta_batch in dict.fromkeys(
                    w[2:] for w in wanted if w[0].label == model.label and w[1] == algorithm):
                key = profile_key(model.label, algorithm, method, precision, meta_batch)
                if key in out:
                    continue
                log(f"profile {key}")
                job = setup if meta_batch == setup.meta_batch else setup.subset(meta_batch)
                getattr(job, method)(precision)  # warm-up
                out[key] = profile_step(lambda s=job, m=method, p=precision: getattr(s, m)(p))
            del setup
            gc.collect()
        del base
        gc.collect()
    return out


def explain(name: str, report: dict) -> str:
    peak, machine, profiles = report["peak"], report["machine"], report["profiles"]
    labels = [m["label"] for m in report["plan"]["models"]]
    large = labels[-1]
    if name == "bf16_vs_fp32":
        lin = machine.get("linear_gflops", {}).get(large, {})
        pair = PROFILE_LARGE_META_BATCH
        prof = profiles.get(profile_key(large, "fomaml", "batched", "bf16", pair), {})
        instr = ", ".join(machine["bf16_instructions"]) or "none"
        cpu = (f"{machine['cpu']}; bf16 instructions: {instr}; torch CPU capability {machine['cpu_capability']}")
        kernels = (f"the measured torch.mm peak is {peak['bf16_gflops']:.1f} GFLOP/s in bf16 vs "
                   f"{peak['fp32_gflops']:.1f} in fp32, and F.linear at the model's FFN shape {lin.get('shape')} runs "
                   f"at {fmt(lin.get('bf16_autocast'), '.1f')} GFLOP/s under bf16 autocast vs "
                   f"{fmt(lin.get('fp32'), '.1f')} in fp32")
        step = (f"Profile of the bf16 meta-step (meta-batch {pair}): {fmt(prof.get('matmul_share'), '.0%')} of op "
                f"time in matmuls at "
                f"{fmt(prof.get('matmul_gflops'), '.1f')} GFLOP/s, {fmt(prof.get('copy_cast_share'), '.0%')} in "
                f"casts/copies")
        fp32 = profiles.get(profile_key(large, "fomaml", "batched", "fp32", pair), {})
        share, fast, slow = fp32.get("matmul_share"), lin.get("bf16_autocast"), lin.get("fp32")
        if fast and slow and fast > 1.5 * slow:  # native bf16 GEMMs: the step is bounded by what bf16 does not speed up
            bound = 1 / ((1 - share) + share * slow / fast) if share else None
            ceiling = peak["bf16_gflops"] / peak["fp32_gflops"]
            below = " (below the target)" if ceiling < report["targets"][name]["target"] else ""
            return (f"bf16 GEMMs are fast on this CPU ({cpu}): {kernels}. A step made only of peak-speed matmuls "
                    f"would gain {ceiling:.2f}x, the ceiling of bf16 / fp32 here{below}. The meta-step gains "
                    f"{report['targets'][name]['value']:.2f}x (worst algorithm): in fp32 matmuls are "
                    f"{fmt(share, '.0%')} of its op time at meta-batch {pair}, so with every matmul at the bf16 "
                    f"F.linear speed Amdahl gives {fmt(bound, '.2f')}x there (more at larger meta-batches); the rest "
                    f"(RMSNorm, SiLU, RoPE, the 49k-vocabulary softmax/cross-entropy that autocast keeps in fp32, "
                    f"the fast-weight products, AdamW) does not speed up, and autocast "
                    f"adds fp32<->bf16 casts. {step}. Closing it needs a larger share of time in big matmuls (longer "
                    f"sequences, larger meta-batches than fit in this budget) or a GPU.")
        return (f"bf16 is not faster than fp32 on this CPU ({cpu}): {kernels}. Without native bf16 GEMMs "
                f"(AVX512-BF16/AMX) the bf16 path converts operands and accumulates in fp32, and autocast adds "
                f"fp32<->bf16 casts. {step}. The 2x target needs a CPU with native bf16 or a GPU.")
    if name in ("mfu_fp32", "mfu_bf16"):
        precision, target = name.split("_")[1], report["targets"][name]
        algorithm = _worst(target) if _worst(target) != "mltd" else "fomaml"  # as profile_for_targets
        lin = machine.get("linear_gflops", {}).get(large, {})
        prof = profiles.get(profile_key(large, algorithm, "batched", precision, PROFILE_LARGE_META_BATCH), {})
        share, mm, top = prof.get("matmul_share"), prof.get("matmul_gflops"), peak[f"{precision}_gflops"]
        bound = share * mm / top if share and mm else None
        linear = lin.get("fp32" if precision == "fp32" else "bf16_autocast")
        return (f"Worst: {_worst(target)} at {fmt(target['value'], '.1%')}. Profile of the {large} {algorithm} "
                f"{precision} meta-step (profiled at meta-batch {PROFILE_LARGE_META_BATCH}): matmuls take "
                f"{fmt(share, '.0%')} of op "
                f"time and run at {fmt(mm, '.1f')} GFLOP/s ({fmt(mm / top if mm else None, '.0%')} of the "
                f"{top:.1f} GFLOP/s square-matmul peak: the model's matmuls are skinny, e.g. "
                f"F.linear {lin.get('shape')} reaches {fmt(linear, '.1f')} GFLOP/s); the rest is "
                f"elementwise ops (RMSNorm, SiLU, RoPE, the LoRA/TARP batched products), the softmax/cross-entropy "
                f"over the 49k vocabulary, AdamW and dispatch. In the profiled step, matmul share x matmul "
                f"efficiency = {fmt(bound, '.0%')} (the timed step, at meta-batch "
                f"{target.get('meta_batch', {}).get(algorithm, '?')} and without the profiler's per-op cost, runs "
                f"larger matmuls, so this is where the time goes rather than its exact bound). Top ops: "
                + ", ".join(f"{o['op']} {o['self_s']:.2f}s" for o in prof.get("top_ops", [])[:5]) + ".")
    if name in VERSUS:
        small, algorithm = labels[0], _worst(report["targets"][name])
        other = VERSUS[name]
        pb = profiles.get(profile_key(small, algorithm, "batched", "fp32"), {})
        po = profiles.get(profile_key(small, algorithm, other, "fp32"), {})
        calls_b, calls_o = pb.get("op_calls"), po.get("op_calls")
        per_op = lambda p: p["ops_s"] / p["op_calls"] * 1e6 if p.get("op_calls") else None  # noqa: E731
        dispatch = (f" Op counts: {other} {calls_o} ops at {fmt(per_op(po), '.1f')} µs each on average, batched "
                    f"{calls_b} ops at {fmt(per_op(pb), '.1f')} µs each (batching over {META_BATCH} tasks cuts the "
                    f"op count {calls_o / calls_b:.1f}x; each batched op carries {META_BATCH} tasks' work, so the "
                    f"speed-up is the op-count ratio divided by the growth of the mean op time)."
                    if calls_b and calls_o else "")
        return (f"Profile ({small}, {algorithm}): batched op time {fmt(pb.get('ops_s'))} s, {other} "
                f"{fmt(po.get('ops_s'))} s; top batched ops: "
                + ", ".join(f"{o['op']} {o['self_s']:.3f}s x{o['calls']}" for o in pb.get("top_ops", [])[:5])
                + "." + dispatch)
    if name == "ray_deepspeed_overhead":
        fw = report["framework"]
        by = {(e["launcher"], e["workers"]): e for e in fw["launches"]}
        local, ray1 = by.get(("plain_process", 1), {}), by.get(("ray_train", 1), {})
        return (f"{fw['model']} fomaml: the meta-step alone (in-process, same DeepSpeed engine) "
                f"{fw['plain_torch_step_s']:.3f} s, the worker loop in a plain process {fmt(local.get('median_s'))} s, "
                f"in a 1-worker Ray Train run {fmt(ray1.get('median_s'))} s (Ray vs plain process "
                f"{fmt(fw.get('ray_vs_plain_process'), '+.0%')}). Around the same meta-step the loop draws and "
                f"tokenises its meta-batch, all-reduces and logs the step metrics, and under Ray runs in a worker "
                f"actor; on a model this small these fixed costs are a large share of the step.")
    if name == "second_order_memory":
        t, memory = report["targets"][name], report["memory"]
        growth = {(m["order"], m["inner_steps"]): m.get("step_growth_mb") for m in memory}
        k = t["inner_steps"]
        out = (f"{t['model']}, {k} inner steps: the checkpointed second-order step grows by "
               f"{fmt(growth.get(('second_order_checkpointed', k)), '.0f')} MB against first order's "
               f"{fmt(growth.get(('first_order', k)), '.0f')} MB (without the switch: "
               f"{fmt(growth.get(('second_order', k)), '.0f')} MB). With meta.inner_checkpointing the meta-backward "
               f"holds the double-backward graph of one inner step (its activations, the support loss's "
               f"gradient graph through the LM head, and their recomputation) at a time.")
        steps = sorted({m["inner_steps"] for m in memory})
        slope = {order: (growth.get((order, steps[-1])), growth.get((order, steps[0])))
                 for order in ("first_order", "second_order", "second_order_checkpointed")}
        if len(steps) > 1 and all(a is not None and b is not None for a, b in slope.values()):
            per = {order: (a - b) / (steps[-1] - steps[0]) for order, (a, b) in slope.items()}
            out += (f" Per extra inner step ({steps[0]} to {steps[-1]}) the growth changes by "
                    f"{per['second_order_checkpointed']:+.0f} MB checkpointed, {per['second_order']:+.0f} MB without "
                    f"the switch and {per['first_order']:+.0f} MB first order: the checkpoint keeps only the fast "
                    f"weights of each step (a few MB), so what else holds the checkpointed slope is not established "
                    f"here; RSS also counts freed memory that the allocator keeps (metaprep.runtime.keep_freed_memory) "
                    f"and varied by about 0.5 GB between runs.")
        return out
    return ""
