"""Registry artifact formats: the prepared base and the controller, as safetensors + JSON.

``NAME-base`` folder (``base/``):
  - ``format: full``: ``config.json`` + ``model.safetensors`` (transformers ``save_pretrained``;
    ``AutoModelForCausalLM.from_pretrained(folder)`` loads it) and the tokenizer;
  - ``format: reference``: when the base was frozen, only ``metaprep_base.json`` naming the original
    model (path, kind, size) — the learned difference lives in the controller.
  A base whose weights are a transformers model (every full base; a reference to a transformers folder
  with safetensors) is also an MLflow ``transformers`` model (:func:`add_transformers_flavor`): ``MLmodel``
  names the folder itself (or the referenced folder) as the weights and ``components/tokenizer`` as the
  tokenizer, so ``mlflow.transformers.load_model("models:/NAME-base@candidate")`` gives a pipeline with no
  second copy of the weights. ``metaprep_base.json`` field ``transformers_flavor`` holds the pipeline task,
  or ``none: WHY``.
``NAME-controller`` folder (``controller/``): ``fast_init.safetensors`` (TARP/LoRA meta-init and
TAMS op weights), ``controller.safetensors`` (the architecture controller, for ``mltd``),
``spec.json`` (algorithm, reparam/search config, inner-loop settings, layout) and ``task_split.json``
(the names of the meta-train / meta-val / meta-test tasks).
Each folder has a ``manifest.json`` of SHA-256 digests written last. Loading refuses a folder whose
manifest is not a non-empty mapping listing exactly its files (no ``..``, no absolute path, no unlisted
file), a digest or size that does not match (tampered or truncated), and any pickle: weights load from
safetensors only, so nothing is unpickled. The one file a folder may hold unlisted is the
``registered_model_meta`` (name and version, never read by metaprep) that MLflow writes into a registered
MLflow model whenever it downloads one by ``models:/`` (into the store itself when it is local). A base
passed as the controller (or the two swapped) is named.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import load_file, save_file

from metaprep import __version__
from metaprep.config import MetaTrainConfig, TasksConfig, from_dict
from metaprep.errors import MetaprepError, RegistryError
from metaprep.jsonio import read_limited
from metaprep.meta.algorithm import ALGORITHMS
from metaprep.meta.build import build_meta_model
from metaprep.meta.model import MetaModel
from metaprep.models.base import LoadedModel
from metaprep.models.tokenizer import ByteTokenizer, HFTokenizer
from metaprep.reparam.kinds import REPARAM_KINDS
from metaprep.tasks.base import TaskSplit
from metaprep.tasks.families import ENCODER_FAMILIES

MANIFEST = "manifest.json"
BASE_INFO, SPEC, SPLIT = "metaprep_base.json", "spec.json", "task_split.json"
MLMODEL = "MLmodel"
MLFLOW_META = "registered_model_meta"  # MLflow's models_artifact_repo.REGISTERED_MODEL_META_FILE_NAME
FLAVOR_TOKENIZER = "components/tokenizer"  # where MLflow's transformers flavor reads a pipeline's tokenizer
FLAVOR_PIPELINES = {"text-generation": "TextGenerationPipeline", "feature-extraction": "FeatureExtractionPipeline"}
MAX_JSON_BYTES = 16 << 20  # manifest, metaprep_base.json and spec.json are a few KB
PICKLES = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")  # what torch.load would read


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {p.relative_to(folder).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _artifact_files(folder: Path, what: str) -> set[str]:
    """Relative paths of the files under ``folder`` except the manifest; a link or special file is refused."""
    files = set()
    for root, dirs, names in os.walk(folder):  # does not follow links to folders
        for name in dirs + names:
            p = Path(root, name)
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                raise RegistryError(f"{what}: {folder} holds {rel}, a link or special file; an artifact holds "
                                    f"plain files only")
            if p.is_file():
                files.add(rel)
    return files - {MANIFEST, MLFLOW_META}


def _manifest_entries(folder: Path, what: str) -> dict[str, dict]:
    """``manifest.json`` of ``folder``: a non-empty mapping of relative path -> {sha256, bytes}."""
    path = folder / MANIFEST
    if not path.is_file():
        raise RegistryError(f"{what}: {folder} has no {MANIFEST} (not a metaprep artifact or incomplete upload)")
    try:
        manifest = json.loads(read_limited(path, MANIFEST, MAX_JSON_BYTES, RegistryError))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise RegistryError(f"{what}: {path} is corrupt (invalid JSON)") from None
    expected = 'a non-empty mapping {"RELATIVE/PATH": {"sha256": HEX, "bytes": N}} of every file of the artifact'
    if not isinstance(manifest, dict) or not manifest:
        raise RegistryError(f"{what}: {path} must be {expected}, got {json.dumps(manifest)[:40]}")
    for rel, entry in manifest.items():
        parts = PurePosixPath(rel).parts
        if (not rel or rel.startswith("/") or "\\" in rel or ".." in parts or "." in rel.split("/")
                or rel == MANIFEST):
            raise RegistryError(f"{what}: {path} lists {rel!r}, not a path inside the artifact folder; expected "
                                f"relative paths without '..'")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("bytes"), int) and not isinstance(entry.get("bytes"), bool)):
            raise RegistryError(f"{what}: {path} entry {rel!r} must be {{\"sha256\": HEX, \"bytes\": N}}")
    return manifest


def verify_manifest(folder: Path, what: str) -> None:
    """Refuse ``folder`` unless its manifest lists exactly its files, each with its recorded size and SHA-256,
    and none of them is a pickle (nothing is unpickled)."""
    manifest = _manifest_entries(folder, what)
    files = _artifact_files(folder, what)
    missing, unlisted = sorted(manifest.keys() - files), sorted(files - manifest.keys())
    if missing:
        raise RegistryError(f"{what}: {missing[0]} is missing from {folder}")
    if unlisted:
        raise RegistryError(f"{what}: {folder} holds {unlisted[0]}, which {MANIFEST} does not list (tampered); "
                            f"refusing to load")
    pickles = [rel for rel in sorted(files) if any(fnmatch.fnmatch(PurePosixPath(rel).name, pattern)
                                                   for pattern in PICKLES)]
    if pickles:
        raise RegistryError(f"{what}: {folder} holds {pickles[0]}, a pickle; metaprep artifacts hold safetensors "
                            f"and JSON only")
    for rel, entry in manifest.items():
        f = folder / rel
        if f.stat().st_size != entry["bytes"] or _sha256(f) != entry["sha256"]:
            raise RegistryError(f"{what}: {rel} does not match its recorded SHA-256 (tampered or truncated); "
                                f"refusing to load")


def _read_json(folder: Path, name: str, what: str, other: str) -> dict:
    """``folder/name`` as a JSON mapping; a folder holding the ``other`` kind's file is named as swapped."""
    path = folder / name
    if not path.is_file():
        swapped = (folder / (SPEC if name == BASE_INFO else BASE_INFO)).is_file()
        hint = (f"it is a {other} artifact: give a {what} URI here (--base and --controller swapped?)" if swapped
                else f"not a {what} artifact")
        raise RegistryError(f"{what}: {folder} has no {name} ({hint})")
    try:
        data = json.loads(read_limited(path, name, MAX_JSON_BYTES, RegistryError))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise RegistryError(f"{what}: {path} is corrupt (invalid JSON)") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{what}: {path} must be a JSON object")
    return data


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
    if not isinstance(spec, dict):
        raise RegistryError(f"base {folder}: {BASE_INFO} field 'tokenizer' must be an object, got {spec!r}")
    if spec.get("kind") == "byte":
        return ByteTokenizer()
    if spec.get("kind") in ("hf", "hf_raw"):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        return HFTokenizer(tok) if spec["kind"] == "hf" else tok
    name = spec.get("file") if spec.get("kind") == "llama2c" else None
    if not isinstance(name, str) or name in ("", ".", "..") or PurePosixPath(name).name != name:
        raise RegistryError(f"base {folder}: {BASE_INFO} names tokenizer {spec!r}; expected kind byte, hf, hf_raw, "
                            f"or llama2c with a file inside the folder")
    from metaprep.models.llama2c import Llama2cTokenizer

    return Llama2cTokenizer(folder / name, spec.get("vocab_size"))


def export_prepared(model: MetaModel, loaded: LoadedModel, cfg: MetaTrainConfig, out: Path,
                    reference_ok: bool = True, split: TaskSplit | None = None) -> tuple[Path, Path]:
    """Write ``out/base`` and ``out/controller`` (caller gathers ZeRO-3 params first). A frozen base is a
    reference to the original model unless ``reference_ok`` is False (a self-contained copy, e.g. for serving).
    ``split``: the run's tasks, whose names go to ``controller/task_split.json``."""
    base, ctrl = out / "base", out / "controller"
    for d in (base, ctrl):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    frozen = (reference_ok and (cfg.meta.freeze_base or not ALGORITHMS[cfg.algorithm].meta_trains)
              and loaded.kind != "tiny")
    info = {"format": "reference" if frozen else "full", "kind": loaded.kind, "source": loaded.source,
            "metaprep_version": __version__}
    if frozen:
        info["tokenizer"] = {"kind": "from_source"}
    else:
        model.lm.save_pretrained(base, state_dict=_state(model.lm), safe_serialization=True)
        info["tokenizer"] = save_tokenizer(loaded.tokenizer, base)
    info["transformers_flavor"] = add_transformers_flavor(base, model.lm, loaded, cfg.tasks.family, frozen)
    (base / BASE_INFO).write_text(json.dumps(info, indent=1))
    save_file(_state(model.fast_init), ctrl / "fast_init.safetensors")
    if model.controller is not None:
        save_file(_state(model.controller), ctrl / "controller.safetensors")
    spec = {"algorithm": cfg.algorithm, "seed": cfg.seed, "reparam": dataclasses.asdict(cfg.reparam),
            "search": dataclasses.asdict(cfg.search),
            "meta": {k: getattr(cfg.meta, k) for k in ("inner_lr", "inner_steps", "inner_optimizer", "second_order")},
            "tasks": dataclasses.asdict(cfg.tasks),  # family, data location, episode shape and the fixed split
            "model": {"kind": loaded.kind, "source": loaded.source, "tiny": dataclasses.asdict(cfg.model.tiny)},
            "layout": model.fast_init.layout, "metaprep_version": __version__}
    (ctrl / SPEC).write_text(json.dumps(spec, indent=1))
    if split is not None:
        (ctrl / SPLIT).write_text(json.dumps(split_record(split), indent=1))
    write_manifest(base)
    write_manifest(ctrl)
    return base, ctrl


def split_record(split: TaskSplit) -> dict:
    """The task split as ``task_split.json`` holds it: counts and names of each part."""
    parts = {"meta_train": split.train, "meta_val": split.val, "meta_test": split.test}
    return {"counts": {k: len(v) for k, v in parts.items()}, **{k: [t.name for t in v] for k, v in parts.items()}}


def add_transformers_flavor(base: Path, lm: torch.nn.Module, loaded: LoadedModel, family: str,
                            reference: bool) -> str:
    """Make ``base`` an MLflow ``transformers`` model as well; returns its pipeline task, or ``none: WHY``.

    ``MLmodel``'s flavor names the weights in place: ``model_binary: .`` (the folder's own ``config.json`` +
    ``model.safetensors``) or, for a reference, MLflow's ``local_base_model_path`` (the referenced folder,
    only if its weights are safetensors). The tokenizer is written as ``components/tokenizer``
    (:mod:`metaprep.models.tokenizer_export`: the same ids as ours). The model and tokenizer classes are
    transformers' own, so MLflow never sets ``trust_remote_code``; a pyfunc flavor serves it."""
    import mlflow.pyfunc
    import transformers
    import yaml
    from mlflow.models import Model, ModelSignature
    from mlflow.transformers.flavor_config import FlavorKey
    from mlflow.types import ColSpec, Schema

    from metaprep.models.tokenizer_export import save_standalone_tokenizer
    from metaprep.registry.export import context_length
    from metaprep.registry.pyfunc import _requirements

    arch = type(lm).__name__
    if getattr(transformers, arch, None) is not type(lm):
        return f"none: the base is a {arch}, not a transformers model class"
    source = Path(loaded.source)
    if reference and not (loaded.kind == "hf" and source.is_dir() and any(source.glob("*.safetensors"))):
        return (f"none: the base is a reference to a {loaded.kind} model ({loaded.source}), not a transformers "
                f"folder with safetensors weights")
    try:
        save_standalone_tokenizer(loaded.tokenizer, base / FLAVOR_TOKENIZER, context_length(lm))
    except MetaprepError as exc:
        shutil.rmtree(base / "components", ignore_errors=True)
        return f"none: {exc}"
    task = "feature-extraction" if family in ENCODER_FAMILIES else "text-generation"
    # AutoTokenizer: a transformers class in every version (tokenizer_config.json names the concrete one)
    flavor = {FlavorKey.TASK: task, FlavorKey.INSTANCE_TYPE: FLAVOR_PIPELINES[task], FlavorKey.MODEL_TYPE: arch,
              FlavorKey.MODEL_NAME: loaded.source, FlavorKey.TORCH_DTYPE: "torch.float32",
              FlavorKey.COMPONENT_TYPE.format(FlavorKey.TOKENIZER): "AutoTokenizer",
              FlavorKey.COMPONENTS: [FlavorKey.TOKENIZER]}
    if reference:
        flavor[FlavorKey.MODEL_LOCAL_BASE] = str(source.resolve())
    else:
        flavor[FlavorKey.MODEL_BINARY] = "."
    if int(transformers.__version__.split(".")[0]) < 5:  # transformers 5 pipelines take no framework
        flavor[FlavorKey.FRAMEWORK] = "pt"
    mlmodel = Model()
    mlmodel.add_flavor("transformers", transformers_version=transformers.__version__, code=None, **flavor)
    mlflow.pyfunc.add_to_model(mlmodel, loader_module="mlflow.transformers", python_env="python_env.yaml")
    if task == "text-generation":  # MLflow's signature for text generation: a prompt in, a text out
        mlmodel.signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]))
    mlmodel.save(str(base / MLMODEL))
    (base / "requirements.txt").write_text("\n".join(_requirements()) + "\n")
    (base / "python_env.yaml").write_text(yaml.safe_dump({
        "python": platform.python_version(), "build_dependencies": ["pip"], "dependencies": ["-r requirements.txt"]}))
    return task


def read_base_info(base: Path) -> dict:
    """The base's ``metaprep_base.json`` (a controller given as the base is named as swapped)."""
    return _read_json(base, BASE_INFO, "base", "controller")


def read_spec(ctrl: Path) -> tuple[str, str, str]:
    """(algorithm, reparam kind, task family) from the controller's ``spec.json``, read before any weights load
    so that what the model cannot do (an export, a flag) is refused in seconds; :func:`load_prepared` verifies
    the folder."""
    spec = _read_json(ctrl, SPEC, "controller", "base")
    try:
        algorithm, kind = spec["algorithm"], spec["reparam"]["kind"]
        family = (spec.get("tasks") or {}).get("family", TasksConfig.family)  # no tasks: the config's default
    except (KeyError, TypeError, AttributeError) as exc:
        raise RegistryError(f"controller {ctrl}: {SPEC} lacks a valid field ({exc.__class__.__name__}: {exc}); "
                            f"re-export the prepared model") from None
    if not all(isinstance(v, str) for v in (algorithm, kind, family)) or algorithm not in ALGORITHMS \
            or kind not in REPARAM_KINDS:
        raise RegistryError(f"controller {ctrl}: {SPEC} names algorithm {algorithm!r} and reparam.kind {kind!r}; "
                            f"expected one of {', '.join(ALGORITHMS)} and one of {', '.join(REPARAM_KINDS)}")
    return algorithm, kind, family


def load_prepared(base: Path, ctrl: Path) -> tuple[MetaModel, LoadedModel, MetaTrainConfig]:
    """Rebuild a MetaModel from exported folders (checked against their manifests; weights from safetensors only)."""
    verify_manifest(base, "base")
    verify_manifest(ctrl, "controller")
    info = read_base_info(base)
    spec = _read_json(ctrl, SPEC, "controller", "base")
    try:
        cfg = from_dict(MetaTrainConfig, {
            "algorithm": spec["algorithm"], "seed": spec["seed"], "reparam": spec["reparam"],
            "search": spec["search"], "meta": spec["meta"],
            "model": {"path": info["source"], "kind": info["kind"], "tiny": spec["model"]["tiny"]},
            "tasks": spec.get("tasks", {}),  # the recipe's tasks: adaptation uses its seq_len, --meta-test its split
        }, source=str(ctrl / SPEC))
        fmt = info["format"]
    except (KeyError, TypeError) as exc:
        raise RegistryError(f"base {base} / controller {ctrl}: {BASE_INFO} or {SPEC} lacks a valid field "
                            f"({exc.__class__.__name__}: {exc}); re-export the prepared model") from None
    if fmt == "full":
        loaded = _load_full_base(base, info, cfg)
    elif fmt == "reference":
        _refuse_pickled_source(base, Path(info["source"]))
        from metaprep.meta.build import load_for_family

        loaded = load_for_family(cfg)
    else:
        raise RegistryError(f"base: {base / BASE_INFO} has format {fmt!r}; expected 'full' or 'reference'")
    model, loaded = build_meta_model(cfg, loaded)
    try:
        model.fast_init.load_state_dict(load_file(ctrl / "fast_init.safetensors"))
        if model.controller is not None:
            model.controller.load_state_dict(load_file(ctrl / "controller.safetensors"))
    except (RuntimeError, OSError) as exc:
        raise RegistryError(f"controller {ctrl}: weights do not match spec.json ({str(exc).splitlines()[0]})") from None
    return model, loaded, cfg


def _load_full_base(base: Path, info: dict, cfg: MetaTrainConfig) -> LoadedModel:
    """The transformers model saved in ``base`` (``model.safetensors``; never a pickled ``pytorch_model.bin``)."""
    from transformers import AutoModel, AutoModelForCausalLM

    # the sentence-encoder families (convai2_mc) export an encoder, every other family a causal LM
    auto = AutoModel if cfg.tasks.family in ENCODER_FAMILIES else AutoModelForCausalLM
    try:
        lm = auto.from_pretrained(base, local_files_only=True, trust_remote_code=False, dtype=torch.float32,
                                  use_safetensors=True)
        return LoadedModel(lm, load_tokenizer(info["tokenizer"], base), info["kind"], info["source"])
    except MetaprepError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"base {base}: cannot load the model or tokenizer ({str(exc).splitlines()[0][:200]}); "
                            f"a full base holds config.json, model.safetensors and its tokenizer") from None


def _refuse_pickled_source(base: Path, source: Path) -> None:
    """A reference base names the original model: load it only if its weights are safetensors."""
    if source.is_dir() and not any(source.glob("*.safetensors")) and any(
            any(source.glob(pattern)) for pattern in PICKLES):
        raise RegistryError(f"base {base}: references {source}, whose weights are pickle files (pytorch_model.bin); "
                            f"registry bases load safetensors only")
