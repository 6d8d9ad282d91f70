"""Adapted weights export exactly: a merged transformers model and a PEFT adapter that `peft` loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from metaprep.config import MetaTrainConfig, load_config
from metaprep.meta.adapt import adapt
from metaprep.registry.export import export_merged, export_peft
from metaprep.tasks.base import fixed_episodes, make_batch
from metaprep.train.local import meta_train_local

ROOT = Path(__file__).resolve().parents[1]


def _loss(lm, batch) -> torch.Tensor:
    ids, labels = batch.input_ids[0], batch.labels[0]
    logits = lm(input_ids=ids, attention_mask=batch.attention_mask[0]).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.fixture(scope="module")
def adapted():
    def run(kind: str):
        cfg = load_config(MetaTrainConfig, ROOT / "jobs/configs/tiny.yaml",
                          [f"reparam.kind={kind}", "meta.meta_steps=3", "meta.eval_every=3"])
        result = meta_train_local(cfg, export=True)
        eps = fixed_episodes(result.split.test[:1], 4, 4, seed=0)
        s = make_batch(eps, "support", result.loaded.tokenizer, cfg.tasks.seq_len)
        q = make_batch(eps, "query", result.loaded.tokenizer, cfg.tasks.seq_len)
        res = adapt(result.model, s, q, 3, 0.3)
        return result, res, q
    return run


@pytest.mark.parametrize("kind", ["lora", "tarp_bilinear", "tarp_kronecker"])
def test_merged_model_reproduces_the_adapted_model(adapted, tmp_path, kind: str) -> None:
    result, res, q = adapted(kind)
    export_merged(result.model, res.fast, 0, tmp_path / "merged", result.loaded.tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    with torch.no_grad():
        assert torch.isclose(_loss(merged, q), torch.tensor(res.query_loss_after), atol=1e-4)


def test_peft_loads_the_exported_lora_adapter(adapted, tmp_path) -> None:
    from peft import PeftModel

    result, res, q = adapted("lora")
    export_peft(result.model, res.fast, 0, tmp_path / "peft", result.loaded.tokenizer)
    base = AutoModelForCausalLM.from_pretrained(result.export_dir / "base", local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft")
    with torch.no_grad():
        assert torch.isclose(_loss(peft_model, q), torch.tensor(res.query_loss_after), atol=1e-4)
    assert res.query_loss_after < res.query_loss_before  # the adapter carries a real adaptation


def test_prepared_model_keeps_its_recipe_tasks(tmp_path) -> None:
    """The registry spec round-trips the task recipe: adaptation needs its seq_len, --meta-test its family and split."""
    from metaprep.registry.artifacts import export_prepared, load_prepared

    cfg = load_config(MetaTrainConfig, ROOT / "jobs/configs/tiny.yaml",
                      ["meta.meta_steps=1", "meta.eval_every=1", "tasks.seq_len=20", "tasks.num_tasks=30",
                       "tasks.split_seed=7", "tasks.test_fraction=0.2"])
    result = meta_train_local(cfg)
    export_prepared(result.model, result.loaded, cfg, tmp_path)
    _, _, loaded_cfg = load_prepared(tmp_path / "base", tmp_path / "controller")
    assert loaded_cfg.tasks == cfg.tasks
