"""Export adapted fast weights: a merged transformers model (static kinds) or a PEFT LoRA adapter.

Merging folds ``W = W0 + s (Φ1 ⊙ W0 + Φ2)`` (MLtD eq. 2, residual form) into the base weights with
each kind's ``dense`` weight; only static kinds can be merged (dynamic TARP and TAMS depend on the
input). A PEFT adapter is exact for kinds with ``peft_lora`` (``peft``'s scale ``lora_alpha / r``
equals ours). Both are self-contained: the weights as safetensors and the tokenizer as ``tokenizer.json``
(:mod:`metaprep.models.tokenizer_export`), so transformers (+ peft) load them with no metaprep import;
a PEFT export carries its base model in ``base/``. Models that neither form can hold (TAMS cells, dynamic
TARP) are served as an MLflow pyfunc model instead (:mod:`metaprep.registry.pyfunc`).

Exports are written into a staging folder next to the target and moved into place only once
everything else (the MLflow adapt run) has succeeded: :func:`staged_exports`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from metaprep.errors import MetaprepError
from metaprep.jsonio import nearest_folder
from metaprep.meta.algorithm import ALGORITHMS, algorithm_names
from metaprep.meta.model import MetaModel
from metaprep.models.tokenizer_export import save_standalone_tokenizer
from metaprep.reparam.context import FastWeights
from metaprep.reparam.kinds import REPARAM_KINDS
from metaprep.reparam.layers import ReparamLinear
from metaprep.tasks.families import ENCODER_FAMILIES

PEFT_BASE = "base"  # the subfolder of a PEFT export holding its base model


def save_fast_weights(fast: FastWeights, path: Path) -> None:
    save_file({f"{layer}--{f}": t.detach().float().contiguous() for layer, fs in fast.items() for f, t in fs.items()},
              str(path))


def check_exportable(algorithm: str, kind: str, family: str, *, merged: bool, peft: bool,
                     register: bool = False) -> None:
    """Refuse an export the prepared model cannot give, from its spec alone (algorithm, reparam kind, task
    family): ``jobs.adapt`` calls it as soon as the spec is read, before the weights load or adaptation starts.
    Each error names the algorithms and kinds that do export that way."""
    static = ", ".join(k for k, v in REPARAM_KINDS.items() if v.mergeable)
    tams = ", ".join(algorithm_names(uses_tams=True))
    if merged and ALGORITHMS[algorithm].uses_tams:
        raise MetaprepError(f"--export-merged: algorithm {algorithm} adds TAMS cells, whose output depends on the "
                            f"input, so they cannot be folded into a transformers model; every algorithm but "
                            f"{tams} exports merged with reparam.kind {static}; serve this model with --register NAME")
    if merged and not REPARAM_KINDS[kind].mergeable:
        raise MetaprepError(f"--export-merged: reparam.kind {kind} depends on the input, so it cannot be folded into "
                            f"the weights; kinds {static} merge (with any algorithm but {tams}); serve this model "
                            f"with --register NAME")
    if peft and not REPARAM_KINDS[kind].peft_lora:
        lora = ", ".join(k for k, v in REPARAM_KINDS.items() if v.peft_lora)
        merges = REPARAM_KINDS[kind].mergeable and not ALGORITHMS[algorithm].uses_tams
        other = "--export-merged or --register NAME" if merges else "--register NAME"
        raise MetaprepError(f"--export-peft: PEFT holds LoRA adapters only, so it needs reparam.kind {lora} "
                            f"(algorithms {', '.join(algorithm_names(needs_tarp=False))}); the model uses {kind} "
                            f"(algorithm {algorithm}); use {other}")
    if (peft or register) and family in ENCODER_FAMILIES:
        flag = "--export-peft" if peft else "--register"
        raise MetaprepError(f"{flag}: the model is a multiple-choice scorer (tasks.family={family}), a sentence "
                            f"encoder, not a causal LM that completes text; use --export-merged (AutoModel loads it)")


@contextlib.contextmanager
def staged_exports(targets: dict[str, Path]) -> Iterator[tuple[dict[str, Path], Callable[[], None]]]:
    """Staging folders (one per target, on its file system) and ``publish()``, which moves each into its
    target (entries of the same name replaced; the folder was checked to be new, empty or --overwrite).
    Whatever was not published is removed on exit, so a failure leaves the targets untouched."""
    staged = {key: Path(tempfile.mkdtemp(prefix=f".{t.name}.partial-", dir=nearest_folder(t.parent)))
              for key, t in targets.items()}

    def publish() -> None:
        for key, target in targets.items():
            target.mkdir(parents=True, exist_ok=True)
            for entry in sorted(staged[key].iterdir()):
                dest = target / entry.name
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                shutil.move(str(entry), str(dest))

    try:
        yield staged, publish
    finally:
        for folder in staged.values():
            shutil.rmtree(folder, ignore_errors=True)


def _delta(layer: ReparamLinear, f: dict[str, torch.Tensor]) -> torch.Tensor:
    dense = layer.impl.dense(layer.w0(), f)
    if dense is None:
        static = ", ".join(k for k, v in REPARAM_KINDS.items() if v.mergeable)
        raise MetaprepError(f"reparam.kind {layer.kind}: only static kinds ({static}) can be merged into a "
                            f"transformers model")
    return dense


def context_length(lm: torch.nn.Module) -> int:
    """The model's context length (Llama ``max_position_embeddings``, GPT-2 ``n_positions``)."""
    config = lm.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)


@torch.no_grad()
def export_merged(model: MetaModel, fast: FastWeights, task: int, out: Path, tokenizer: Any) -> None:
    """Save the base with task ``task``'s adapted weights folded in, and its tokenizer:
    ``AutoModelForCausalLM`` and ``AutoTokenizer`` load the folder with no metaprep import."""
    if model.controller is not None:
        raise MetaprepError("--export-merged: models with TAMS cells (algorithm mltd) cannot be merged; "
                            "serve them with --register NAME")
    state = {k: v.detach().clone() for k, v in model.lm.state_dict().items()}
    for name, module in model.lm.named_modules():
        if isinstance(module, ReparamLinear) and name in fast:
            delta = module.scale * _delta(module, {k: v[task].float() for k, v in fast[name].items()})
            state[f"{name}.weight"] += delta.T if module.conv1d else delta
    out.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(out, state_dict=state, safe_serialization=True)
    save_standalone_tokenizer(tokenizer, out, context_length(model.lm))


@torch.no_grad()
def export_peft(model: MetaModel, fast: FastWeights, task: int, out: Path, tokenizer: Any,
                published: Path | None = None) -> None:
    """A PEFT LoRA adapter that loads with transformers + peft alone.

    ``out`` gets ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's LoRA layout) and the
    tokenizer; ``out/base`` the base model (safetensors) and the tokenizer. ``base_model_name_or_path`` is
    the absolute path of ``base`` where the folder is ``published`` (default ``out``): PEFT and transformers
    resolve a relative path against the working directory, not the adapter folder, so a moved export needs
    its ``adapter_config.json`` updated (or the base passed to ``PeftModel.from_pretrained``)."""
    wrappers = {n: m for n, m in model.lm.named_modules() if isinstance(m, ReparamLinear)}
    kinds = {m.kind for m in wrappers.values()}
    if not all(m.impl.peft_lora for m in wrappers.values()):
        peft = ", ".join(k for k, v in REPARAM_KINDS.items() if v.peft_lora)
        raise MetaprepError(f"--export-peft: needs reparam.kind {peft}, the model uses {', '.join(sorted(kinds))}")
    any_layer = next(iter(wrappers.values()))
    tensors = {}
    for name in wrappers:
        a, b = fast[name]["A"][task].float(), fast[name]["B"][task].float()
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    base = out / PEFT_BASE
    base.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().clone() for k, v in model.lm.state_dict().items()}
    model.lm.save_pretrained(base, state_dict=state, safe_serialization=True)
    for folder in (base, out):  # AutoPeftModel reads the adapter folder's tokenizer (and never asks the Hub then)
        save_standalone_tokenizer(tokenizer, folder, context_length(model.lm))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": any_layer.rank,
              "lora_alpha": any_layer.scale * any_layer.rank, "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted({n.split(".")[-1] for n in wrappers}),
              "base_model_name_or_path": str(Path(published or out).resolve() / PEFT_BASE),
              "fan_in_fan_out": any_layer.conv1d, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
