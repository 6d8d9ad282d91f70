"""Meta-gradients: MAML's second-order gradient matches finite differences; FOMAML drops a term."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from metaprep.config import MetaTrainConfig, load_config
from metaprep.meta.build import build_meta_model
from metaprep.meta.inner import inner_loop
from metaprep.tasks.base import make_batch, sample_meta_batch, split_tasks
from metaprep.tasks.families import load_tasks


def _exact_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Llama's eager attention without its float32 softmax upcast, so float64 is float64 throughout."""
    from transformers.models.llama.modeling_llama import repeat_kv

    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


AttentionInterface.register("exact_eager", _exact_attention)


@pytest.fixture(autouse=True)
def _float64_rmsnorm(monkeypatch):
    """LlamaRMSNorm computes in float32 whatever the input; keep float64 for finite differences."""
    from transformers.models.llama import modeling_llama

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)

OVERRIDES = ["model.tiny.dim=16", "model.tiny.hidden_dim=32", "model.tiny.layers=1", "model.tiny.heads=2",
             "tasks.seq_len=12", "reparam.rank=2", "reparam.targets=[q_proj,v_proj,down_proj]"]


def _setup(algorithm: str, kind: str = "lora", optimizer: str = "sgd"):
    cfg = load_config(MetaTrainConfig, None, [*OVERRIDES, f"algorithm={algorithm}", f"reparam.kind={kind}",
                                              f"meta.inner_optimizer={optimizer}"])
    model, loaded = build_meta_model(cfg)
    model.lm.set_attn_implementation("exact_eager")  # twice differentiable, float64 throughout
    model.double()
    split = split_tasks(load_tasks(cfg.tasks), 0.15, 0.15, 1)
    eps = sample_meta_batch(split.train, 2, 4, 4, seed=0, step=0)
    s = make_batch(eps, "support", loaded.tokenizer, cfg.tasks.seq_len)
    q = make_batch(eps, "query", loaded.tokenizer, cfg.tasks.seq_len)
    # start away from the zero init so every term of the meta-gradient is non-trivial (seeded: the
    # result must not depend on the RNG state earlier tests leave behind)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.fast_init.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, s, q


def _meta_objective(model, s, q, create_graph: bool, lr: float = 0.5, steps: int = 2,
                    optimizer: str = "sgd") -> torch.Tensor:
    fast = model.fast_init(s.num_tasks)
    fast, _ = inner_loop(model, s, fast, None, steps, lr, optimizer, create_graph=create_graph)
    return model.task_losses(q, fast, None).sum()


@pytest.mark.parametrize("kind, optimizer", [("lora", "sgd"), ("tarp_bilinear", "sgd"), ("lora", "adam")])
def test_second_order_matches_finite_differences(kind: str, optimizer: str) -> None:
    model, s, q = _setup("maml", kind, optimizer)
    params = [p for p in model.fast_init.parameters()]
    grads = torch.autograd.grad(_meta_objective(model, s, q, True, optimizer=optimizer), params)
    g = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    analytic = sum((gr * d).sum() for gr, d in zip(grads, direction, strict=True))
    # float64 central differences. Adam's step g/sqrt(g²+ε²) bends on the scale of its ε = 1e-8 wherever a
    # support gradient is that small (1e-7..1e-9 for some perturbations), so its difference step is 1e-8:
    # at 1e-6, 7 of 60 random starts missed rtol 1e-4 while 1e-8 matched all 60; SGD is smooth at 1e-6.
    eps = 1e-8 if optimizer == "adam" else 1e-6

    def shifted(scale: float) -> torch.Tensor:
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(scale * eps * d)
        value = _meta_objective(model, s, q, False, optimizer=optimizer).detach()
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.sub_(scale * eps * d)
        return value

    plus, minus = shifted(1.0), shifted(-1.0)
    numeric = (plus - minus) / (2 * eps)
    assert torch.isclose(analytic, numeric, rtol=1e-4, atol=1e-7), (float(analytic), float(numeric))


def test_base_weight_meta_gradient_matches_finite_differences() -> None:
    model, s, q = _setup("maml")
    w = model.lm.model.layers[0].self_attn.q_proj.weight
    grad = torch.autograd.grad(_meta_objective(model, s, q, True), w)[0]
    i, j, eps = 1, 3, 1e-5

    def shifted(delta: float) -> torch.Tensor:
        with torch.no_grad():
            w[i, j] += delta
        value = _meta_objective(model, s, q, False).detach()
        with torch.no_grad():
            w[i, j] -= delta
        return value

    plus, minus = shifted(eps), shifted(-eps)
    assert torch.isclose(grad[i, j], (plus - minus) / (2 * eps), rtol=1e-4, atol=1e-8)


def test_first_order_drops_the_second_order_term() -> None:
    model, s, q = _setup("fomaml")
    params = list(model.fast_init.parameters())
    second = torch.autograd.grad(_meta_objective(model, s, q, True), params)
    first = torch.autograd.grad(_meta_objective(model, s, q, False), params)
    diff = sum((a - b).norm() ** 2 for a, b in zip(second, first, strict=True)).sqrt()
    scale = sum(a.norm() ** 2 for a in second).sqrt()
    assert diff > 1e-3 * scale  # the Hessian term matters at this lr ...
    assert diff < scale  # ... but FOMAML still points roughly the same way
    # with one inner step at lr -> 0 the two coincide (the Hessian term is O(lr))
    second0 = torch.autograd.grad(_meta_objective(model, s, q, True, lr=1e-6, steps=1), params)
    first0 = torch.autograd.grad(_meta_objective(model, s, q, False, lr=1e-6, steps=1), params)
    diff0 = sum((a - b).norm() ** 2 for a, b in zip(second0, first0, strict=True)).sqrt()
    assert diff0 < 1e-4 * scale


def test_per_task_losses_are_independent() -> None:
    """Summing task losses then differentiating gives each task its own gradient (batched inner loop)."""
    model, s, q = _setup("fomaml")
    fast = {k: {f: t.detach().clone().requires_grad_(True) for f, t in v.items()}
            for k, v in model.fast_init(2).items()}
    grads = torch.autograd.grad(model.task_losses(s, fast, None).sum(), [t for v in fast.values() for t in v.values()])
    one = {k: {f: t[:1].detach().clone().requires_grad_(True) for f, t in v.items()} for k, v in fast.items()}
    grads_one = torch.autograd.grad(model.task_losses(s.select([0]), one, None).sum(),
                                    [t for v in one.values() for t in v.values()])
    assert all(torch.allclose(a[:1], b, atol=1e-10) for a, b in zip(grads, grads_one, strict=True))
