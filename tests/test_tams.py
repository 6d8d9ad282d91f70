"""TAMS: the cell is the identity at init, the controller separates tasks, Gumbel is straight-through."""

from __future__ import annotations

import torch

from metaprep.config import MetaTrainConfig, load_config
from metaprep.meta.build import build_learner, build_meta_model
from metaprep.search.controller import ArchController, describe_architecture, temperature
from metaprep.tasks.base import make_batch, sample_meta_batch, split_tasks
from metaprep.tasks.families import load_tasks

OPS = ["zero", "skip", "linear", "glu", "conv3", "conv5"]


def _model():
    cfg = load_config(MetaTrainConfig, "jobs/configs/tiny.yaml", ["algorithm=mltd", "reparam.kind=tarp_bilinear"])
    model, loaded = build_meta_model(cfg)
    split = split_tasks(load_tasks(cfg.tasks), 0.15, 0.15, 1)
    eps = sample_meta_batch(split.train, 3, 4, 4, seed=0, step=0)
    return build_learner(cfg, model), make_batch(eps, "support", loaded.tokenizer, cfg.tasks.seq_len)


def test_model_with_cells_equals_base_at_init() -> None:
    model, s = _model()
    model = model.model
    arch = model.architecture(s, sample=True)
    assert torch.allclose(model.task_losses(s, model.fast_init(3), arch), model.task_losses(s, None, None),
                          atol=1e-6)


def test_controller_separates_clearly_different_tasks() -> None:
    torch.manual_seed(0)
    ctrl = ArchController(embed_dim=32, layers=2, edges=9, ops=OPS)
    z = torch.stack([torch.linspace(-3, 3, 32), -torch.linspace(-3, 3, 32)])
    arch = ctrl(z, sample=False)
    assert arch.shape == (2, 2, 9, 6) and torch.all(arch.sum(-1) == 1)
    assert (arch[0].argmax(-1) != arch[1].argmax(-1)).any()
    assert torch.equal(ctrl(z[:1], sample=False), ctrl(z[:1], sample=False))  # argmax is deterministic


def test_straight_through_gumbel_is_one_hot_with_soft_gradient() -> None:
    torch.manual_seed(0)
    ctrl = ArchController(embed_dim=8, layers=1, edges=3, ops=OPS)
    alpha = ctrl(torch.randn(4, 8), tau=0.5, sample=True)
    assert torch.allclose(alpha.sum(-1), torch.ones(4, 1, 3)) and set(alpha.detach().unique().tolist()) <= {0.0, 1.0}
    (alpha * torch.randn_like(alpha)).sum().backward()
    assert ctrl.net[-1].weight.grad.abs().sum() > 0


def test_mltd_meta_gradient_reaches_the_controller() -> None:
    learner, s = _model()
    with torch.no_grad():  # a non-zero up-projection makes the cell's output (and so α) matter
        for name, p in learner.model.fast_init.params.items():
            if name.endswith("--up"):
                p.normal_(0, 0.1)
    losses, _ = learner(s, s, step=0)
    losses.sum().backward()
    assert learner.model.controller.net[0].weight.grad.abs().sum() > 0


def test_temperature_schedule_and_report() -> None:
    assert temperature(0, 10, 1.0, 0.1) == 1.0 and abs(temperature(9, 10, 1.0, 0.1) - 0.1) < 1e-12
    report = describe_architecture(torch.nn.functional.one_hot(torch.tensor([[[1, 4]]]), 6), OPS)
    assert report == [{"layer0": ["skip", "conv3"]}]


def test_seeded_gumbel_noise_does_not_depend_on_the_shard() -> None:
    """Tasks 0..3 sampled together draw the same α as the shards [0, 2] and [1, 3] (2 workers = 1 worker)."""
    torch.manual_seed(0)
    ctrl = ArchController(embed_dim=8, layers=2, edges=3, ops=OPS)
    z, seeds = torch.randn(4, 8), [11, 12, 13, 14]
    whole = ctrl(z, tau=1.0, noise_seeds=seeds)
    for shard in ([0, 2], [1, 3]):
        assert torch.equal(ctrl(z[shard], tau=1.0, noise_seeds=[seeds[i] for i in shard]), whole[shard])
    assert not torch.equal(ctrl(z, tau=1.0, noise_seeds=[21, 22, 23, 24]), whole)  # the seeds do matter


def test_gumbel_architecture_is_finite_under_bf16_autocast() -> None:
    """A draw u that bf16 rounds to 1 gave -log(-log(u)) = inf and a NaN architecture: the noise is fp32."""
    torch.manual_seed(0)
    ctrl = ArchController(embed_dim=8, layers=4, edges=9, ops=OPS)
    z = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        alphas = [ctrl(z, tau=0.5, sample=True, noise_seeds=list(range(s, s + 8))) for s in range(0, 400, 8)]
    for alpha in alphas:  # 50 x 8 tasks x 4 x 9 edges x 6 ops draws: many land within bf16's 1 - 2^-8 of 1
        assert torch.isfinite(alpha).all() and torch.equal(alpha.detach().sum(-1), torch.ones_like(alpha[..., 0]))
