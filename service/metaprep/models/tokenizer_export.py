"""Our tokenizers as files ``transformers.AutoTokenizer.from_pretrained`` loads (``tokenizer.json``).

Exports (``jobs.adapt --export-merged/--export-peft``) must load with transformers alone, so each
tokenizer is rebuilt as a ``tokenizers`` pipeline that gives the same ids:

- :class:`~metaprep.models.tokenizer.ByteTokenizer`: byte-level BPE without merges (one token per UTF-8
  byte, id = byte value, GPT-2's byte-to-unicode alphabet) plus ``<pad>`` 256, ``<s>`` 257, ``</s>`` 258;
- :class:`~metaprep.models.llama2c.Llama2cTokenizer`: the sentencepiece-style BPE of llama2.c, as
  transformers' own Llama converter builds it: " " becomes "▁" and a "▁" is prepended (llama2.c's dummy
  space), the merges are every split of a vocab piece into two vocab pieces, ranked by the merged piece's
  score (llama2.c merges the highest-scoring pair first), unknown characters fall back to ``<0xNN>``;
- a transformers tokenizer is saved as it is.

``tokenizer(text)`` prepends ``<s>`` (training sees ``bos prompt target eos``);
``tokenizer.encode(text, add_special_tokens=False)`` equals our ``encode(text)``. Special tokens are
never matched inside text (``split_special_tokens``), as in our tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from metaprep.errors import MetaprepError
from metaprep.models.tokenizer import ByteTokenizer, HFTokenizer

SPACE = "\u2581"  # sentencepiece's "▁"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what a byte-level ``tokenizer.json`` uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _specials(tok: Any, names: list[str], bos: str) -> None:
    """Register ``names`` as special tokens and prepend ``bos`` when special tokens are added."""
    from tokenizers import AddedToken, processors

    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, bos_id)])


def byte_tokenizer_json() -> Any:
    """A ``tokenizers.Tokenizer`` with the ids of :class:`ByteTokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: b for b, char in bytes_to_unicode().items()}
    vocab.update({"<pad>": ByteTokenizer.pad_id, "<s>": ByteTokenizer.bos_id, "</s>": ByteTokenizer.eos_id})
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    _specials(tok, ["<pad>", "<s>", "</s>"], "<s>")
    return tok


def _llama2c_names(tokenizer: Any) -> list[str]:
    """Each id's token string: specials renamed to ``<unk> <s> </s>``, " " spelled "▁" (byte pieces kept)."""
    from metaprep.models.llama2c import _BYTE_PIECE

    names = ["<unk>", "<s>", "</s>"]
    for raw in tokenizer.pieces[3:]:
        piece = raw.decode("utf-8", errors="replace")
        if SPACE in piece:
            raise MetaprepError(f"llama2.c tokenizer {tokenizer.path}: piece {piece!r} holds '▁', which the "
                                f"transformers export uses for spaces; cannot export it exactly")
        names.append(piece if _BYTE_PIECE.fullmatch(piece) else piece.replace(" ", SPACE))
    if len(set(names)) != len(names):
        raise MetaprepError(f"llama2.c tokenizer {tokenizer.path}: duplicate pieces; a transformers vocab maps "
                            f"each piece to one id, so the export cannot reproduce every id")
    return names


def llama2c_tokenizer_json(tokenizer: Any) -> Any:
    """A ``tokenizers.Tokenizer`` that encodes like llama2.c's ``run.c`` over the same vocab and scores."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    from metaprep.models.llama2c import _BYTE_PIECE

    names = _llama2c_names(tokenizer)
    vocab = {name: i for i, name in enumerate(names)}
    mergeable = {name for i, name in enumerate(names) if i > 2 and not _BYTE_PIECE.fullmatch(name)}
    ranked = sorted((-tokenizer.scores[vocab[name]], vocab[name], (name[:k], name[k:]))
                    for name in mergeable for k in range(1, len(name))
                    if name[:k] in mergeable and name[k:] in mergeable)
    tok = Tokenizer(models.BPE(vocab, [pair for _, _, pair in ranked], unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    _specials(tok, ["<unk>", "<s>", "</s>"], "<s>")
    return tok


def standalone_tokenizer(tokenizer: Any, max_length: int) -> Any:
    """A transformers tokenizer with the ids of ``tokenizer`` (one of ours, or a transformers one)."""
    from transformers import PreTrainedTokenizerFast

    from metaprep.models.llama2c import Llama2cTokenizer

    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.tok
    if hasattr(tokenizer, "save_pretrained"):  # an encoder family's own transformers tokenizer
        return tokenizer
    common = {"bos_token": "<s>", "eos_token": "</s>", "model_max_length": max_length,
              "clean_up_tokenization_spaces": False, "split_special_tokens": True}
    if isinstance(tokenizer, ByteTokenizer):
        return PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer_json(), pad_token="<pad>", **common)
    if isinstance(tokenizer, Llama2cTokenizer):
        return PreTrainedTokenizerFast(tokenizer_object=llama2c_tokenizer_json(tokenizer), unk_token="<unk>",
                                       **common)
    raise MetaprepError(f"cannot export a tokenizer of type {type(tokenizer).__name__} in a format transformers "
                        f"loads (supported: byte, llama2.c, transformers tokenizers)")


def save_standalone_tokenizer(tokenizer: Any, folder: Path, max_length: int) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (``AutoTokenizer.from_pretrained(folder)`` loads
    them with no metaprep import). The class is recorded as ``PreTrainedTokenizerFast``, which transformers
    4.x and 5.x both load."""
    standalone_tokenizer(tokenizer, max_length).save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's generic name, unknown to 4.x
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2))
