"""Timing one configuration (warm-up with FLOP count, then a median of steps) and profiling one step."""

from __future__ import annotations

import contextlib
import statistics
import time


def measure(step, steps: int, budget_s: float, count_flops: bool = False, warmup: bool = True,
            expected_s: float | None = None) -> dict:
    """A warm-up step (untimed; it counts FLOPs when asked), then up to ``steps`` timed steps within ``budget_s``.

    Without ``warmup`` (long steps on an already warm model) the step count comes from ``expected_s``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    flops, warm = None, None
    if warmup:
        t = time.perf_counter()
        with FlopCounterMode(display=False) if count_flops else contextlib.nullcontext() as counter:
            step()
        warm = time.perf_counter() - t
        flops = int(counter.get_total_flops()) if count_flops else None
    n = max(1, min(steps, int(budget_s // max(warm or expected_s or budget_s, 1e-6))))
    times, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"warmup_s": warm, "step_s": times, "cpu_s": cpu, "median_s": statistics.median(times), "flops": flops}


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::addmm_", "aten::_mkldnn_linear")


def profile_step(step) -> dict:
    """Op-time shares of one step (torch.profiler, self CPU time of the calling thread)."""
    from torch.profiler import ProfilerActivity, profile

    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        step()
    wall = time.perf_counter() - t
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    mm = [e for e in events if e.key in MATMUL_OPS]
    mm_time = sum(e.self_cpu_time_total for e in mm)
    mm_flops = sum(e.flops or 0 for e in mm)

    def share(keys) -> float:
        return sum(e.self_cpu_time_total for e in events if any(k in e.key for k in keys)) / total

    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return {"wall_s": wall, "ops_s": total / 1e6, "op_calls": sum(e.count for e in events),
            "matmul_share": mm_time / total,
            "matmul_gflops": mm_flops / max(mm_time, 1e-9) / 1e3,
            "attention_share": share(("scaled_dot_product", "attention", "softmax")),
            "copy_cast_share": share(("aten::copy_", "aten::_to_copy")),
            "top_ops": [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 4), "calls": e.count}
                        for e in top]}


LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def profile_gpu_step(step) -> dict:
    """Where a GPU step's wall time goes (torch.profiler, CPU and CUDA): the summed kernel time against the
    step's wall time under the profiler. A busy share far below 1 means the GPU waits for the host, which
    launches the kernels one Python op at a time."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        step()  # ends with a synchronize: the wall time is the step's, without the profiler's trace flush
        wall = time.perf_counter() - t
    events = prof.key_averages()
    device_us = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)  # noqa: E731
    # the kernels themselves: a CPU op (aten::mm) also carries its kernels' device time, which would count twice
    kernels = [e for e in events if e.device_type != DeviceType.CPU and device_us(e) > 0]
    busy = sum(device_us(e) for e in kernels) / 1e6
    top = sorted(kernels, key=lambda e: -device_us(e))[:5]
    return {"wall_s": wall, "gpu_busy_s": busy, "gpu_busy_share": busy / wall,
            "kernel_launches": sum(e.count for e in events if e.key in LAUNCHES),
            "top_kernels": [{"op": e.key[:80], "device_s": round(device_us(e) / 1e6, 4), "calls": e.count}
                            for e in top]}
