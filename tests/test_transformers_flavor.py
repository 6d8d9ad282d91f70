"""Registered bases are MLflow ``transformers`` models (issue 19, item 3).

A tiny base registered by :func:`metaprep.registry.register.register_prepared` (private sqlite store, real
artifacts, no mocks) loads with ``mlflow.transformers.load_model("models:/NAME-base/1")`` and gives the
prepared base's logits; metaprep's own loader still verifies (the manifest covers ``MLmodel``) and loads it.
A frozen base that references a transformers folder carries the flavor through MLflow's
``local_base_model_path``; a base that transformers cannot load says why in its tag.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metaprep.config import MetaTrainConfig, load_config
from metaprep.errors import RegistryError
from metaprep.models.base import LoadedModel, build_tiny_llama
from metaprep.models.tokenizer import ByteTokenizer
from metaprep.registry.artifacts import MLMODEL, add_transformers_flavor, load_prepared, verify_manifest
from metaprep.train.local import meta_train_local

ROOT = Path(__file__).resolve().parents[1]
TINY = ["meta.meta_steps=2", "meta.eval_every=2", "model.tiny.layers=1", "meta.eval_tasks=4"]
PROMPT = "a b 3 = x"


def _register(tmp: Path, name: str, overrides: list[str]):
    """Meta-train the tiny recipe in-process and register it in a private sqlite store; (uri, result)."""
    import mlflow

    from metaprep.registry.register import register_prepared

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(MetaTrainConfig, ROOT / "jobs/configs/tiny.yaml", [*TINY, *overrides, f"registry.name={name}"])
    result = meta_train_local(cfg, export=True)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("prepare", artifact_location=str(tmp / "art"))).info.run_id
    register_prepared(uri, run_id, result.export_dir, cfg, result.final, "test", "{}")
    return uri, result


def _base_logits(result, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # no fast weights: the base alone
        return result.model.lm(input_ids=ids).logits[0]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flavor")
    uri, result = _register(tmp, "flavor-test", [])
    return {"uri": uri, "result": result, "tmp": tmp}


def test_mlflow_transformers_loads_the_registered_base_with_its_logits(registered) -> None:
    import mlflow

    mlflow.set_tracking_uri(registered["uri"])
    pipe = mlflow.transformers.load_model("models:/flavor-test-base/1")
    tok = registered["result"].loaded.tokenizer
    ids = pipe.tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == [tok.bos_id, *tok.encode(PROMPT)]  # MLflow's tokenizer gives metaprep's ids
    with torch.no_grad():
        logits = pipe.model(input_ids=ids).logits[0]
    assert torch.allclose(logits, _base_logits(registered["result"], ids), atol=1e-4)
    assert isinstance(pipe("a b", max_new_tokens=2)[0]["generated_text"], str)
    served = mlflow.pyfunc.load_model("models:/flavor-test-base@candidate").predict(["a b"])
    assert len(served) == 1 and isinstance(served[0], str)


def test_metaprep_still_verifies_and_loads_the_registered_base(registered) -> None:
    import mlflow

    from metaprep.registry.resolve import companion_controller, resolve_artifact

    uri = registered["uri"]
    # MLflow adds its registered_model_meta to a registered MLflow model it downloads (here: in the store)
    mlflow.set_tracking_uri(uri)
    mlflow_copy = Path(mlflow.artifacts.download_artifacts("models:/flavor-test-base/1"))
    assert (mlflow_copy / "registered_model_meta").is_file()
    verify_manifest(mlflow_copy, "base")
    base = resolve_artifact("models:/flavor-test-base@candidate", uri)
    model, loaded, _ = load_prepared(base, resolve_artifact(companion_controller(
        "models:/flavor-test-base@candidate", uri), uri))
    ids = torch.tensor([[loaded.tokenizer.bos_id, *loaded.tokenizer.encode(PROMPT)]])
    with torch.no_grad():
        assert torch.allclose(model.lm(input_ids=ids).logits[0], _base_logits(registered["result"], ids), atol=1e-5)
    assert {MLMODEL, "components/tokenizer/tokenizer.json"} <= json.loads((base / "manifest.json").read_text()).keys()
    with (base / MLMODEL).open("a") as f:  # the flavor's files are checked like the weights
        f.write("# edited\n")
    with pytest.raises(RegistryError, match="MLmodel does not match its recorded SHA-256"):
        verify_manifest(base, "base")
    client = mlflow.MlflowClient(uri)
    base_tags = client.get_model_version("flavor-test-base", "1").tags
    assert base_tags["transformers_flavor"] == "text-generation"
    assert "transformers_flavor" not in client.get_model_version("flavor-test-controller", "1").tags
    split = registered["result"].split
    counts = f"{len(split.train)} meta-train, {len(split.val)} meta-val, {len(split.test)} meta-test"
    assert base_tags["task_split"] == counts
    assert base_tags["task_split.meta_val"] == ", ".join(t.name for t in split.val)
    run = client.get_run(client.get_model_version("flavor-test-base", "1").run_id)
    assert run.data.params["task_split.meta_test"] == str(len(split.test))


def test_a_frozen_base_referencing_a_transformers_folder_carries_the_flavor(tmp_path) -> None:
    """``meta.freeze_base``: the base is a reference to the original folder, which MLflow loads in place."""
    import mlflow

    from metaprep.config import TinyModelConfig
    from metaprep.models.tokenizer_export import save_standalone_tokenizer

    original = tmp_path / "original"
    build_tiny_llama(TinyModelConfig(layers=1, max_seq_len=64)).save_pretrained(original)
    save_standalone_tokenizer(ByteTokenizer(), original, 64)
    uri, result = _register(tmp_path, "frozen-test", [f"model.path={original}", "meta.freeze_base=true"])
    assert json.loads((result.export_dir / "base" / "metaprep_base.json").read_text())["format"] == "reference"
    mlflow.set_tracking_uri(uri)
    components = mlflow.transformers.load_model("models:/frozen-test-base/1", return_type="components")
    ids = components["tokenizer"](PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = components["model"](input_ids=ids).logits[0]
    assert torch.allclose(logits, _base_logits(result, ids), atol=1e-4)


def test_a_base_transformers_cannot_load_says_why(tmp_path) -> None:
    not_hf = LoadedModel(torch.nn.Linear(2, 2), ByteTokenizer(), "tiny", "tiny")
    assert add_transformers_flavor(tmp_path, not_hf.model, not_hf, "synthetic", reference=False) == \
        "none: the base is a Linear, not a transformers model class"
    lm = build_tiny_llama(load_config(MetaTrainConfig, None, []).model.tiny)
    llama2c = LoadedModel(lm, ByteTokenizer(), "llama2c", str(tmp_path / "stories260K"))
    assert add_transformers_flavor(tmp_path, lm, llama2c, "synthetic", reference=True).startswith(
        "none: the base is a reference to a llama2c model")
    assert not (tmp_path / MLMODEL).exists()
