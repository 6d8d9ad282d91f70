"""One configuration of the suite: a learner on a fresh copy of the base, its DeepSpeed engine, one meta-batch.

Its four methods each take one full meta-step (forward, backward, clipping, AdamW):

* :meth:`Setup.batched` — :func:`metaprep.train.step.meta_step`, the outer step the worker loop trains
  with (one engine forward over the whole meta-batch).
* :meth:`Setup.sequential` — the same engine and learner with T = 1 per task in a Python loop: the
  per-task losses are summed, then one ``engine.backward`` and one ``engine.step``. (With gradient
  accumulation 1, DeepSpeed's ZeRO optimizer replaces rather than adds gradients on each
  ``backward``, so one backward of the summed losses is how the loop gets the meta-batch's gradient.)
* :meth:`Setup.higher` — ``higher`` 's ``innerloop_ctx`` on :class:`~.baselines.PlainMetaModel`, one task
  at a time, with torch AdamW and gradient clipping (:meth:`Setup.finish`).
* :meth:`Setup.torch_func` — :func:`.functional.meta_losses` (``torch.func``: ``functional_call``, ``grad``,
  ``vmap`` over tasks) on its own :class:`~.baselines.PlainMetaModel`, then the same outer update.

The baselines (``higher``, ``torch_func``) copy the learner's current weights when prepared, and
:meth:`Setup.check` compares their per-task losses and meta-gradient with the production step's
(:meth:`Setup.outputs`); a mismatch raises :class:`OutputMismatch`.
"""

from __future__ import annotations

import copy
import re
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from metaprep.bench.throughput.baselines import PlainMetaModel, learner_names
from metaprep.bench.throughput.functional import meta_losses
from metaprep.bench.throughput.plan import ModelPlan, meta_config
from metaprep.config import MetaTrainConfig
from metaprep.meta.build import build_learner, build_meta_model, needs_eager_attention
from metaprep.meta.model import lm_task_losses
from metaprep.models.base import LoadedModel
from metaprep.tasks.families import batch_encoder_for
from metaprep.train.local import ensure_process_group
from metaprep.train.loop import load_split
from metaprep.train.step import MetaBatches, autocast, autocast_dtype, make_engine, meta_step

BASELINES = ("higher", "torch_func")  # methods on their own PlainMetaModel, checked against batched when prepared
# A baseline's outputs equal the production step's when every gradient (and the losses) is within this
# fraction of its largest entry: fp32 sums in another order (full logits vs target rows, per-task vs batched
# matmuls, the tied embedding's rows) differed by at most 2e-5 of the scale on stories260K (every algorithm,
# sequential, higher and torch_func); a wrong or missing term is of the order of the scale.
CHECK_RTOL = 1e-4


class OutputMismatch(AssertionError):
    """A baseline's losses or meta-gradient differ from the production step's: its timing would not compare."""


@dataclass
class Baseline:
    """A baseline's model (a plain copy of the learner's weights), its outer AdamW and how it reads gradients."""

    plain: PlainMetaModel
    params: list[nn.Parameter]  # trainable parameters of ``plain``
    opt: torch.optim.Optimizer  # the outer AdamW (the engine's, done by hand)
    names: dict[str, str]  # parameter of ``plain`` -> the learner parameter it copies
    inner_opt: torch.optim.Optimizer | None = None  # higher: the SGD that innerloop_ctx makes differentiable
    fast_index: list[int] = field(default_factory=list)  # higher: positions of the fast weights in lm.parameters()
    over_tasks: str | None = None  # torch_func: how its episode maps over tasks (decided by the first step)


def variant(cfg: MetaTrainConfig, precision: str, meta_batch: int) -> MetaTrainConfig:
    """``cfg`` in another precision and meta-batch size (what :func:`meta_step` reads of it)."""
    out = copy.deepcopy(cfg)
    out.distributed.precision, out.meta.meta_batch_size = precision, meta_batch
    return out


class Setup:
    """A :class:`~metaprep.meta.build.MetaLearner` (fresh copy of the base), its engine and one fixed meta-batch."""

    def __init__(self, model: ModelPlan, algorithm: str, inner_steps: int, base: LoadedModel,
                 inner_checkpointing: bool = False, device: str = "cpu", zero_stage: int = 1) -> None:
        self.cfg = meta_config(model, algorithm, inner_steps, inner_checkpointing=inner_checkpointing,
                               device=device, zero_stage=zero_stage)
        ensure_process_group(self.cfg.distributed.device)  # DeepSpeed needs a process group, of one here
        lm = copy.deepcopy(base.model)
        self.model, _ = build_meta_model(self.cfg, LoadedModel(lm, base.tokenizer, base.kind, base.source))
        self.base = base
        split = load_split(self.cfg)
        self.learner = build_learner(self.cfg, self.model, num_train_tasks=len(split.train))
        self.engine = make_engine(self.cfg, self.learner)
        batches = MetaBatches(self.cfg, split.train, batch_encoder_for(self.cfg),
                               base.tokenizer)
        # meta-batch 0 of the run, as the worker loop draws it, on the engine's device
        self.support, self.query = batches(0, self.engine.device)
        self.second_order = self.cfg.second_order
        self._use(self.support.num_tasks)
        self._baselines: dict[str, Baseline] = {}

    def _use(self, num_tasks: int) -> None:
        self.meta_batch = num_tasks
        self.cfgs = {p: variant(self.cfg, p, num_tasks) for p in ("fp32", "bf16")}
        self.tokens = int(self.support.attention_mask.sum() + self.query.attention_mask.sum())
        self.rows = (self.support.input_ids.numel(), self.query.input_ids.numel())  # padded tokens

    def subset(self, num_tasks: int) -> Setup:
        """The same learner and engine on the first ``num_tasks`` tasks (a run with meta-batch ``num_tasks``)."""
        other = copy.copy(self)
        idx = list(range(num_tasks))
        other.support, other.query = self.support.select(idx), self.query.select(idx)
        other._use(num_tasks)
        other._baselines = {}  # each job prepares (and checks) its own
        return other

    def prepare(self, method: str) -> None:
        """Build what a method needs outside the timed steps: a baseline's model, a copy of the learner's current
        weights, checked against the production step (:meth:`check`, raises :class:`OutputMismatch`)."""
        if method in BASELINES:
            self._baselines[method] = self._baseline(method)
            self.check(method)

    def _baseline(self, method: str) -> Baseline:
        lm = copy.deepcopy(self.base.model)
        lm.load_state_dict(self.model.lm.state_dict())  # ReparamLinear keeps the base's keys; TAMS cells are hooks
        if self.second_order:
            lm.set_attn_implementation("eager")  # as build_meta_model: CPU flash-SDPA has no double backward
        plain = PlainMetaModel(lm, self.model, self.cfg.search)
        m = self.cfg.meta
        params = [p for p in plain.parameters() if p.requires_grad]
        out = Baseline(plain, params, torch.optim.AdamW(params, lr=m.outer_lr, weight_decay=m.weight_decay),
                       learner_names(plain))
        if method == "higher":
            out.inner_opt = torch.optim.SGD(plain.fast, lr=m.inner_lr)
            fast_ids = {id(p) for p in plain.fast}
            out.fast_index = [i for i, p in enumerate(plain.lm.parameters()) if id(p) in fast_ids]
        return out

    def over_tasks(self, method: str) -> str | None:
        """How a baseline's episode mapped over the tasks (torch_func: vmap, or why a loop), once it has run."""
        return self._baselines[method].over_tasks if method in self._baselines else None

    def _get(self, method: str) -> Baseline:
        if method not in self._baselines:
            self.prepare(method)
        return self._baselines[method]

    def finish(self, method: str) -> None:
        """A baseline's outer update (the engine's, done by hand): clip, AdamW step, zero."""
        b = self._baselines[method]
        if self.cfg.meta.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(b.params, self.cfg.meta.grad_clip)
        b.opt.step()
        b.opt.zero_grad(set_to_none=True)

    def _attention(self, precision: str) -> None:
        """The attention a run in ``precision`` builds (:func:`~metaprep.meta.build.needs_eager_attention`)."""
        self.model.lm.set_attn_implementation("eager" if needs_eager_attention(self.cfgs[precision]) else "sdpa")

    # ------------------------------------------------------------------ the timed meta-steps
    def batched(self, precision: str = "fp32") -> None:
        self._attention(precision)
        meta_step(self.engine, self.cfgs[precision], self.support, self.query, 0)

    def sequential(self, precision: str = "fp32") -> None:
        self._sequential_backward(precision)
        self.engine.step()

    def higher(self, precision: str = "fp32") -> None:
        self._higher_backward(precision)
        self.finish("higher")

    def torch_func(self, precision: str = "fp32") -> None:
        self._torch_func_backward(precision)
        self.finish("torch_func")

    # ------------------------------------------------------------------ forward and backward of each method
    def _batched_backward(self, precision: str) -> torch.Tensor:
        """:func:`~metaprep.train.step.meta_step` without its optimizer step (ZeRO-1 or 2: no gathering to hold)."""
        cfg = self.cfgs[precision]
        self._attention(precision)
        losses, _ = self.engine(self.support, self.query, 0, autocast_dtype(cfg))
        self.engine.backward(losses.float().sum() / cfg.meta.meta_batch_size)
        return losses

    def _sequential_backward(self, precision: str) -> torch.Tensor:
        cfg = self.cfgs[precision]
        self._attention(precision)
        losses = []
        for i in range(self.support.num_tasks):
            loss, _ = self.engine(self.support.select([i]), self.query.select([i]), 0, autocast_dtype(cfg))
            losses.append(loss.float())
        losses = torch.cat(losses)
        self.engine.backward(losses.sum() / cfg.meta.meta_batch_size)
        return losses

    def _higher_backward(self, precision: str) -> torch.Tensor:
        import higher

        b, cfg = self._get("higher"), self.cfgs[precision]
        plain = b.plain
        tau = self.learner.algorithm.tau.at(0)
        losses = []
        for i in range(self.support.num_tasks):
            support, query = self.support.select([i]), self.query.select([i])
            with autocast(cfg):
                plain.holder.arch = plain.architecture(support, tau=tau, sample=True)
                with higher.innerloop_ctx(plain.lm, b.inner_opt, copy_initial_weights=False,
                                          track_higher_grads=self.second_order) as (fmodel, diffopt):
                    for _ in range(cfg.meta.inner_steps):
                        diffopt.step(lm_task_losses(fmodel, support, head_at_targets=False).sum())
                    loss = lm_task_losses(fmodel, query, head_at_targets=False).float()
            (loss.sum() / cfg.meta.meta_batch_size).backward()
            losses.append(loss.detach())
            if not self.second_order:  # first order: adapted factors are detached leaves
                self._add_first_order_grads(b, fmodel.fast_params)
            plain.holder.arch = None
        return torch.cat(losses)

    def _add_first_order_grads(self, b: Baseline, final: list[torch.Tensor]) -> None:
        params = list(b.plain.lm.parameters())
        for index in b.fast_index:
            grad, param = final[index].grad, params[index]
            if grad is not None:
                param.grad = grad.clone() if param.grad is None else param.grad + grad

    def _torch_func_backward(self, precision: str) -> torch.Tensor:
        b, cfg = self._get("torch_func"), self.cfgs[precision]
        m = cfg.meta
        args = (b.plain, self.support, self.query, self.learner.algorithm.tau.at(0), m.inner_steps, m.inner_lr,
                self.second_order)
        if b.over_tasks is None:  # the first step decides: vmap, else (an op vmap cannot run) a loop over tasks
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with autocast(cfg):
                        losses = meta_losses(*args, use_vmap=True)
                    (losses.sum() / m.meta_batch_size).backward()
                    b.over_tasks = "vmap" + _fallback_ops(caught)
                    return losses.detach()
                except RuntimeError as exc:
                    if "vmap" not in str(exc) and "atching rule" not in str(exc):
                        raise
                    b.plain.zero_grad(set_to_none=True)
                    b.over_tasks = f"loop over tasks: vmap cannot run {_reason(exc)} at {_origin(exc)}"
        with autocast(cfg):
            losses = meta_losses(*args, use_vmap=b.over_tasks.startswith("vmap"))
        (losses.sum() / m.meta_batch_size).backward()
        return losses.detach()

    # ------------------------------------------------------------------ checking the baselines
    def outputs(self, method: str, precision: str = "fp32") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``method`` 's per-task losses (T,) and meta-gradient (by learner parameter name), without its update."""
        losses = getattr(self, f"_{method}_backward")(precision).detach().float()
        if method in BASELINES:
            b = self._baselines[method]
            grads = {b.names[n]: p.grad.clone() for n, p in b.plain.named_parameters() if p.grad is not None}
            b.opt.zero_grad(set_to_none=True)
            return losses, grads
        from deepspeed.utils import safe_get_full_grad

        grads = {n: safe_get_full_grad(p) for n, p in self.learner.named_parameters() if p.requires_grad}
        return losses, {n: g.clone() for n, g in grads.items() if g is not None}

    def check(self, method: str, precision: str = "fp32") -> None:
        """Raise :class:`OutputMismatch` unless ``method`` computes the production step's losses and meta-gradient.

        The reference is :meth:`outputs` of ``batched``: an engine forward and backward (its gradients are
        replaced by the next backward, so the timed steps are unaffected).
        """
        ref_losses, ref_grads = self.outputs("batched", precision)
        losses, grads = self.outputs(method, precision)
        where = f"{method} vs batched ({self.cfg.algorithm}, T={self.meta_batch}, {precision})"
        problems = [_differs("per-task losses", losses, ref_losses)]
        for name, p in self.learner.named_parameters():
            if p.requires_grad:
                ref = ref_grads.get(name, torch.zeros(p.shape))
                problems.append(_differs(f"gradient of {name}", grads.get(name, torch.zeros_like(ref)), ref))
        problems = [p for p in problems if p]
        if problems:
            raise OutputMismatch(f"{where}: {len(problems)} outputs differ; first: {problems[0]}")


def _differs(what: str, got: torch.Tensor, ref: torch.Tensor) -> str | None:
    """Why ``got`` is not ``ref`` within :data:`CHECK_RTOL` of ``ref`` 's largest entry, or None."""
    got, ref = got.float().reshape(ref.shape), ref.float()
    err, scale = float((got - ref).abs().max()), float(ref.abs().max())
    if err <= CHECK_RTOL * scale or err == 0.0:
        return None
    return f"{what}: max |difference| {err:.3g}, max |batched| {scale:.3g}"


def _fallback_ops(caught: list[warnings.WarningMessage]) -> str:
    """The ops vmap ran one task at a time (functorch's fallback for ops without a batching rule), if any."""
    ops = sorted({m.group(1) for w in caught if (m := re.search(r"batching rule for (aten::\w+)", str(w.message)))})
    return f"; per task inside vmap (no batching rule): {', '.join(ops)}" if ops else ""


def _reason(exc: RuntimeError) -> str:
    msg = str(exc)
    return "a data-dependent branch or .item()" if "data-dependent control flow" in msg else msg.splitlines()[0][:160]


def _origin(exc: BaseException) -> str:
    """Where in the model an exception arose: the innermost frame outside torch, as ``package/file.py:line``."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return "an op"
    f = frames[-1]
    parts = Path(f.filename).parts
    start = max((i for i, p in enumerate(parts) if p in ("metaprep", "transformers")), default=len(parts) - 1)
    return f"{'/'.join(parts[start:])}:{f.lineno} ({f.name})"
