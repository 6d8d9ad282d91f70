"""Export adapted fast weights: a merged transformers model (static kinds) or a PEFT LoRA adapter.

Merging folds ``W = W0 + s (Φ1 ⊙ W0 + Φ2)`` (MLtD eq. 2, residual form) into the base weights with
each kind's ``dense`` weight; only static kinds can be merged (dynamic TARP and TAMS depend on the
input). A PEFT adapter is exact for kinds with ``peft_lora`` (``peft``'s scale ``lora_alpha / r``
equals ours).

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

import torch
from safetensors.torch import save_file

from metaprep.errors import MetaprepError
from metaprep.jsonio import nearest_folder
from metaprep.meta.model import MetaModel
from metaprep.reparam.context import FastWeights
from metaprep.reparam.kinds import REPARAM_KINDS
from metaprep.reparam.layers import ReparamLinear


def save_fast_weights(fast: FastWeights, path: Path) -> None:
    save_file({f"{layer}--{f}": t.detach().float().contiguous() for layer, fs in fast.items() for f, t in fs.items()},
              str(path))


def check_exportable(model: MetaModel, merged: bool, peft: bool) -> None:
    """Refuse, before adapting, an export the model's kind cannot produce."""
    kinds = {m.kind for m in model.lm.modules() if isinstance(m, ReparamLinear)}
    if merged and model.controller is not None:
        raise MetaprepError("--export-merged: models with TAMS cells (algorithm mltd) cannot be merged; "
                            "use the fast-weights artifact")
    if merged and not all(REPARAM_KINDS[k].mergeable for k in kinds):
        static = ", ".join(k for k, v in REPARAM_KINDS.items() if v.mergeable)
        raise MetaprepError(f"--export-merged: only static kinds ({static}) can be merged into a transformers "
                            f"model, the model uses {', '.join(sorted(kinds))}")
    if peft and not all(REPARAM_KINDS[k].peft_lora for k in kinds):
        lora = ", ".join(k for k, v in REPARAM_KINDS.items() if v.peft_lora)
        raise MetaprepError(f"--export-peft: needs reparam.kind {lora}, the model uses {', '.join(sorted(kinds))}")


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


@torch.no_grad()
def export_merged(model: MetaModel, fast: FastWeights, task: int, out: Path, tokenizer_saver) -> None:
    """Save the base with task ``task``'s adapted weights folded in (``AutoModelForCausalLM`` loads it)."""
    if model.controller is not None:
        raise MetaprepError("--export-merged: models with TAMS cells (algorithm mltd) cannot be merged; "
                            "use the fast-weights artifact")
    state = {k: v.detach().clone() for k, v in model.lm.state_dict().items()}
    for name, module in model.lm.named_modules():
        if isinstance(module, ReparamLinear) and name in fast:
            delta = module.scale * _delta(module, {k: v[task].float() for k, v in fast[name].items()})
            state[f"{name}.weight"] += delta.T if module.conv1d else delta
    out.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(out, state_dict=state, safe_serialization=True)
    tokenizer_saver(out)


def export_peft(model: MetaModel, fast: FastWeights, task: int, out: Path, base_ref: str) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's LoRA layout."""
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
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": any_layer.rank,
              "lora_alpha": any_layer.scale * any_layer.rank, "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted({n.split(".")[-1] for n in wrappers}), "base_model_name_or_path": base_ref,
              "fan_in_fan_out": any_layer.conv1d, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
