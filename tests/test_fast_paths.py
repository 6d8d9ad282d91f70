"""The exact savings of issue 17: loss at target positions only, allocator, attention choice, checkpointing."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F

from metaprep.config import MetaTrainConfig, TinyModelConfig, load_config
from metaprep.meta.build import needs_eager_attention
from metaprep.meta.model import lm_task_losses
from metaprep.models.base import build_tiny_llama
from metaprep.runtime import configure_process, keep_freed_memory
from metaprep.tasks.base import TaskBatch
from metaprep.tasks.synthetic import make_synthetic_tasks


def _batch(t: int = 3, n: int = 2, length: int = 20, seed: int = 0) -> TaskBatch:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (t, n, length), generator=gen)
    mask = torch.zeros(t, n, length, dtype=torch.long)
    labels = torch.full((t, n, length), -100)
    for i in range(t):
        for j in range(n):
            used = 5 + 3 * i + j  # ragged, right-padded; the prompt (2 tokens) is not a target
            mask[i, j, :used] = 1
            labels[i, j, 2:used] = ids[i, j, 2:used]
    return TaskBatch(ids, labels, mask)


def _full_logits_losses(lm, batch: TaskBatch) -> torch.Tensor:
    """The definition: logits at every position, cross entropy over targets, mean per task."""
    t, n, length = batch.input_ids.shape
    logits = lm(input_ids=batch.input_ids.view(t * n, length),
                attention_mask=batch.attention_mask.view(t * n, length)).logits[:, :-1]
    labels = batch.labels.view(t * n, length)[:, 1:]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(t, -1)
    return tok.sum(1) / (labels != -100).view(t, -1).sum(1)


def test_head_at_targets_gives_the_full_loss_and_gradient() -> None:
    lm = build_tiny_llama(TinyModelConfig())
    batch = _batch()
    fast = lm_task_losses(lm, batch)
    ref = _full_logits_losses(lm, batch)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    weights = torch.tensor([0.3, 1.0, 2.0])  # per-task weights: a task mix-up would change the gradient
    g_fast = torch.autograd.grad((fast * weights).sum(), list(lm.parameters()))
    g_ref = torch.autograd.grad((ref * weights).sum(), list(lm.parameters()))
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_model_outside_the_list_gets_full_logits() -> None:
    lm = build_tiny_llama(TinyModelConfig())
    batch = _batch(seed=1)
    ref = lm_task_losses(lm, batch)
    lm.config.model_type = "unlisted"
    torch.testing.assert_close(lm_task_losses(lm, batch), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_configure_process_sets_threads_and_the_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        configure_process(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert keep_freed_memory() is True
    monkeypatch.setenv("METAPREP_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False


def test_eager_attention_for_second_order_and_cpu_bf16_only() -> None:
    def cfg(*overrides: str) -> MetaTrainConfig:
        return load_config(MetaTrainConfig, None, list(overrides))

    assert not needs_eager_attention(cfg("algorithm=fomaml"))
    assert needs_eager_attention(cfg("algorithm=maml"))
    assert needs_eager_attention(cfg("algorithm=fomaml", "distributed.precision=bf16"))
    assert not needs_eager_attention(cfg("algorithm=fomaml", "distributed.precision=bf16", "distributed.use_gpu=true"))


def test_synthetic_letters_set_the_example_length() -> None:
    short, long = (make_synthetic_tasks(3, letters=k, seed=0)[0].examples[0] for k in (3, 30))
    assert len(short.prompt.split()) == 4 and len(long.prompt.split()) == 31  # letters and '='
    assert len(long.target.split()) == 30
    assert load_config(MetaTrainConfig, None, ["tasks.synthetic_letters=30"]).tasks.synthetic_letters == 30


LAYERS = ("distributed.activation_checkpointing=true",)
INNER = ("meta.inner_checkpointing=true",)


@pytest.mark.parametrize("algorithm, kind, switches, extra", [
    ("maml", "lora", LAYERS, ()), ("mltd", "tarp_bilinear", LAYERS, ()), ("fomaml", "lora", LAYERS, ()),
    ("maml", "lora", INNER, ()), ("mltd", "tarp_bilinear", INNER, ("meta.second_order=true",)),
    ("maml", "lora", INNER, ("meta.inner_optimizer=adam", "meta.support_weight=1.0")),
    ("maml", "lora", LAYERS + INNER, ("meta.inner_steps=3",)),
])
def test_activation_checkpointing_gives_the_same_meta_gradient(algorithm: str, kind: str, switches: tuple,
                                                               extra: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer checkpointing (second order: maml, mltd with TAMS; first order) and inner-step checkpointing
    (second order, sgd and Adam-style, with the support term), alone and together: loss and every
    gradient equal to the unchecked path."""
    from metaprep.meta.build import build_learner, build_meta_model
    from metaprep.tasks.base import make_batch, sample_meta_batch, split_tasks
    from metaprep.tasks.families import load_tasks

    def run(checkpointing: bool):
        torch.manual_seed(1)  # the controller's layers draw from the global RNG
        cfg = load_config(MetaTrainConfig, None, [
            "model.tiny.dim=32", "model.tiny.hidden_dim=64", "model.tiny.layers=2", "model.tiny.heads=2",
            "tasks.seq_len=16", f"algorithm={algorithm}", f"reparam.kind={kind}", "meta.inner_steps=2", *extra,
            *(switches if checkpointing else ())])
        model, loaded = build_meta_model(cfg)
        learner = build_learner(cfg, model, num_train_tasks=8)
        split = split_tasks(load_tasks(cfg.tasks), 0.15, 0.15, 1)
        eps = sample_meta_batch(split.train, 2, 4, 4, seed=0, step=0)
        support = make_batch(eps, "support", loaded.tokenizer, cfg.tasks.seq_len)
        support.noise_seeds = [11, 12]
        query = make_batch(eps, "query", loaded.tokenizer, cfg.tasks.seq_len)
        torch.manual_seed(0)
        with torch.no_grad():  # away from the zero init: every term of the meta-gradient is non-trivial
            for p in model.fast_init.parameters():
                p.add_(0.1 * torch.randn_like(p))
        losses, _ = learner(support, query, 0)
        losses.sum().backward()
        return losses.detach(), {n: p.grad for n, p in learner.named_parameters() if p.grad is not None}

    import metaprep.meta.inner as inner_module

    plain_losses, plain = run(False)
    calls, real = [], inner_module.checkpoint
    monkeypatch.setattr(inner_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    losses, grads = run(True)
    steps = 3 if "meta.inner_steps=3" in extra else 2
    assert len(calls) == (steps if INNER[0] in switches else 0)  # the switch reaches the inner loop
    torch.testing.assert_close(losses, plain_losses, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain.keys() and len(plain) > 10
    for name, g in plain.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_inner_checkpointing_needs_second_order() -> None:
    from metaprep.errors import ConfigError

    cfg = load_config(MetaTrainConfig, None, ["algorithm=maml", "meta.inner_checkpointing=true"])
    assert cfg.meta.inner_checkpointing
    for algorithm, kind in (("fomaml", "lora"), ("mltd", "tarp_bilinear")):  # mltd: first order by default
        with pytest.raises(ConfigError, match=r"meta.inner_checkpointing: only a second-order .* use false"):
            load_config(MetaTrainConfig, None, [f"algorithm={algorithm}", f"reparam.kind={kind}",
                                                "meta.inner_checkpointing=true"])


@pytest.mark.parametrize("flags, native", [("fpu avx2 fma", False), ("fpu avx512f avx512_bf16", True),
                                           ("fpu amx_bf16 amx_tile", True), ("", None)])
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, flags: str, native) -> None:
    from metaprep import runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags.split()))
    assert runtime.native_bf16_matmul() is native


def test_bf16_without_bf16_instructions_is_a_warning_and_not_timed_on_big_steps(monkeypatch) -> None:
    """This session's CPU (AVX2 only) ran bf16 GEMMs ~9x slower than fp32: users are told, the suite skips."""
    from metaprep import runtime
    from metaprep.bench.throughput import suite

    cfg = load_config(MetaTrainConfig, "jobs/configs/tiny.yaml", ["distributed.precision=bf16"])
    monkeypatch.setattr(runtime, "native_bf16_matmul", lambda: False)
    assert any(n.startswith("distributed.precision: bf16 on a CPU without bf16") for n in cfg.advisories())
    monkeypatch.setattr(suite, "native_bf16_matmul", lambda: False)
    assert "no bf16 matmul instructions" in suite.emulated_bf16_too_slow({"median_s": 28.0})
    assert suite.emulated_bf16_too_slow({"median_s": 0.01}) is None  # small steps are still timed
    monkeypatch.setattr(runtime, "native_bf16_matmul", lambda: True)
    monkeypatch.setattr(suite, "native_bf16_matmul", lambda: True)
    assert not any(n.startswith("distributed.precision") for n in cfg.advisories())
    assert suite.emulated_bf16_too_slow({"median_s": 28.0}) is None


@pytest.mark.parametrize("native, use_gpu, expected", [(False, False, None), (True, False, torch.bfloat16),
                                                       (None, False, None), (False, True, torch.bfloat16)])
def test_precision_auto_is_bf16_only_where_it_pays(monkeypatch, native, use_gpu, expected) -> None:
    from metaprep import runtime
    from metaprep.train.step import autocast_dtype

    monkeypatch.setattr(runtime, "native_bf16_matmul", lambda: native)
    cfg = load_config(MetaTrainConfig, "jobs/configs/tiny.yaml", ["distributed.precision=auto"])
    cfg.distributed.use_gpu = use_gpu
    assert autocast_dtype(cfg) is expected
    assert not cfg.advisories()  # auto never picks the slow path, so nothing to warn about


def _tiny_lora_batches():
    """A tiny LoRA meta-model and one meta-batch of support and query (2 tasks)."""
    from metaprep.meta.build import build_meta_model
    from metaprep.tasks.base import make_batch, sample_meta_batch, split_tasks
    from metaprep.tasks.families import load_tasks

    cfg = load_config(MetaTrainConfig, None, [
        "model.tiny.dim=32", "model.tiny.hidden_dim=64", "model.tiny.layers=2", "model.tiny.heads=2",
        "tasks.seq_len=16", "algorithm=fomaml", "reparam.kind=lora", "meta.inner_steps=1"])
    model, loaded = build_meta_model(cfg)
    split = split_tasks(load_tasks(cfg.tasks), 0.15, 0.15, 1)
    eps = sample_meta_batch(split.train, 2, 2, 2, seed=0, step=0)
    support, query = (make_batch(eps, part, loaded.tokenizer, cfg.tasks.seq_len) for part in ("support", "query"))
    return cfg, model, support, query


@contextlib.contextmanager
def _output_dtypes(model):
    """Records the output dtype of every forward of one MLP projection of ``model`` (bf16 or fp32 matmuls)."""
    seen: list[torch.dtype] = []
    mlp = next(m for n, m in model.lm.named_modules() if n.endswith("mlp.down_proj"))
    handle = mlp.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        yield seen
    finally:
        handle.remove()


def test_the_learner_enters_the_calls_precision_inside_the_engine() -> None:
    """DeepSpeed's engine.forward switches off an autocast entered around it (on CUDA, where it detects one:
    an H200 run measured "bf16" steps that were fp32), so the learner enters the call's dtype itself: its
    matmuls run in bf16 even inside a disabled autocast, and without a dtype they stay in fp32."""
    from metaprep.meta.build import build_learner

    cfg, model, support, query = _tiny_lora_batches()
    learner = build_learner(cfg, model, num_train_tasks=8)
    with _output_dtypes(model) as seen:
        with torch.autocast("cpu", enabled=False):  # what DeepSpeed's engine does around the module
            learner(support, query, 0, torch.bfloat16)
        assert seen and set(seen) == {torch.bfloat16}
        seen.clear()
        losses, _ = learner(support, query, 0)
        assert seen and set(seen) == {torch.float32} and losses.dtype == torch.float32


def test_adaptation_runs_in_the_precision_it_is_given() -> None:
    """Meta-test adaptation enters the requested precision on its tensors' device (one helper,
    metaprep.meta.precision): bf16 even inside a disabled autocast, and fp32 when given none, even
    inside an enclosing bf16 autocast."""
    from metaprep.meta.adapt import adapt, support_losses

    _, model, support, query = _tiny_lora_batches()
    with _output_dtypes(model) as seen:
        with torch.autocast("cpu", enabled=False):
            adapt(model, support, query, 2, 1e-3, autocast_dtype=torch.bfloat16)
            support_losses(model, support, torch.bfloat16)
        assert seen and set(seen) == {torch.bfloat16}
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            adapt(model, support, query, 2, 1e-3)
            support_losses(model, support)
        assert seen and set(seen) == {torch.float32}


def test_meta_step_hands_the_precision_to_the_engine() -> None:
    """meta_step passes distributed.precision's autocast dtype into the engine call (the learner enters it)."""
    from metaprep.train.step import meta_step

    class Engine:  # records the call DeepSpeed's engine would forward to the learner
        skipped_steps = 0
        module = None

        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def __call__(self, *args):
            self.calls.append(args)
            return torch.ones(2, requires_grad=True), {}

        def backward(self, loss: torch.Tensor) -> None:
            loss.backward()

        def step(self) -> None:
            pass

    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
        cfg = load_config(MetaTrainConfig, None, [f"distributed.precision={precision}"])
        engine = Engine()
        meta_step(engine, cfg, "support", "query", 3)
        assert engine.calls == [("support", "query", 3, dtype)]
