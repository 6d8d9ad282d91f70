"""One configuration of the suite: a learner on a fresh copy of the base, its DeepSpeed engine, one meta-batch.

Its three methods each take one full meta-step (forward, backward, clipping, AdamW):

* :meth:`Setup.batched` — :func:`metaprep.train.step.meta_step`, the outer step the worker loop trains
  with (one engine forward over the whole meta-batch).
* :meth:`Setup.sequential` — the same engine and learner with T = 1 per task in a Python loop: the
  per-task losses are summed, then one ``engine.backward`` and one ``engine.step``. (With gradient
  accumulation 1, DeepSpeed's ZeRO optimizer replaces rather than adds gradients on each
  ``backward``, so one backward of the summed losses is how the loop gets the meta-batch's gradient.)
* :meth:`Setup.higher` — ``higher`` 's ``innerloop_ctx`` on :class:`~.baselines.PlainMetaModel`, one task
  at a time, with torch AdamW and gradient clipping (:meth:`Setup.finish`).
"""

from __future__ import annotations

import copy

import torch

from metaprep.bench.throughput.baselines import PlainMetaModel
from metaprep.bench.throughput.plan import ModelPlan, meta_config
from metaprep.config import MetaTrainConfig
from metaprep.meta.build import build_learner, build_meta_model, needs_eager_attention
from metaprep.meta.model import lm_task_losses
from metaprep.models.base import LoadedModel
from metaprep.search.task_encoder import task_encoder
from metaprep.tasks.families import batch_encoder
from metaprep.train.local import ensure_process_group
from metaprep.train.loop import load_split
from metaprep.train.step import MetaBatches, autocast, make_engine, meta_step


def variant(cfg: MetaTrainConfig, precision: str, meta_batch: int) -> MetaTrainConfig:
    """``cfg`` in another precision and meta-batch size (what :func:`meta_step` reads of it)."""
    out = copy.deepcopy(cfg)
    out.distributed.precision, out.meta.meta_batch_size = precision, meta_batch
    return out


class Setup:
    """A :class:`~metaprep.meta.build.MetaLearner` (fresh copy of the base), its engine and one fixed meta-batch."""

    def __init__(self, model: ModelPlan, algorithm: str, inner_steps: int, base: LoadedModel) -> None:
        ensure_process_group()  # DeepSpeed needs a process group, of one here
        self.cfg = meta_config(model, algorithm, inner_steps)
        lm = copy.deepcopy(base.model)
        self.model, _ = build_meta_model(self.cfg, LoadedModel(lm, base.tokenizer, base.kind, base.source))
        self.base = base
        split = load_split(self.cfg)
        self.learner = build_learner(self.cfg, self.model, num_train_tasks=len(split.train))
        self.engine = make_engine(self.cfg, self.learner)
        batches = MetaBatches(self.cfg, split.train, batch_encoder(self.cfg.tasks.family, task_encoder(self.cfg)),
                               base.tokenizer)
        self.support, self.query = batches(0)  # meta-batch 0 of the run, as the worker loop draws it
        self.second_order = self.cfg.second_order
        self._use(self.support.num_tasks)
        self._plain: PlainMetaModel | None = None

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
        return other

    def prepare(self, method: str) -> None:
        """Build what a method needs outside the timed steps (the plain model of ``higher``)."""
        if method == "higher" and self._plain is None:
            lm = copy.deepcopy(self.base.model)
            if self.second_order:
                lm.set_attn_implementation("eager")  # as build_meta_model: CPU flash-SDPA has no double backward
            self._plain = PlainMetaModel(lm, self.model, self.cfg.search)
            m = self.cfg.meta
            self._plain_params = [p for p in self._plain.parameters() if p.requires_grad]
            self._plain_opt = torch.optim.AdamW(self._plain_params, lr=m.outer_lr, weight_decay=m.weight_decay)
            self._inner_opt = torch.optim.SGD(self._plain.fast, lr=m.inner_lr)
            fast_ids = {id(p) for p in self._plain.fast}
            self._lm_params = list(self._plain.lm.parameters())
            self._fast_index = [i for i, p in enumerate(self._lm_params) if id(p) in fast_ids]

    def finish(self, params: list[torch.Tensor], opt: torch.optim.Optimizer) -> None:
        """The ``higher`` baseline's outer update (the engine's, done by hand): clip, AdamW step, zero."""
        if self.cfg.meta.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.meta.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _attention(self, precision: str) -> None:
        """The attention a run in ``precision`` builds (:func:`~metaprep.meta.build.needs_eager_attention`)."""
        self.model.lm.set_attn_implementation("eager" if needs_eager_attention(self.cfgs[precision]) else "sdpa")

    def batched(self, precision: str = "fp32") -> None:
        self._attention(precision)
        meta_step(self.engine, self.cfgs[precision], self.support, self.query, 0)

    def sequential(self, precision: str = "fp32") -> None:
        cfg = self.cfgs[precision]
        self._attention(precision)
        total = 0.0
        for i in range(self.support.num_tasks):
            with autocast(cfg):
                losses, _ = self.engine(self.support.select([i]), self.query.select([i]), 0)
            total = total + losses.float().sum()
        self.engine.backward(total / cfg.meta.meta_batch_size)
        self.engine.step()

    def higher(self, precision: str = "fp32") -> None:
        import higher

        self.prepare("higher")
        plain, cfg = self._plain, self.cfgs[precision]
        tau = self.learner.algorithm.tau.at(0)
        for i in range(self.support.num_tasks):
            support, query = self.support.select([i]), self.query.select([i])
            with autocast(cfg):
                plain.holder.arch = plain.architecture(support, tau=tau, sample=True)
                with higher.innerloop_ctx(plain.lm, self._inner_opt, copy_initial_weights=False,
                                          track_higher_grads=self.second_order) as (fmodel, diffopt):
                    for _ in range(cfg.meta.inner_steps):
                        diffopt.step(lm_task_losses(fmodel, support, head_at_targets=False).sum())
                    loss = lm_task_losses(fmodel, query, head_at_targets=False).float().sum() / cfg.meta.meta_batch_size
            loss.backward()
            if not self.second_order:  # first order: adapted factors are detached leaves
                self._add_first_order_grads(fmodel.fast_params)
            plain.holder.arch = None
        self.finish(self._plain_params, self._plain_opt)

    def _add_first_order_grads(self, final: list[torch.Tensor]) -> None:
        for index in self._fast_index:
            grad, param = final[index].grad, self._lm_params[index]
            if grad is not None:
                param.grad = grad.clone() if param.grad is None else param.grad + grad

