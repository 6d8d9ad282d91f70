"""Activation checkpointing of the decoder layers, fast weights included (issue 17, goal 5).

Each decoder layer keeps only its inputs; its activations are recomputed when backward needs them.
The layer reads its fast weights and TAMS architecture from the shared
:class:`~metaprep.reparam.context.FastContext`, which the inner loop sets only while its forward runs,
so the recomputation restores the context the forward saw. The fast weights are captured tensors of
the recomputed graph, so their gradients, and with ``create_graph`` the second-order terms of MAML and
MLtD, flow exactly as without checkpointing (PyTorch's non-reentrant checkpoint supports
``torch.autograd.grad`` and double backward; ``tests/test_fast_paths.py`` compares gradients).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from metaprep.reparam.context import FastContext


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The blocks of a causal LM's stack: the largest ``nn.ModuleList`` (``model.layers``, ``transformer.h``)."""
    lists = [m for m in lm.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def checkpoint_decoder_layers(lm: nn.Module, ctx: FastContext) -> int:
    """Wrap the forward of every decoder layer in a non-reentrant checkpoint; returns how many.

    The module tree (and so every state-dict key) is unchanged: only the instance's ``forward`` is
    replaced. Without grad (evaluation) the layer runs as is.
    """
    layers = decoder_layers(lm)
    for layer in layers:
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            state = (ctx.fast, ctx.arch, ctx.num_tasks)

            def run(*inputs):
                with ctx.use(*state):
                    return _forward(*inputs, **kwargs)

            return checkpoint(run, *args, use_reentrant=False)

        layer.forward = checkpointed
    return len(layers)
