"""The ``torch_func`` baseline: the meta-step as a ``torch.func`` expert writes it by hand.

On :class:`~.baselines.PlainMetaModel` (the MetaModel's math as an ordinary module): the model runs
through ``torch.func.functional_call`` with the adapted factors as a dict of fast weights, the inner
loop takes each task's gradient with ``torch.func.grad``, and ``torch.func.vmap`` maps one episode
(inner loop on the support set, loss on the query set) over the tasks of the meta-batch. The outer
gradient is ordinary autograd through all of it: second order where the algorithm is (MAML eq. 1,
Finn et al. 2017), first order (the inner gradients detached) where it is not. Where vmap cannot run
an op of the model (data-dependent control flow), the same episode runs in a loop over tasks.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from metaprep.bench.throughput.baselines import PlainMetaModel
from metaprep.tasks.base import TaskBatch

FastDict = dict[str, torch.Tensor]  # parameter name in plain.lm -> its fast weight (task dimension of 1)


def causal_mask(mask: torch.Tensor, attention: str, dtype: torch.dtype) -> torch.Tensor:
    """(n, L) padding mask -> the (n, 1, L, L) mask of ``attention``: boolean (attend) for SDPA, additive for eager.

    Built here and passed to the model as a prepared 4D mask: transformers' own SDPA mask asks whether
    the padding mask is all ones (a data-dependent branch, which vmap cannot run).
    """
    length = mask.shape[-1]
    allowed = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril() & mask.bool()[:, None, None, :]
    if attention == "sdpa":
        return allowed
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


def task_loss(plain: PlainMetaModel, fast: FastDict, arch: torch.Tensor | None, ids: torch.Tensor,
              mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One task's mean next-token loss on its target tokens; ``ids`` (n, L), ``arch`` (layers, edges, ops).

    The loss of :func:`~metaprep.meta.model.lm_task_losses` without its boolean indexing of target
    positions (a data-dependent shape, which vmap cannot batch): cross entropy at every position with
    the non-targets ignored.
    """
    lm = plain.lm
    mask4d = causal_mask(mask, lm.config._attn_implementation, lm.get_input_embeddings().weight.dtype)
    with plain.holder.use(None, None if arch is None else arch.unsqueeze(0), 1):
        logits = functional_call(lm, fast, args=(),
                                 kwargs={"input_ids": ids, "attention_mask": mask4d, "use_cache": False},
                                 strict=False).logits
    targets = labels[:, 1:]
    total = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=-100, reduction="sum")
    return total / (targets != -100).sum().clamp_min(1)


def episode(plain: PlainMetaModel, fast: FastDict, inner_arch: torch.Tensor | None, arch: torch.Tensor | None,
            support: tuple[torch.Tensor, ...], query: tuple[torch.Tensor, ...], steps: int, lr: float,
            second_order: bool) -> torch.Tensor:
    """One task: ``steps`` SGD steps of its fast weights on its support set, then its query loss."""
    for _ in range(steps):
        g = grad(task_loss, argnums=1)(plain, fast, inner_arch, *support)
        if not second_order:  # first order: the inner gradients are constants (FOMAML, MLtD's default)
            g = {k: v.detach() for k, v in g.items()}
        fast = {k: w - lr * g[k] for k, w in fast.items()}
    return task_loss(plain, fast, arch, *query)


def meta_losses(plain: PlainMetaModel, support: TaskBatch, query: TaskBatch, tau: float, steps: int, lr: float,
                second_order: bool, use_vmap: bool = True) -> torch.Tensor:
    """Per-task query losses (T,) after adaptation, differentiable w.r.t. every parameter of ``plain``.

    ``use_vmap``: one vmapped episode over the tasks, else a loop over tasks of the same episode.
    """
    names = {id(p) for p in plain.fast}
    fast = {n: p for n, p in plain.lm.named_parameters() if id(p) in names}
    arch = plain.architecture(support, tau=tau, sample=True)  # (T, layers, edges, ops), or None without TAMS
    # first order: nothing differentiates through the inner loop, so α is a constant there (as adapt_then_query)
    inner_arch = arch if arch is None or second_order else arch.detach()
    tensors = (inner_arch, arch, support.input_ids, support.attention_mask, support.labels,
               query.input_ids, query.attention_mask, query.labels)

    def one(inner_a, a, s_ids, s_mask, s_labels, q_ids, q_mask, q_labels):
        return episode(plain, fast, inner_a, a, (s_ids, s_mask, s_labels), (q_ids, q_mask, q_labels), steps, lr,
                       second_order)

    if use_vmap:
        with warnings.catch_warnings():  # ops without a batching rule (CPU flash attention) run per task, as designed
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            return vmap(one, in_dims=tuple(None if t is None else 0 for t in tensors))(*tensors)
    return torch.stack([one(*(None if t is None else t[i] for t in tensors)) for i in range(support.num_tasks)])
