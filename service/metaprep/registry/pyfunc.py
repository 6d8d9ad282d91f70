"""An adapted model as an MLflow ``pyfunc`` model: what ``jobs.adapt --register NAME`` registers.

Every prepared model, TARP and TAMS included, is after adaptation its base, its controller and the task's
fast weights (plus the TAMS architecture the controller chose). A registered version holds them as
artifacts in the registry formats (:mod:`metaprep.registry.artifacts`: safetensors + JSON, checked against
their manifests on load; the base is always a full copy, never a reference to a local file), the
``metaprep`` package as code (``code_paths``) and :class:`AdaptedLanguageModel` as the model through
MLflow's "models from code" (``pyfunc_entry.py``), so nothing is pickled and
``mlflow models serve -m models:/NAME/1 --env-manager local`` serves it from the registry alone.

``predict`` takes a DataFrame with a ``prompt`` column (param ``max_new_tokens``, default
:data:`DEFAULT_NEW_TOKENS`) and returns the greedy completion of each prompt
(:func:`metaprep.bench.generate.greedy_generate`: ``bos prompt`` as in training, stop at EOS).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from metaprep.errors import RegistryError
from metaprep.reparam.context import FastWeights

DEFAULT_NEW_TOKENS = 32
ENTRY = Path(__file__).with_name("pyfunc_entry.py")  # the models-from-code file MLflow runs on load
ADAPTED = "adapted"  # artifact folder: fast_weights.safetensors (+ arch.safetensors for TAMS) + manifest


def save_adapted(fast: FastWeights, arch: torch.Tensor | None, folder: Path) -> None:
    """One task's adapted fast weights (``layer--factor`` tensors with their task dimension of 1) and the
    TAMS architecture, as safetensors with a manifest."""
    from metaprep.registry.artifacts import write_manifest
    from metaprep.registry.export import save_fast_weights

    folder.mkdir(parents=True, exist_ok=True)
    save_fast_weights(fast, folder / "fast_weights.safetensors")
    if arch is not None:
        save_file({"arch": arch.detach().float().contiguous()}, str(folder / "arch.safetensors"))
    write_manifest(folder)


def load_adapted(folder: Path) -> tuple[FastWeights, torch.Tensor | None]:
    """What :func:`save_adapted` wrote (checked against its manifest)."""
    from metaprep.registry.artifacts import verify_manifest

    verify_manifest(folder, "adapted fast weights")
    fast: FastWeights = {}
    for key, tensor in load_file(folder / "fast_weights.safetensors").items():
        layer, factor = key.rsplit("--", 1)
        fast.setdefault(layer, {})[factor] = tensor
    arch_file = folder / "arch.safetensors"
    return fast, (load_file(arch_file)["arch"] if arch_file.is_file() else None)


def complete(model: Any, tokenizer: Any, fast: FastWeights, arch: torch.Tensor | None, prompts: list[str],
             max_new_tokens: int) -> list[str]:
    """Greedy completions of ``prompts`` by ``model`` with one task's fast weights ``fast`` / ``arch``."""
    from metaprep.bench.generate import greedy_generate
    from metaprep.registry.export import context_length

    max_len = context_length(model.lm)
    if not 1 <= max_new_tokens < max_len:
        raise ValueError(f"max_new_tokens: must be between 1 and {max_len - 1} (the model's context), "
                         f"got {max_new_tokens}")
    if not prompts:
        return []
    return greedy_generate(model, tokenizer, [prompts], fast, arch, max_new_tokens, max_len,
                           stop_at_newline=False)[0]


class AdaptedLanguageModel(mlflow.pyfunc.PythonModel):
    """A prepared model with one task's adapted fast weights, completing prompts (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        from metaprep.registry.artifacts import load_prepared

        art = context.artifacts
        self.model, loaded, _ = load_prepared(Path(art["base"]), Path(art["controller"]))
        self.model.eval()
        self.tokenizer = loaded.tokenizer
        self.fast, self.arch = load_adapted(Path(art[ADAPTED]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        if not isinstance(model_input, pd.DataFrame) or "prompt" not in model_input.columns:
            raise ValueError("expected a DataFrame with a 'prompt' column")
        new_tokens = int((params or {}).get("max_new_tokens") or DEFAULT_NEW_TOKENS)
        with torch.no_grad():
            return complete(self.model, self.tokenizer, self.fast, self.arch,
                            [str(p) for p in model_input["prompt"]], new_tokens)


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_NEW_TOKENS)]))


def _requirements() -> list[str]:
    """Pinned like this environment (``--env-manager local`` uses it as is); given, so MLflow does not
    load the model in a subprocess to infer them."""
    import safetensors
    import tokenizers
    import transformers

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}", f"tokenizers=={tokenizers.__version__}",
            f"safetensors=={safetensors.__version__}", f"pandas=={pd.__version__}"]


def register_adapted(tracking: str, run_id: str, name: str, model: Any, loaded: Any, cfg: Any,
                     fast: FastWeights, arch: torch.Tensor | None, tags: dict[str, str]) -> str:
    """Log the adapted model into the adapt run ``run_id`` as a pyfunc model, register it as ``name`` (a new
    version) with ``tags``; returns ``models:/NAME/VERSION``."""
    from mlflow.tracking import MlflowClient

    from metaprep.registry.artifacts import export_prepared

    with tempfile.TemporaryDirectory(prefix="metaprep-pyfunc-") as tmp:
        out = Path(tmp)
        export_prepared(model, loaded, cfg, out, reference_ok=False)
        save_adapted(fast, arch, out / ADAPTED)
        mlflow.set_tracking_uri(tracking)
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # an input example would make MLflow load and run the model at log time; the signature says it all
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(ENTRY), code_paths=[str(Path(__file__).parents[1])],
                artifacts={key: str(out / key) for key in ("base", "controller", ADAPTED)},
                signature=_signature(), pip_requirements=_requirements(), registered_model_name=name)
    version = info.registered_model_version
    if version is None:
        raise RegistryError(f"--register {name}: MLflow logged the model but did not register a version")
    client = MlflowClient(tracking_uri=tracking)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    return f"models:/{name}/{version}"
