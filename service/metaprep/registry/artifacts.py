"""Registry artifact formats: the prepared base and the controller, as safetensors + JSON.

``NAME-base`` folder (``base/``):
  - ``format: full``: ``config.json`` + ``model.safetensors`` (transformers ``save_pretrained``;
    ``AutoModelForCausalLM.from_pretrained(folder)`` loads it) and the tokenizer;
  - ``format: reference``: when the base was frozen, only ``metaprep_base.json`` naming the original
    model (path, kind, size) — the learned difference lives in the controller.
``NAME-controller`` folder (``controller/``): ``fast_init.safetensors`` (TARP/LoRA meta-init and
TAMS op weights), ``controller.safetensors`` (the architecture controller, for ``mltd``) and
``spec.json`` (algorithm, reparam/search config, inner-loop settings, layout).
Each folder has a ``manifest.json`` of SHA-256 digests written last; loading checks every digest,
so a tampered or truncated artifact is refused. Nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from metaprep import __version__
from metaprep.config import MetaTrainConfig, from_dict
from metaprep.errors import RegistryError
from metaprep.meta.algorithm import ALGORITHMS
from metaprep.meta.build import build_meta_model
from metaprep.meta.model import MetaModel
from metaprep.models.base import LoadedModel
from metaprep.models.tokenizer import ByteTokenizer, HFTokenizer
from metaprep.tasks.families import ENCODER_FAMILIES

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(folder)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def verify_manifest(folder: Path, what: str) -> None:
    path = folder / MANIFEST
    if not path.exists():
        raise RegistryError(f"{what}: {folder} has no {MANIFEST} (not a metaprep artifact or incomplete upload)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RegistryError(f"{what}: {path} is corrupt (invalid JSON)") from None
    for rel, entry in manifest.items():
        f = folder / rel
        if not f.exists():
            raise RegistryError(f"{what}: {rel} is missing from {folder}")
        if f.stat().st_size != entry["bytes"] or _sha256(f) != entry["sha256"]:
            raise RegistryError(f"{what}: {rel} does not match its recorded SHA-256 (tampered or truncated); "
                                f"refusing to load")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in module.state_dict().items()}


def save_tokenizer(tokenizer, folder: Path) -> dict:
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "byte"}
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.tok.save_pretrained(folder)
        return {"kind": "hf"}
    if hasattr(tokenizer, "save_pretrained"):  # an encoder family's own transformers tokenizer
        tokenizer.save_pretrained(folder)
        return {"kind": "hf_raw"}
    if getattr(tokenizer, "path", None):
        shutil.copy(tokenizer.path, folder / "tokenizer.bin")
        return {"kind": "llama2c", "file": "tokenizer.bin", "vocab_size": tokenizer.vocab_size}
    raise RegistryError(f"cannot export tokenizer of type {type(tokenizer).__name__}")


def load_tokenizer(spec: dict, folder: Path):
    if spec["kind"] == "byte":
        return ByteTokenizer()
    if spec["kind"] in ("hf", "hf_raw"):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        return HFTokenizer(tok) if spec["kind"] == "hf" else tok
    from metaprep.models.llama2c import Llama2cTokenizer

    return Llama2cTokenizer(folder / spec["file"], spec.get("vocab_size"))


def export_prepared(model: MetaModel, loaded: LoadedModel, cfg: MetaTrainConfig, out: Path) -> tuple[Path, Path]:
    """Write ``out/base`` and ``out/controller`` (caller gathers ZeRO-3 params first)."""
    base, ctrl = out / "base", out / "controller"
    for d in (base, ctrl):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    frozen = (cfg.meta.freeze_base or not ALGORITHMS[cfg.algorithm].meta_trains) and loaded.kind != "tiny"
    info = {"format": "reference" if frozen else "full", "kind": loaded.kind, "source": loaded.source,
            "metaprep_version": __version__}
    if frozen:
        info["tokenizer"] = {"kind": "from_source"}
    else:
        model.lm.save_pretrained(base, state_dict=_state(model.lm), safe_serialization=True)
        info["tokenizer"] = save_tokenizer(loaded.tokenizer, base)
    (base / "metaprep_base.json").write_text(json.dumps(info, indent=1))
    save_file(_state(model.fast_init), ctrl / "fast_init.safetensors")
    if model.controller is not None:
        save_file(_state(model.controller), ctrl / "controller.safetensors")
    spec = {"algorithm": cfg.algorithm, "seed": cfg.seed, "reparam": dataclasses.asdict(cfg.reparam),
            "search": dataclasses.asdict(cfg.search),
            "meta": {k: getattr(cfg.meta, k) for k in ("inner_lr", "inner_steps", "inner_optimizer", "second_order")},
            "tasks": dataclasses.asdict(cfg.tasks),  # family, data location, episode shape and the fixed split
            "model": {"kind": loaded.kind, "source": loaded.source, "tiny": dataclasses.asdict(cfg.model.tiny)},
            "layout": model.fast_init.layout, "metaprep_version": __version__}
    (ctrl / "spec.json").write_text(json.dumps(spec, indent=1))
    write_manifest(base)
    write_manifest(ctrl)
    return base, ctrl


def load_prepared(base: Path, ctrl: Path) -> tuple[MetaModel, LoadedModel, MetaTrainConfig]:
    """Rebuild a MetaModel from exported folders (checked against their manifests)."""
    verify_manifest(base, "base")
    verify_manifest(ctrl, "controller")
    info = json.loads((base / "metaprep_base.json").read_text())
    spec = json.loads((ctrl / "spec.json").read_text())
    cfg = from_dict(MetaTrainConfig, {
        "algorithm": spec["algorithm"], "seed": spec["seed"], "reparam": spec["reparam"], "search": spec["search"],
        "meta": spec["meta"], "model": {"path": info["source"], "kind": info["kind"], "tiny": spec["model"]["tiny"]},
        "tasks": spec.get("tasks", {}),  # the recipe's tasks: adaptation uses its seq_len, --meta-test its split
    }, source=str(ctrl / "spec.json"))
    if info["format"] == "full":
        from transformers import AutoModel, AutoModelForCausalLM

        # the sentence-encoder families (convai2_mc) export an encoder, every other family a causal LM
        auto = AutoModel if cfg.tasks.family in ENCODER_FAMILIES else AutoModelForCausalLM
        lm = auto.from_pretrained(base, local_files_only=True, trust_remote_code=False, dtype=torch.float32,
                                  use_safetensors=True)
        loaded = LoadedModel(lm, load_tokenizer(info["tokenizer"], base), info["kind"], info["source"])
    else:
        from metaprep.meta.build import load_for_family

        loaded = load_for_family(cfg)
    model, loaded = build_meta_model(cfg, loaded)
    try:
        model.fast_init.load_state_dict(load_file(ctrl / "fast_init.safetensors"))
        if model.controller is not None:
            model.controller.load_state_dict(load_file(ctrl / "controller.safetensors"))
    except (RuntimeError, OSError) as exc:
        raise RegistryError(f"controller {ctrl}: weights do not match spec.json ({str(exc).splitlines()[0]})") from None
    return model, loaded, cfg
