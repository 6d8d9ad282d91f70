"""The suite's result rows (``results``) and the README summary table (``table_md``)."""

from __future__ import annotations

import math

from metaprep.bench.report import result
from metaprep.bench.throughput.plan import MEMORY_ORDERS, META_BATCH, batch_of


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def fmt(x, spec: str = ".3g") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def find(configs: list[dict], model: str, algorithm: str, method: str, precision: str,
          meta_batch: int = META_BATCH) -> dict | None:
    key = (model, algorithm, method, precision, meta_batch)
    return next((c for c in configs if (c.get("model"), c.get("algorithm"), c.get("method"), c.get("precision"),
                                        c.get("meta_batch")) == key), None)


def result_rows(configs: list[dict], framework: dict | None, memory: list[dict], peak: dict) -> list[dict]:
    rows = [result("torch.mm", "matmul_peak_gflops", [p[f"{d}_gflops"] for p in peak["measurements"]], dtype=d)
            for d in ("fp32", "bf16")]
    for c in configs:
        if "step_s" not in c:
            continue
        setting = {"model": c["model"], "algorithm": c["algorithm"], "precision": c["precision"],
                   "meta_batch": c["meta_batch"]}
        rows.append(result(c["method"], "tasks_per_s", [c["meta_batch"] / t for t in c["step_s"]], **setting))
        rows.append(result(c["method"], "tokens_per_s", [c["tokens"] / t for t in c["step_s"]], **setting))
        if c.get("flops"):
            rows.append(result(c["method"], "mfu", [c["flops"] / t / 1e9 / peak[f"{c['precision']}_gflops"]
                                                    for t in c["step_s"]], **setting))
    for e in (framework or {}).get("launches", []):
        if e.get("step_s"):
            setting = {"model": framework["model"], "algorithm": framework["algorithm"], "precision": "fp32",
                       "workers": e["workers"]}
            rows.append(result(e["launcher"], "tasks_per_s", [META_BATCH / t for t in e["step_s"]], **setting))
            rows.append(result(e["launcher"], "overhead_vs_plain_torch",
                               [t / framework["plain_torch_step_s"] - 1 for t in e["step_s"]], **setting))
    for m in memory:
        if "peak_rss_mb" in m:
            setting = {"model": m["model"], "inner_steps": m["inner_steps"]}
            # the step's own peak (what the orders differ in); the process peak includes loading the model
            rows.append(result(m["order"], "step_peak_rss_mb", [m["step_peak_rss_mb"]], **setting))
            rows.append(result(m["order"], "step_growth_mb", [m["step_growth_mb"]], **setting))
            rows.append(result(m["order"], "process_peak_rss_mb", [m["peak_rss_mb"]], **setting))
    return rows


MEMORY_HEADERS = {"first_order": "first order (fomaml)", "second_order": "second order (maml)",
                  "second_order_checkpointed": "second order, meta.inner_checkpointing (maml)"}


def summary_table(report: dict) -> str:
    """The README table: per model and algorithm, methods and precisions; framework; memory; peak."""
    configs = report["configs"]
    lines = ["| model | algorithm (T) | batched tasks/s | sequential tasks/s | higher tasks/s | torch_func tasks/s | "
             "batched ÷ seq | batched ÷ higher | batched ÷ torch_func | batched tokens/s | MFU fp32 | MFU bf16 | "
             "bf16 tasks/s (T) | bf16 ÷ fp32 at that T |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for plan_model in report["plan"]["models"]:
        model = plan_model["label"]
        for a in report["plan"]["algorithms"]:
            main, pair = batch_of(plan_model, a), batch_of(plan_model, a, bf16=True)
            get = lambda method, p="fp32", t=main: find(configs, model, a, method, p, t) or {}  # noqa: B023
            b, s, h, f = get("batched"), get("sequential"), get("higher"), get("torch_func")
            b16, f32 = get("batched", "bf16", pair), get("batched", "fp32", pair)
            if not b:
                continue
            notes += [f"{c['method']} ({model}, {a}): error: {c['error']}" for c in (s, h, f) if c.get("error")]
            if f.get("over_tasks"):
                notes.append(f"torch_func ({model}, {a}): {f['over_tasks']}")
            lines.append("| " + " | ".join([
                model, f"{a} ({main})", fmt(b.get("tasks_per_s")), fmt(s.get("tasks_per_s")), fmt(h.get("tasks_per_s")),
                fmt(f.get("tasks_per_s")), fmt(ratio(b.get("tasks_per_s"), s.get("tasks_per_s")), ".2f"),
                fmt(ratio(b.get("tasks_per_s"), h.get("tasks_per_s")), ".2f"),
                fmt(ratio(b.get("tasks_per_s"), f.get("tasks_per_s")), ".2f"), fmt(b.get("tokens_per_s"), ".0f"),
                fmt(b.get("mfu"), ".1%"), fmt(b16.get("mfu"), ".1%"),
                f"{fmt(b16.get('tasks_per_s'))} ({pair})" if b16 else "–",
                fmt(ratio(b16.get("tasks_per_s"), f32.get("tasks_per_s")), ".2f")]) + " |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    if report.get("peers_not_run"):
        lines += ["", "Not run: " + " ".join(report["peers_not_run"].values())]
    fw = report["framework"]
    if fw.get("launches"):
        lines += ["", f"Framework overhead ({fw['model']}, fomaml, meta-batch {META_BATCH}, the worker loop's own "
                      f"step_time_s; the meta-step alone, in-process: {fw['plain_torch_step_s']:.3f} s):", "",
                  "| launcher | workers | threads/worker | step s (median) | tasks/s | overhead vs the meta-step |",
                  "|---|---|---|---|---|---|"]
        for e in fw["launches"]:
            lines.append(f"| {e['launcher']} | {e['workers']} | {e['threads_per_worker']} | {fmt(e.get('median_s'))} "
                         f"| {fmt(e.get('tasks_per_s'))} | {fmt(e.get('overhead_vs_plain_torch'), '+.0%')} |"
                         + (f" error: {e['error']}" if e.get("error") else ""))
    if report["memory"]:
        model, size = report["memory"][0]["model"], report["memory"][0].get("meta_batch")
        orders = [o for o, _, _ in MEMORY_ORDERS if any(m["order"] == o for m in report["memory"])]  # as run
        load_peak = max((m.get("peak_rss_mb", 0.0) for m in report["memory"]), default=0.0)
        lines += ["", f"Peak RSS during one batched meta-step, MB ({model}, meta-batch {size}, in a fresh process; "
                      f"in brackets the growth during the step; the process peak, model loading included, was "
                      f"{load_peak:.0f} MB):", "",
                  "| inner steps | " + " | ".join(MEMORY_HEADERS[o] for o in orders) + " |",
                  "|---" * (len(orders) + 1) + "|"]
        for k in sorted({m["inner_steps"] for m in report["memory"]}):
            cells = []
            for order in orders:
                m = next((x for x in report["memory"] if x["inner_steps"] == k and x["order"] == order), {})
                cells.append(f"{fmt(m.get('step_peak_rss_mb', m.get('peak_rss_mb')), '.0f')} "
                             f"(+{fmt(m.get('step_growth_mb'), '.0f')})"
                             if "peak_rss_mb" in m else f"error: {m.get('error', '–')}")
            lines.append(f"| {k} | {' | '.join(cells)} |")
    profiled = [c for c in configs if c.get("gpu_profile")]
    if profiled:
        lines += ["", "Where a GPU step's time goes (one batched step under torch.profiler, CPU + CUDA):", "",
                  "| model | algorithm | precision | T | step s (timed) | step s (profiled) | GPU kernel time s | "
                  "GPU busy | kernel launches |", "|---|---|---|---|---|---|---|---|---|"]
        for c in profiled:
            g = c["gpu_profile"]
            lines.append(f"| {c['model']} | {c['algorithm']} | {c['precision']} | {c['meta_batch']} | "
                         f"{fmt(c.get('median_s'))} | {fmt(g['wall_s'])} | {fmt(g['gpu_busy_s'])} | "
                         f"{fmt(g['gpu_busy_share'], '.0%')} | {g['kernel_launches']} |")
    peak, load = report["peak"], report["load_avg"]
    machine = report["machine"]
    bf16 = ", ".join(machine["bf16_instructions"]) or "none"
    lines += ["", f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} (CPU capability "
                  f"{machine['cpu_capability']}; bf16 instructions: {bf16})."]
    where = f"{report['machine']['threads']} threads"
    if machine.get("gpu"):
        plan = report["plan"]
        where = f"on the GPU, TF32 {'on' if peak['measurements'][0].get('tf32') else 'off'}"
        lines += ["", f"GPU: {machine['gpu']} ({machine['gpu_memory_gb']} GiB, {machine['multiprocessors']} SMs, "
                      f"CUDA {machine['cuda']}); every step on it: DeepSpeed ZeRO-{plan['zero_stage']}, nccl, "
                      f"{plan['inner_steps']} inner steps; models: "
                      + "; ".join(f"{m['label']} from {m['path']}" for m in plan["models"]) + "."]
    lines += ["", f"Matmul peak (torch.mm, {where}): fp32 "
                  f"{peak['fp32_gflops']:.1f} GFLOP/s, bf16 {peak['bf16_gflops']:.1f} GFLOP/s. "
                  f"Load average before/after: {', '.join(f'{x:.2f}' for x in load['before'])} / "
                  f"{', '.join(f'{x:.2f}' for x in load['after'])}."]
    targets = report.get("targets", {})
    if targets:
        lines += ["", "| target | goal | value | met |", "|---|---|---|---|"]
        for name, t in targets.items():
            lines.append(f"| {name} | {t['target']} | {fmt(t['value'])} | "
                         f"{'–' if t['met'] is None else ('yes' if t['met'] else 'no')} |")
        lines += [f"\n{name} not measured: {t['not_measured']}."
                  for name, t in targets.items() if t.get("not_measured")]
    return "\n".join(lines) + "\n"
