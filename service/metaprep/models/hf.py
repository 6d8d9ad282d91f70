"""transformers model folders: causal LMs (GPT-2, Llama, ...) and sentence encoders (BERT, MiniLM).

A folder is what ``save_pretrained`` writes: ``config.json``, weights (``model.safetensors`` or
``pytorch_model.bin``, possibly sharded with an index) and the tokenizer files (``tokenizer.json``
and/or ``vocab.txt``/``vocab.json`` + ``merges.txt``, ``tokenizer_config.json``). Everything is read
offline (``local_files_only``) and ``trust_remote_code`` is never enabled, so a folder can only name
an architecture that ships with transformers. Weights load as fp32; training chooses autocast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from metaprep.errors import ModelLoadError
from metaprep.models.tokenizer import HFTokenizer

T = TypeVar("T")
OFFLINE: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}


def _one_line(e: BaseException, limit: int = 200) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def guarded(what: str, path: Path, expected: str, fn: Callable[[], T]) -> T:
    """Run a transformers load; turn whatever it raises about bad files into one ModelLoadError line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load buries the jobs' own output
    try:
        return fn()
    except ModelLoadError:
        raise
    except Exception as e:  # OSError, ValueError, SafetensorError, RuntimeError...: all "bad files" here
        raise ModelLoadError(f"{what} {path}: cannot load ({_one_line(e)}); expected {expected}") from e


def _check_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"{what} {path}: not a directory; expected a transformers folder "
                             f"(config.json, weights, tokenizer files)")


def _check_loading_info(what: str, path: Path, info: dict[str, Any]) -> None:
    # transformers only warns about missing weights and random-initialises them: for a base model
    # that is a wrong checkpoint, not something to train on
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelLoadError(f"{what} {path}: the weights lack {len(missing)} parameters of the architecture "
                             f"in config.json (e.g. {missing[0]}); expected weights saved for that config")


def check_tokenizer_fits(what: str, path: Path, n_tokens: int, model: nn.Module) -> None:
    """A tokenizer that can emit ids past the embedding table would index out of range mid-training."""
    n_embed = model.get_input_embeddings().num_embeddings
    if n_tokens > n_embed:
        raise ModelLoadError(f"{what} {path}: tokenizer mismatch, the tokenizer has {n_tokens} tokens but "
                             f"the model's embedding table has {n_embed} rows; expected tokenizer <= model")


def load_hf_tokenizer(path: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    return guarded("hf tokenizer", path, "tokenizer files (tokenizer.json or vocab files)",
                   lambda: AutoTokenizer.from_pretrained(path, **OFFLINE, **kwargs))


def load_hf_model(path: Path) -> tuple[nn.Module, HFTokenizer]:
    """A transformers causal-LM folder -> (``AutoModelForCausalLM`` in eval mode, HFTokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    _check_dir(path, "hf model")
    config = guarded("hf model", path, "a readable config.json with a known model_type",
                     lambda: AutoConfig.from_pretrained(path, **OFFLINE))
    model, info = guarded("hf model", path, "causal-LM weights (model.safetensors or pytorch_model.bin)",
                          lambda: AutoModelForCausalLM.from_pretrained(
                              path, config=config, dtype=torch.float32, output_loading_info=True, **OFFLINE))
    _check_loading_info("hf model", path, info)
    tok = load_hf_tokenizer(path)
    check_tokenizer_fits("hf model", path, len(tok), model)
    return model.eval(), HFTokenizer(tok)


def load_encoder(path: Path) -> tuple[nn.Module, Any]:
    """A transformers encoder folder (BERT, RoBERTa, MiniLM) -> (``AutoModel`` in eval mode, HF tokenizer).

    Sentence embeddings are the caller's pooling of ``last_hidden_state`` (all-MiniLM-L6-v2: mean
    over non-pad tokens, then L2-normalise, as its ``1_Pooling`` config says).
    """
    from transformers import AutoConfig, AutoModel

    path = Path(path)
    _check_dir(path, "hf encoder")
    config = guarded("hf encoder", path, "a readable config.json with a known model_type",
                     lambda: AutoConfig.from_pretrained(path, **OFFLINE))
    model, info = guarded("hf encoder", path, "encoder weights (model.safetensors or pytorch_model.bin)",
                          lambda: AutoModel.from_pretrained(
                              path, config=config, dtype=torch.float32, output_loading_info=True, **OFFLINE))
    _check_loading_info("hf encoder", path, info)
    tok = load_hf_tokenizer(path)
    check_tokenizer_fits("hf encoder", path, len(tok), model)
    return model.eval(), tok
