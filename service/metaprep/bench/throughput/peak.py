"""The machine: CPU description and the measured fp32 / bf16 matmul peak the MFU is relative to."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def best_time(fn, min_time: float) -> float:
    """Shortest of repeated calls of ``fn`` (after one untimed call), for at least ``min_time`` s (at most 4x)."""
    fn()
    best, spent = float("inf"), 0.0
    while spent < min_time or best == float("inf"):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
        if spent > 4 * min_time:
            break
    return best


def mm_gflops(dtype: torch.dtype, n: int, min_time: float, transposed: bool = False) -> float:
    """Best-of ``torch.mm`` GFLOP/s for n x n operands; ``transposed``: B column-major (nn.Linear's layout)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    if transposed:
        b = b.t()
    return 2 * n**3 / best_time(lambda: torch.mm(a, b), min_time) / 1e9


def linear_gflops(rows: int, c_in: int, c_out: int, bf16: bool, min_time: float) -> float:
    """F.linear at a model's own shape, under bf16 autocast or in fp32 (what the model runs)."""
    x, w = torch.randn(rows, c_in), torch.randn(c_out, c_in)
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        best = best_time(lambda: F.linear(x, w), min_time)
    return 2 * rows * c_in * c_out / best / 1e9


def matmul_peak(quick: bool) -> dict:
    """Best ``torch.mm`` GFLOP/s over square sizes and both layouts of B, fp32 and bf16, at the current threads.

    Both layouts matter on CPUs without bf16 instructions: a row-major bf16 B takes a far slower
    path than the column-major B of ``nn.Linear`` (``x @ W.T``).
    """
    min_time = 0.2 if quick else 0.6
    out: dict = {}
    for dtype, sizes in (("fp32", (512, 1024) if quick else (512, 1024, 2048)), ("bf16", (256, 512))):
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        table = {f"{n}{'T' if tr else ''}": mm_gflops(torch_dtype, n, min_time, tr)
                 for n in sizes for tr in (False, True)}
        out[f"{dtype}_gflops"], out[f"{dtype}_by_size"] = max(table.values()), table
    return out


def cuda_mm_gflops(dtype: torch.dtype, n: int, reps: int) -> float:
    """``torch.mm`` GFLOP/s of n x n operands on the current CUDA device (CUDA events, after 3 warm-up calls)."""
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        torch.mm(a, b)
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e9


def cuda_matmul_peak(quick: bool) -> dict:
    """Best ``torch.mm`` GFLOP/s on the GPU over square sizes, fp32 (TF32 as torch's setting, off by default:
    what the fp32 meta-step runs) and bf16."""
    sizes, reps = ((2048, 4096), 5) if quick else ((4096, 8192), 10)
    out: dict = {"tf32": torch.backends.cuda.matmul.allow_tf32}
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        table = {str(n): cuda_mm_gflops(torch_dtype, n, reps) for n in sizes}
        out[f"{dtype}_gflops"], out[f"{dtype}_by_size"] = max(table.values()), table
    return out


def gpu_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(0), "gpu_memory_gb": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda}


def machine_info(threads: int) -> dict:
    lines: list[str] = []
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_instructions": sorted(f for f in flags if "bf16" in f or f.startswith("amx")),
            "avx512": any(f.startswith("avx512") for f in flags)}
