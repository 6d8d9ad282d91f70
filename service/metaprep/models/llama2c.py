"""llama2.c checkpoints (Karpathy's "tinyllamas") as a transformers ``LlamaForCausalLM``.

Model file, the legacy (version 0) format that ``run.c`` reads and ``export.py --version 0`` writes:
a header of 7 int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len``
(``vocab_size < 0`` means the classifier is not shared with the token embedding), then fp32
tensors, each stacked over layers: ``tok_embeddings (V, D)``, ``attention_norm (L, D)``,
``wq (L, D, D)``, ``wk (L, KV, D)``, ``wv (L, KV, D)``, ``wo (L, D, D)``, ``ffn_norm (L, D)``,
``w1 (L, H, D)``, ``w2 (L, D, H)``, ``w3 (L, H, D)``, ``norm (D,)``, the RoPE tables
``freqs_cos``/``freqs_sin`` (``seq_len * head_dim / 2`` each, recomputed by HF, skipped), and
``output (V, D)`` only when unshared. Linear weights are stored ``(out, in)`` like ``nn.Linear``.

Tokenizer file (``tokenizer.py export`` in llama2.c): int32 ``max_token_length``, then per token
float32 score, int32 byte length, the piece bytes. Pieces use " " where sentencepiece has "▁";
ids 0/1/2 are ``<unk>``, ``<s>``, ``</s>``, and ``<0xNN>`` pieces are byte-fallback tokens.
"""

from __future__ import annotations

import heapq
import re
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from metaprep.errors import ModelLoadError

_HEADER = struct.Struct("<7i")
_VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c export.py --version >= 1, not what run.c reads
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Llama2cTokenizer:
    """llama2.c's tokenizer (``run.c`` ``encode``/``decode``) behind the project's Tokenizer protocol.

    Encoding prepends the sentencepiece dummy space, looks each UTF-8 character up in the vocab
    (falling back to its ``<0xNN>`` byte tokens), then repeatedly merges the adjacent pair whose
    concatenation is the highest-scoring vocab piece (leftmost on ties). ``encode`` adds no BOS;
    ``decode`` drops special ids and the leading dummy space, so ``decode(encode(s)) == s``.
    """

    pad_id, bos_id, eos_id = 0, 1, 2  # no pad token in llama2.c: <unk> is never produced by encode

    def __init__(self, path: str | Path, vocab_size: int | None = None) -> None:
        path = Path(path)
        self.path = path  # exported next to a registered base
        # the raw vocab (piece bytes, merge scores): also what a transformers export rebuilds
        self.pieces, self.scores = _read_tokenizer(path, vocab_size)
        self.vocab_size = len(self.pieces)
        self._bytes: list[bytes] = []  # what each id decodes to
        self._text: list[str] = []  # what each id means to the merge loop
        self._lookup: dict[str, int] = {}
        self._byte_ids: dict[int, int] = {}
        for i, raw in enumerate(self.pieces):
            piece = raw.decode("utf-8", errors="replace")
            m = _BYTE_PIECE.fullmatch(piece)
            if m and i > 2:
                self._byte_ids.setdefault(int(m.group(1), 16), i)
                self._bytes.append(bytes([int(m.group(1), 16)]))
            else:
                self._bytes.append(b"" if i <= 2 else raw)
                if i > 2:  # specials never come out of text; duplicates keep the lowest id
                    self._lookup.setdefault(piece, i)
            self._text.append(piece)

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        ids: list[int] = []
        for ch in " " + text:
            tid = self._lookup.get(ch)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(self._byte_ids.get(b, 0) for b in ch.encode("utf-8"))
        return self._merge(ids)

    def decode(self, ids: list[int]) -> str:
        out = b"".join(self._bytes[i] for i in ids if 0 <= i < self.vocab_size)
        text = out.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text

    def _merge(self, ids: list[int]) -> list[int]:
        """run.c's greedy merge loop, with a heap instead of a rescan per merge (same result)."""
        n = len(ids)
        text = [self._text[i] for i in ids]
        nxt = list(range(1, n)) + [-1]
        prev = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[float, int, str, str]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j != -1:
                tid = self._lookup.get(text[i] + text[j])
                if tid is not None:
                    heapq.heappush(heap, (-self.scores[tid], i, text[i], text[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j == -1 or text[i] != left or text[j] != right:
                continue  # stale: one side was merged since this pair was pushed
            text[i] = left + right
            ids[i] = self._lookup[text[i]]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] != -1:
                prev[nxt[j]] = i
            if prev[i] != -1:
                push(prev[i])
            push(i)
        return [ids[i] for i in range(n) if alive[i]]


def _read_tokenizer(path: Path, vocab_size: int | None) -> tuple[list[bytes], list[float]]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"llama2.c tokenizer {path}: cannot read ({e.strerror}); "
                             f"expected a tok*.bin file from llama2.c tokenizer.py export") from None
    pieces: list[bytes] = []
    scores: list[float] = []
    pos = 4
    while pos < len(data):
        if pos + 8 > len(data):
            break
        score, length = struct.unpack_from("<fi", data, pos)
        if length < 0 or pos + 8 + length > len(data):
            pos = -1
            break
        pieces.append(data[pos + 8:pos + 8 + length])
        scores.append(score)
        pos += 8 + length
    if len(data) < 4 or pos != len(data) or len(pieces) < 3:
        raise ModelLoadError(f"llama2.c tokenizer {path}: truncated or corrupt after {len(pieces)} tokens; "
                             f"expected int32 max_token_length, then per token: f32 score, i32 len, bytes")
    if vocab_size is not None and len(pieces) != vocab_size:
        raise ModelLoadError(f"llama2.c tokenizer {path}: tokenizer mismatch, {len(pieces)} tokens but the "
                             f"model's vocab_size is {vocab_size}")
    return pieces, scores


def _find_model_file(path: Path) -> Path:
    """The checkpoint itself, or the one non-tokenizer ``.bin`` in a folder."""
    if not path.exists():
        raise ModelLoadError(f"llama2.c model {path}: no such file or directory; expected a checkpoint .bin "
                             f"or a folder holding one and its tok*.bin tokenizer")
    if path.is_file():
        return path
    models = sorted(p for p in path.glob("*.bin") if not p.name.startswith("tok"))
    if len(models) != 1:
        raise ModelLoadError(f"llama2.c folder {path}: expected exactly one model .bin besides tok*.bin, "
                             f"found {[p.name for p in models]}; pass the model file itself")
    return models[0]


def _pick_tokenizer(folder: Path, vocab_size: int) -> Path:
    """``tok{V}.bin`` (the tinyllamas naming), else the only ``tok*.bin`` in the folder."""
    named = folder / f"tok{vocab_size}.bin"
    if named.is_file():
        return named
    candidates = sorted(folder.glob("tok*.bin"))
    if len(candidates) != 1:
        raise ModelLoadError(f"llama2.c folder {folder}: expected tok{vocab_size}.bin or a single tok*.bin "
                             f"tokenizer, found {[p.name for p in candidates]}")
    return candidates[0]


def read_llama2c_checkpoint(path: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Header fields and llama2.c-named fp32 tensors of a version-0 checkpoint."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(_HEADER.size)
    except OSError as e:
        raise ModelLoadError(f"llama2.c model {path}: cannot read ({e.strerror})") from None
    if len(head) < _HEADER.size:
        raise ModelLoadError(f"llama2.c model {path}: {size} bytes, too short for the 7-int32 header "
                             f"(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = _HEADER.unpack(head)
    if dim == _VERSIONED_MAGIC:
        raise ModelLoadError(f"llama2.c model {path}: versioned export (magic 'ak42'); expected the legacy "
                             f"version-0 format (llama2.c export.py --version 0)")
    shared = vocab > 0
    vocab = abs(vocab)
    sane = min(dim, hidden, layers, heads, kv_heads, vocab, seq_len) > 0 and max(dim, hidden, vocab) < 2**20
    if not sane or dim % heads or heads % kv_heads or (dim // heads) % 2:
        fields = (dim, hidden, layers, heads, kv_heads, vocab, seq_len)
        raise ModelLoadError(f"llama2.c model {path}: corrupt header {fields}; expected positive sizes with "
                             f"dim divisible by n_heads (even head size) and n_heads by n_kv_heads")
    head_dim = dim // heads
    kv_dim = kv_heads * head_dim
    shapes = {
        "tok_embeddings": (vocab, dim),
        "attention_norm": (layers, dim),
        "wq": (layers, dim, dim),
        "wk": (layers, kv_dim, dim),
        "wv": (layers, kv_dim, dim),
        "wo": (layers, dim, dim),
        "ffn_norm": (layers, dim),
        "w1": (layers, hidden, dim),
        "w2": (layers, dim, hidden),
        "w3": (layers, hidden, dim),
        "norm": (dim,),
        "freqs_cos": (seq_len, head_dim // 2),
        "freqs_sin": (seq_len, head_dim // 2),
    }
    if not shared:
        shapes["output"] = (vocab, dim)
    n_floats = sum(int(np.prod(s)) for s in shapes.values())
    expected = _HEADER.size + 4 * n_floats
    if size != expected:
        raise ModelLoadError(f"llama2.c model {path}: {size} bytes but the header "
                             f"(dim={dim}, n_layers={layers}, vocab={vocab}) implies {expected}; "
                             f"the file is truncated or corrupt")
    flat = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=_HEADER.size))
    tensors, pos = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        tensors[name] = flat[pos:pos + n].view(shape)
        pos += n
    if shared:
        tensors["output"] = tensors["tok_embeddings"]
    header = dict(dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                  vocab_size=vocab, seq_len=seq_len, shared_classifier=int(shared))
    return header, tensors


def _permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama2.c rotates interleaved pairs (x0, x1), (x2, x3)...; HF's ``rotate_half`` pairs x_i with
    x_{i + head_dim/2}. Reorder each head's output rows (HF convert_llama_weights_to_hf ``permute``)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def llama2c_to_hf(header: dict[str, int], t: dict[str, torch.Tensor]) -> nn.Module:
    """Build a ``LlamaForCausalLM`` holding the llama2.c tensors (eps 1e-5, RoPE theta 10000 as run.c)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=header["vocab_size"], hidden_size=header["dim"], intermediate_size=header["hidden_dim"],
        num_hidden_layers=header["n_layers"], num_attention_heads=header["n_heads"],
        num_key_value_heads=header["n_kv_heads"], max_position_embeddings=header["seq_len"],
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=bool(header["shared_classifier"]),
        pad_token_id=Llama2cTokenizer.pad_id, bos_token_id=Llama2cTokenizer.bos_id,
        eos_token_id=Llama2cTokenizer.eos_id,
    )
    model = LlamaForCausalLM(config)
    heads, kv_heads = header["n_heads"], header["n_kv_heads"]
    sd = {"model.embed_tokens.weight": t["tok_embeddings"], "model.norm.weight": t["norm"],
          "lm_head.weight": t["output"]}
    for i in range(header["n_layers"]):
        p = f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": t["attention_norm"][i],
            p + "self_attn.q_proj.weight": _permute_rotary(t["wq"][i], heads),
            p + "self_attn.k_proj.weight": _permute_rotary(t["wk"][i], kv_heads),
            p + "self_attn.v_proj.weight": t["wv"][i],
            p + "self_attn.o_proj.weight": t["wo"][i],
            p + "post_attention_layernorm.weight": t["ffn_norm"][i],
            p + "mlp.gate_proj.weight": t["w1"][i],
            p + "mlp.down_proj.weight": t["w2"][i],
            p + "mlp.up_proj.weight": t["w3"][i],
        })
    model.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    return model.eval()


def load_llama2c_model(path: Path) -> tuple[nn.Module, Llama2cTokenizer]:
    """A llama2.c folder (model .bin + tok*.bin) or model file -> (LlamaForCausalLM, Llama2cTokenizer)."""
    path = Path(path)
    model_file = _find_model_file(path)
    header, tensors = read_llama2c_checkpoint(model_file)
    tok_file = _pick_tokenizer(model_file.parent, header["vocab_size"])
    tokenizer = Llama2cTokenizer(tok_file, vocab_size=header["vocab_size"])
    return llama2c_to_hf(header, tensors), tokenizer
