"""LM benchmark suites ``persona``, ``multidomain`` and ``summarization`` (DESIGN.md §4, issue 8).

Protocol, shared by every suite (and by :mod:`metaprep.bench.convai2_mc`):

* **Methods** (names of ``algorithm``): ``finetune`` (the pretrained base, no meta-training),
  ``multitask`` (standard retraining), ``fomaml``, ``maml``, ``reptile``, ``meta_lora`` — all with
  LoRA fast weights — and ``mltd_tarp`` / ``mltd`` with TARP (``tarp_bilinear`` by default: the
  dynamic kind costs more per step on CPU for no measured gain at these budgets) and, for ``mltd``,
  TAMS. Every method except ``finetune`` is meta-trained in-process by
  :func:`metaprep.train.local.meta_train_local` on the meta-training tasks with the same number of
  meta-steps, meta-batch size and episode shape (:class:`Protocol`).
* **Same adaptation budget for all**: each held-out task gets one fixed episode per seed
  (:func:`~metaprep.tasks.base.fixed_episodes`: ``shots`` support and ``query_size`` query
  examples, identical for every method), then ``adapt_steps`` full-batch Adam-style steps on the
  support set of a fresh fast-weight set (the meta-learned init for the methods that learn one),
  via :func:`metaprep.meta.adapt.adapt`, which records the query loss after every step.
* **Learning rates tuned on meta-val only**: the adaptation learning rate of each method is picked
  from ``lr_grid`` by the mean query loss after adaptation on meta-validation tasks (never the
  test tasks), with the model meta-trained for the first seed; later seeds reuse the choice. The
  meta-training inner learning rate (``inner_lr``) and the outer learning rate (``outer_lr``) are
  fixed a priori per model size (no test-time information), the paper's first-order setting.
* **Metrics**: ``perplexity`` = exp(mean query NLL of the target tokens) per task after adaptation;
  ``steps_to_match`` = the first adaptation step at which a method's query loss on a task is at or
  below ``finetune``'s final query loss on the same task and seed (0 = already before adapting;
  ``adapt_steps + 1`` = not reached within the budget, a censored value); summarization adds
  ROUGE-1/2/L of greedy generations (:mod:`metaprep.bench.generate`) for the query sources.
  Every row is the mean and 95 % t-interval over test tasks x seeds (:func:`~metaprep.bench.report.result`).
* **Suites**: ``persona`` — ConvAI2 persona tasks split by task (meta-train / meta-val /
  meta-test, fixed split seed), or with ``--persona-test-csv`` the Synthetic-Persona-Chat personas as
  the test tasks (ConvAI2 meta-test personas then join meta-val). ``multidomain`` — a folder of
  ``<domain>.jsonl``; ``--test-domains`` are excluded from meta-training (default: a seeded draw of
  6, :func:`default_test_domains`); the remaining domains split into meta-train and meta-val.
  ``summarization`` — the AdaptSum set-up with domains as tasks, leave-one-domain-out: for each
  domain the other domains are meta-trained on (their examples cut into shards of ``shard_size``,
  each shard a task, held-out shards as meta-val) and the held-out domain's shards are the test tasks.

``--quick`` runs 2 methods (``finetune``, ``mltd``), 1 seed and tiny budgets (tests). For models
other than stories260K (SmolLM2-135M) a smaller protocol applies (:func:`protocol_for`; fp32: bf16
autocast pays only on CPUs with native bf16 GEMMs, and then far less than the GEMM speed-up); its
default methods are ``finetune, multitask, mltd`` and
``$METAPREP_BENCH_METHODS`` (comma-separated) overrides the method list of any run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from metaprep.bench.report import mean_ci95, result
from metaprep.config import MetaTrainConfig
from metaprep.errors import ConfigError, DataError
from metaprep.meta.adapt import adapt
from metaprep.meta.build import build_meta_model
from metaprep.meta.mc_scorer import ENCODER_TARGETS, MC_ALGORITHMS
from metaprep.models.base import detect_kind, resolve_path
from metaprep.tasks.base import Episode, Task, TaskBatch, TaskSplit, fixed_episodes, make_batch
from metaprep.tasks.families import resolve_data_dir
from metaprep.tasks.multidomain import domain_files, load_domain_folder
from metaprep.tasks.persona import load_synthetic_persona_csv
from metaprep.tasks.summarization import load_summarization_folder, rouge_scores
from metaprep.train.local import meta_train_local
from metaprep.train.loop import load_split

METHODS = ("finetune", "multitask", "fomaml", "maml", "reptile", "meta_lora", "mltd_tarp", "mltd")
QUICK_METHODS = ("finetune", "mltd")
LARGE_MODEL_METHODS = ("finetune", "multitask", "mltd")
TARP_METHODS = ("mltd_tarp", "mltd")
METHODS_ENV = "METAPREP_BENCH_METHODS"
NUM_TEST_DOMAINS = 6

# Targets of issue 8 (paper anchors in DESIGN.md §1.1): mltd perplexity <= ratio x finetune's and below
# multitask's; mltd needs <= 1/3 of finetune's adaptation steps to reach finetune's final query loss.
PPL_RATIO_TARGET = {"persona": 0.85, "multidomain": 0.75}
STEPS_RATIO_TARGET = 1 / 3
MC_GAP_TARGET = 0.04  # convai2_mc: meta_lora accuracy >= multitask + 0.04 (paper: 0.458 vs 0.415)


@dataclass(frozen=True)
class Protocol:
    """The budget every method of one suite run shares; fixed before any test task is seen."""

    shots: int = 8  # support examples per task (k)
    query_size: int = 8  # query examples per task
    seq_len: int = 48  # tokens per example (prompts keep their end, targets their start)
    adapt_steps: int = 10  # adaptation steps at meta-val and meta-test (same for all methods)
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # adaptation lr candidates (Adam-style inner update)
    inner_lr: float = 1e-2  # meta-training inner lr, fixed a priori
    inner_steps: int = 1  # meta-training inner steps (T_in)
    meta_steps: int = 40
    meta_batch_size: int = 4
    outer_lr: float = 1e-3  # AdamW on the slow weights
    rank: int = 4  # r of LoRA/TARP (MLtD uses 4 for dialogue)
    alpha: float = 4.0
    tarp_kind: str = "tarp_bilinear"
    targets: tuple[str, ...] = ()  # wrapped layers; () = the config default (all attention + FFN)
    val_tasks: int = 4  # meta-val tasks used for lr tuning
    test_tasks: int = 0  # cap on test tasks (0 = all)
    eval_chunk: int = 16  # test tasks adapted together in one batched inner loop
    seeds: int = 3
    methods: tuple[str, ...] = METHODS
    precision: str = "fp32"  # bf16 = autocast; pays only on CPUs with native bf16 GEMMs (see the throughput suite)
    threads: int = 1  # torch threads: 1 is the fastest on a shared 2-core machine
    max_new_tokens: int = 0  # > 0: greedy generation (summarization)
    shard_size: int = 24  # examples per summarization task shard
    max_shards: int = 40  # shards per meta-training summarization domain
    test_shards: int = 4  # test tasks (shards) per held-out summarization domain


def protocol_for(suite: str, model_path: str, quick: bool, seeds: int | None, methods: str | None = None,
                 meta_steps: int | None = None, encoder: bool = False) -> Protocol:
    """The suite's protocol for this model; ``quick`` = tiny budgets for tests.

    ``methods`` (comma-separated; else ``$METAPREP_BENCH_METHODS``) and ``meta_steps`` override the
    suite's method list and meta-training budget (e.g. longer runs of a few methods). ``encoder``: the
    convai2_mc sentence-encoder scorer (MiniLM, 21 sequences per example: shorter episodes, bf16).
    """
    small = _is_llama2c(model_path)
    if encoder:
        # LoRA r=8 on attention q/v as in the paper's RoBERTa run; BERT-style small outer lr for the full encoder
        proto = Protocol(shots=4, query_size=4, seq_len=48, lr_grid=(3e-4, 1e-3, 3e-3), inner_lr=1e-3,
                         meta_batch_size=2, outer_lr=2e-5, rank=8, alpha=8.0, targets=ENCODER_TARGETS,
                         val_tasks=3, test_tasks=12, eval_chunk=12, precision="bf16", threads=2,
                         methods=MC_ALGORITHMS)
    elif suite == "summarization":
        proto = Protocol(shots=4, query_size=4, seq_len=128, meta_steps=30, meta_batch_size=2, rank=16, alpha=16.0,
                         val_tasks=4, max_new_tokens=32)
    elif suite == "multidomain":
        proto = Protocol(seq_len=64, rank=8, alpha=8.0)
    else:  # persona, convai2_mc
        proto = Protocol()
    if not small and not encoder:  # the encoder protocol above is already sized for this machine
        # SmolLM2-135M on 2 shared CPU cores (~20 ms CPU per token for forward + backward in fp32):
        # 3 methods, short episodes, few meta-steps, fast weights on attention q/v only.
        proto = replace(proto, shots=4, query_size=4, seq_len=40, adapt_steps=5, meta_steps=12, meta_batch_size=2,
                        outer_lr=1e-4, lr_grid=(1e-3, 3e-3), inner_lr=3e-3, val_tasks=3, test_tasks=6,
                        eval_chunk=3, methods=LARGE_MODEL_METHODS, targets=("q_proj", "v_proj"))
    if quick:
        proto = replace(proto, shots=2, query_size=2, seq_len=32 if suite != "summarization" else 96,
                        adapt_steps=2, lr_grid=(3e-3, 1e-2), meta_steps=2, meta_batch_size=2, val_tasks=2,
                        test_tasks=3, methods=("finetune", "meta_lora") if encoder else QUICK_METHODS, seeds=1,
                        max_new_tokens=min(proto.max_new_tokens, 6), shard_size=8, max_shards=4, test_shards=2)
    if seeds is not None:
        proto = replace(proto, seeds=seeds)
    if meta_steps is not None:
        proto = replace(proto, meta_steps=meta_steps)
    source, listed = ("--methods", methods) if methods else (f"${METHODS_ENV}", os.environ.get(METHODS_ENV))
    if listed:
        proto = replace(proto, methods=parse_methods(listed, source))
    return proto


def parse_methods(listed: str, source: str = "--methods") -> tuple[str, ...]:
    """A comma-separated method list; it must include finetune (the reference of steps_to_match)."""
    chosen = tuple(m.strip() for m in listed.split(",") if m.strip())
    if any(m not in METHODS for m in chosen) or "finetune" not in chosen:
        raise ConfigError(f"{source}: {listed!r}; expected a comma-separated subset of {', '.join(METHODS)} "
                          f"that includes finetune (the reference of steps_to_match)")
    return chosen


def _is_llama2c(model_path: str) -> bool:
    try:
        return detect_kind(resolve_path(model_path)) == "llama2c"
    except Exception:  # unknown kinds get the large-model protocol; loading reports the real error
        return False


# --------------------------------------------------------------------------- paths

def data_root(args: argparse.Namespace) -> Path:
    from metaprep.config import TasksConfig

    root = Path(args.data_dir) if getattr(args, "data_dir", None) else resolve_data_dir(TasksConfig())
    if root is None or not root.is_dir():
        raise ConfigError("--data-dir: the shared data root is not found; pass --data-dir or set $METAPREP_DATA_DIR")
    return root


def default_model_path(data_dir: Path) -> str:
    """stories260K next to the data (``<data_dir>/../models``), else ``../shared/models`` of the checkout."""
    for folder in (data_dir.parent / "models" / "stories260K",
                   Path(__file__).resolve().parents[3].parent / "shared" / "models" / "stories260K"):
        if folder.is_dir():
            return str(folder)
    raise ConfigError("--model-path: no stories260K folder found next to the data; pass --model-path")


def model_label(model_path: str) -> str:
    name = Path(model_path.split(":", 1)[-1]).name
    known = {"smollm2": "SmolLM2-135M", "all-minilm-l6-v2": "all-MiniLM-L6-v2"}
    return next((label for key, label in known.items() if key in model_path.lower()), name)


# --------------------------------------------------------------------------- the harness

@dataclass
class Fold:
    """One meta-train / meta-val / meta-test arrangement.

    ``tasks`` are the ``TasksConfig`` fields under which :func:`meta_train_local` loads and splits
    the meta-training pool. Test tasks are the pool's test split unless ``test`` is given; then the
    pool's test split joins meta-val (it is not used for testing). ``val`` overrides meta-val tasks.
    """

    name: str
    tasks: dict
    test: list | None = None
    val: list | None = None
    split: TaskSplit | None = field(default=None, repr=False)


Hook = Callable[..., dict[str, list[float]]]


def make_config(method: str, seed: int, proto: Protocol, fold: Fold, model_path: str) -> MetaTrainConfig:
    cfg = MetaTrainConfig(algorithm=method, seed=seed)
    cfg.model.path = model_path
    for key, value in fold.tasks.items():
        setattr(cfg.tasks, key, value)
    cfg.tasks.shots, cfg.tasks.query_size, cfg.tasks.seq_len = proto.shots, proto.query_size, proto.seq_len
    cfg.reparam.kind = proto.tarp_kind if method in TARP_METHODS else "lora"
    cfg.reparam.rank, cfg.reparam.alpha = proto.rank, proto.alpha
    if proto.targets:
        cfg.reparam.targets = list(proto.targets)
    m = cfg.meta
    m.inner_lr, m.outer_lr, m.inner_steps, m.inner_optimizer = proto.inner_lr, proto.outer_lr, proto.inner_steps, "adam"
    m.meta_batch_size, m.meta_steps = proto.meta_batch_size, proto.meta_steps
    m.eval_every, m.eval_tasks = proto.meta_steps, 2  # the harness does its own meta-val evaluation
    cfg.distributed.precision, cfg.distributed.torch_threads = proto.precision, proto.threads
    return cfg.validate()


def prepare(method: str, seed: int, proto: Protocol, fold: Fold, model_path: str):
    """The model a method adapts from: meta-trained, or the wrapped pretrained base for ``finetune``."""
    cfg = make_config(method, seed, proto, fold, model_path)
    if method == "finetune":  # no meta-training: the pretrained base with a fresh LoRA per task
        torch.manual_seed(seed)
        model, loaded = build_meta_model(cfg)
        return model, loaded.tokenizer, {}
    res = meta_train_local(cfg)
    info = {k: res.final.get(k) for k in ("meta_val_loss_start", "meta_val_loss_end", "diverged_at")}
    return res.model, res.loaded.tokenizer, info


def evaluate(model, tokenizer, episodes: list[Episode], proto: Protocol, lr: float,
             hook: Hook | None = None, batch_fn: Callable[..., TaskBatch] = make_batch,
             ) -> tuple[list[list[float]], dict[str, list[float]]]:
    """Adapt every episode's task (in chunks of ``eval_chunk`` tasks); per-step per-task query losses.

    ``batch_fn(episodes, part, tokenizer, seq_len)`` encodes a chunk (``make_batch``: causal-LM examples).
    """
    dtype = torch.bfloat16 if proto.precision == "bf16" else None
    curve: list[list[float]] = [[] for _ in range(proto.adapt_steps + 1)]
    extras: dict[str, list[float]] = {}
    for start in range(0, len(episodes), proto.eval_chunk):
        chunk = episodes[start:start + proto.eval_chunk]
        support = batch_fn(chunk, "support", tokenizer, proto.seq_len)
        query = batch_fn(chunk, "query", tokenizer, proto.seq_len)
        res = adapt(model, support, query, proto.adapt_steps, lr, "adam", autocast_dtype=dtype)
        for step, losses in enumerate(res.curve):
            curve[step].extend(losses)
        if hook is not None:
            for key, values in hook(model, tokenizer, chunk, res, proto).items():
                extras.setdefault(key, []).extend(values)
    return curve, extras


def mean_or_nan(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def run_folds(folds: list[Fold], proto: Protocol, model_path: str, hook: Hook | None = None,
              val_score: Callable[[list[list[float]], dict], float] | None = None,
              log: Callable[[str], None] = print, prepare_fn: Callable | None = None,
              batch_fn: Callable[..., TaskBatch] = make_batch) -> list[dict]:
    """Meta-train and evaluate every (fold, seed, method); one record each (curves, timings, lr choice).

    ``val_score(curve, extras)`` ranks the lr candidates on meta-val (lower is better; default: mean
    query loss after adaptation); ``hook`` runs at meta-val only when a ``val_score`` is given.
    ``prepare_fn`` (default :func:`prepare`) and ``batch_fn`` swap in another model family (the
    convai2_mc sentence encoder).
    """
    prepare_fn = prepare_fn or prepare
    torch.set_num_threads(proto.threads)  # finetune never enters the training loop, which would set it
    tune_hook = hook if val_score is not None else None
    val_score = val_score or (lambda curve, extras: mean_or_nan(curve[-1]))
    records, chosen = [], {}
    for fold in folds:
        probe = make_config("finetune", 0, proto, fold, model_path)
        split = fold.split or load_split(probe)
        fold.split = split
        val_pool = fold.val if fold.val is not None else split.val + (split.test if fold.test is not None else [])
        val_tasks = val_pool[: proto.val_tasks]
        test_tasks = fold.test if fold.test is not None else split.test
        if proto.test_tasks:
            test_tasks = test_tasks[: proto.test_tasks]
        if not val_tasks or not test_tasks:
            raise DataError(f"fold {fold.name}: needs meta-val and test tasks, got {len(val_tasks)} and "
                            f"{len(test_tasks)}")
        for seed in range(proto.seeds):
            val_eps = fixed_episodes(val_tasks, proto.shots, proto.query_size, seed)
            test_eps = fixed_episodes(test_tasks, proto.shots, proto.query_size, seed)
            for method in proto.methods:
                c0, t0 = time.process_time(), time.perf_counter()
                model, tok, info = prepare_fn(method, seed, proto, fold, model_path)
                t1 = time.perf_counter()
                key = (fold.name, method)
                if key not in chosen:  # tuned once per fold, on the first seed, on meta-val tasks only
                    scores = {}
                    for lr in proto.lr_grid:
                        curve, extras = evaluate(model, tok, val_eps, proto, lr, tune_hook, batch_fn)
                        score = val_score(curve, extras)
                        scores[lr] = score if math.isfinite(score) else float("inf")
                    chosen[key] = (min(scores, key=scores.get), scores)
                lr, scores = chosen[key]
                t2 = time.perf_counter()
                curve, extras = evaluate(model, tok, test_eps, proto, lr, hook, batch_fn)
                t3 = time.perf_counter()
                records.append({"fold": fold.name, "seed": seed, "method": method, "lr": lr,
                                "val_scores": {str(k): v for k, v in scores.items()},
                                "tasks": [ep.task for ep in test_eps], "curve": curve, "extras": extras,
                                "meta_train_s": round(t1 - t0, 2), "tune_s": round(t2 - t1, 2),
                                "eval_s": round(t3 - t2, 2), "cpu_s": round(time.process_time() - c0, 2), **info})
                log(f"[{fold.name} seed {seed}] {method:10s} lr={lr:g} query loss {mean_or_nan(curve[0]):.3f} -> "
                    f"{mean_or_nan(curve[-1]):.3f}  (train {t1 - t0:.0f}s, tune {t2 - t1:.0f}s, eval {t3 - t2:.0f}s)")
                del model
    return records


def steps_to_match(curve: list[float], target: float, rel_tol: float = 1e-6) -> int:
    """First step whose loss is <= ``target`` (0 = before adapting); ``len(curve)`` if never (censored)."""
    for step, loss in enumerate(curve):
        if loss <= target + rel_tol * abs(target):
            return step
    return len(curve)


def per_task_steps(records: list[dict]) -> dict[int, list[int]]:
    """steps_to_match of every (record index) per task, against finetune of the same fold and seed."""
    ref = {(r["fold"], r["seed"]): r for r in records if r["method"] == "finetune"}
    out = {}
    for i, r in enumerate(records):
        base = ref.get((r["fold"], r["seed"]))
        if base is None:
            continue
        targets = base["curve"][-1]
        out[i] = [steps_to_match([step[t] for step in r["curve"]], targets[t]) for t in range(len(targets))]
    return out


def aggregate(records: list[dict], proto: Protocol, extra_metrics: tuple[str, ...] = (),
              **setting) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Result rows (per method x metric over tasks x seeds) and a {method: {metric: mean}} summary."""
    steps = per_task_steps(records)
    rows, summary = [], {}
    for method in proto.methods:
        idx = [i for i, r in enumerate(records) if r["method"] == method]
        if not idx:
            continue
        values = {"perplexity": [math.exp(min(v, 50.0)) for i in idx for v in records[i]["curve"][-1]],
                  "query_loss": [v for i in idx for v in records[i]["curve"][-1]],
                  "steps_to_match": [float(s) for i in idx for s in steps.get(i, [])]}
        for metric in extra_metrics:
            values[metric] = [v for i in idx for v in records[i]["extras"].get(metric, [])]
        summary[method] = {}
        for metric in (*extra_metrics, "perplexity", "query_loss", "steps_to_match"):
            if values[metric]:
                rows.append(result(method, metric, values[metric], **setting))
                summary[method][metric] = rows[-1]["mean"]
    return rows, summary


def _paired(values: dict[tuple, float], reference: str) -> dict[str, tuple[float, float, int]]:
    """``values`` keyed by (method, fold, seed, task): per method, mean and 95 % CI of the difference
    to ``reference`` on the same (fold, seed, task), and the number of pairs (>= 2)."""
    out = {}
    for method in dict.fromkeys(k[0] for k in values):
        diffs = [values[(method, *k[1:])] - v for k, v in values.items()
                 if k[0] == reference and method != reference and (method, *k[1:]) in values]
        if len(diffs) >= 2:
            out[method] = (*mean_ci95(diffs), len(diffs))
    return out


def paired_differences(records: list[dict], reference: str = "multitask") -> dict[str, dict[str, float]]:
    """Per method: final query loss minus ``reference``'s on the same (fold, seed, task), mean and 95 % CI.

    Pairing removes the task-to-task spread that dominates the per-method intervals, so this is
    the test of "method below reference" (negative = better than the reference). Also reported
    before adaptation (step 0), which separates what meta-training put into the initialisation
    from what the adaptation steps added.
    """
    def at(step: int) -> dict[tuple, float]:
        return {(r["method"], r["fold"], r["seed"], task): r["curve"][step][i]
                for r in records for i, task in enumerate(r["tasks"])}

    after, before = _paired(at(-1), reference), _paired(at(0), reference)
    return {m: {"after": a[0], "after_ci95": a[1], "before": before[m][0], "before_ci95": before[m][1], "n": a[2]}
            for m, a in after.items()}


def paired_extra_differences(records: list[dict], metric: str, reference: str = "multitask") -> dict[str, dict]:
    """Per method: a per-task extra metric (e.g. ``accuracy``) minus ``reference``'s on the same
    (fold, seed, task), mean and 95 % CI (positive = higher than the reference)."""
    values = {(r["method"], r["fold"], r["seed"], task): v
              for r in records for task, v in zip(r["tasks"], r["extras"].get(metric, []), strict=False)}
    return {m: {"mean": mean, "ci95": ci, "n": n} for m, (mean, ci, n) in _paired(values, reference).items()}


def mean_curves(records: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Mean query loss per adaptation step, per fold and method (over tasks and seeds)."""
    out: dict[str, dict[str, list[float]]] = {}
    for fold in dict.fromkeys(r["fold"] for r in records):
        for method in dict.fromkeys(r["method"] for r in records):
            rs = [r for r in records if r["fold"] == fold and r["method"] == method]
            if rs:
                steps = len(rs[0]["curve"])
                out.setdefault(fold, {})[method] = [mean_or_nan([v for r in rs for v in r["curve"][s]])
                                                    for s in range(steps)]
    return out


def check_targets(suite: str, summary: dict[str, dict[str, float]]) -> dict:
    """Issue 8's targets against the measured means (missing methods are reported as not evaluated)."""
    out: dict = {}

    def get(method: str, metric: str) -> float | None:
        return summary.get(method, {}).get(metric)

    ft_ppl, mltd_ppl, mt_ppl = get("finetune", "perplexity"), get("mltd", "perplexity"), get("multitask", "perplexity")
    if suite in PPL_RATIO_TARGET and ft_ppl and mltd_ppl:
        ratio = mltd_ppl / ft_ppl
        out["mltd_vs_finetune_ppl"] = {"ratio": ratio, "target": PPL_RATIO_TARGET[suite],
                                       "met": ratio <= PPL_RATIO_TARGET[suite]}
        if mt_ppl:
            out["mltd_below_multitask_ppl"] = {"mltd": mltd_ppl, "multitask": mt_ppl, "met": mltd_ppl < mt_ppl}
    if suite == "summarization" and get("mltd", "rougeL") is not None and get("finetune", "rougeL") is not None:
        out["mltd_above_finetune_rouge"] = {
            m: {"mltd": get("mltd", m), "finetune": get("finetune", m), "met": get("mltd", m) > get("finetune", m)}
            for m in ("rouge1", "rouge2", "rougeL")}
    if suite == "convai2_mc" and get("meta_lora", "accuracy") is not None and get("multitask", "accuracy") is not None:
        gap = get("meta_lora", "accuracy") - get("multitask", "accuracy")
        out["meta_lora_vs_multitask_accuracy"] = {"meta_lora": get("meta_lora", "accuracy"),
                                                  "multitask": get("multitask", "accuracy"), "gap": gap,
                                                  "target": MC_GAP_TARGET, "met": gap >= MC_GAP_TARGET}
    ft_steps, mltd_steps = get("finetune", "steps_to_match"), get("mltd", "steps_to_match")
    if ft_steps is not None and mltd_steps is not None:
        out["mltd_steps_to_match"] = {"mltd": mltd_steps, "finetune": ft_steps,
                                      "ratio": mltd_steps / ft_steps if ft_steps else float("nan"),
                                      "target": STEPS_RATIO_TARGET,
                                      "met": mltd_steps <= STEPS_RATIO_TARGET * ft_steps}
    return out


def plot_curves(curves: dict[str, dict[str, list[float]]], path: Path, title: str) -> Path:
    """Adaptation curves: mean query loss vs adaptation step, one line per method, one panel per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folds = list(curves)
    fig, axes = plt.subplots(1, len(folds), figsize=(5.2 * len(folds), 3.8), squeeze=False)
    for ax, fold in zip(axes[0], folds, strict=True):
        for method, values in curves[fold].items():
            ax.plot(range(len(values)), values, marker="o", markersize=3, label=method,
                    linestyle="--" if method == "finetune" else "-")
        ax.set_xlabel("adaptation step")
        ax.set_ylabel("query loss (nats/token)")
        ax.set_title(fold if len(folds) > 1 else title, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    if len(folds) > 1:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(suite: str, records: list[dict], proto: Protocol, model_path: str, args: argparse.Namespace,
                 extra_metrics: tuple[str, ...] = (), **extra) -> dict:
    label = model_label(model_path)
    rows, summary = aggregate(records, proto, extra_metrics, model=label, shots=proto.shots,
                              steps=proto.adapt_steps)
    curves = mean_curves(records)
    timing: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for r in records:
        timing[r["method"]] = timing.get(r["method"], 0.0) + r["meta_train_s"] + r["tune_s"] + r["eval_s"]
        cpu[r["method"]] = cpu.get(r["method"], 0.0) + r["cpu_s"]
    report = {"results": rows, "summary": summary, "targets": check_targets(suite, summary),
              "paired_vs_multitask": paired_differences(records),
              "paired_extras_vs_multitask": {m: paired_extra_differences(records, m) for m in extra_metrics},
              "curves": curves,
              "lr_choice": {f"{r['fold']}/{r['method']}": {"lr": r["lr"], "val": r["val_scores"]}
                            for r in records if r["seed"] == 0},
              "timing_s": {k: round(v, 1) for k, v in timing.items()},
              "cpu_s": {k: round(v, 1) for k, v in cpu.items()},
              "protocol": {**asdict(proto), "model": label, "model_path": model_path,
                           "quick": bool(getattr(args, "quick", False))},
              "runs": records, **extra}
    out = getattr(args, "out", None)
    if out:
        path = Path(out).with_name(Path(out).stem + "_curves.png")
        report["plots"] = [str(plot_curves(curves, path, f"{suite} ({label}): query loss during adaptation"))]
    return report


# --------------------------------------------------------------------------- suites

def setup_suite(args: argparse.Namespace, suite: str, default_model: str | None = None,
                encoder: bool = False) -> tuple[Path, str, Protocol]:
    root = data_root(args)
    model_path = getattr(args, "model_path", None) or default_model or default_model_path(root)
    return root, model_path, protocol_for(suite, model_path, bool(getattr(args, "quick", False)),
                                          getattr(args, "seeds", None), getattr(args, "methods", None),
                                          getattr(args, "meta_steps", None), encoder=encoder)


def run_persona(args: argparse.Namespace) -> dict:
    """ConvAI2 persona tasks (or Synthetic-Persona-Chat test personas); metric: reply perplexity."""
    root, model_path, proto = setup_suite(args, "persona")
    fold = Fold("convai2", {"family": "persona", "data_dir": str(root)})
    test_source = "convai2 meta-test personas"
    if getattr(args, "persona_test_csv", None):
        tasks = load_synthetic_persona_csv(args.persona_test_csv)
        fold.test = [t for t in tasks if len(t.examples) >= proto.shots + proto.query_size]
        if not fold.test:
            raise DataError(f"{args.persona_test_csv}: no persona with at least {proto.shots + proto.query_size} "
                            f"replies (shots + query)")
        fold.name, test_source = "synthetic_persona_chat", f"{args.persona_test_csv} personas"
        if not proto.test_tasks:
            proto = replace(proto, test_tasks=16)
    records = run_folds([fold], proto, model_path)
    return build_report("persona", records, proto, model_path, args, test_source=test_source,
                        split_sizes=_sizes(fold))


def default_test_domains(files: dict[str, Path], k: int = NUM_TEST_DOMAINS, min_examples: int = 50) -> list[str]:
    """The fixed rule for held-out domains: ``random.Random(0).sample`` of the domains with >= 50 passages."""
    eligible = sorted(d for d, f in files.items() if sum(1 for line in f.open() if line.strip()) >= min_examples)
    return sorted(random.Random(0).sample(eligible, min(k, len(eligible) - 3)))


def run_multidomain(args: argparse.Namespace) -> dict:
    """Held-out ``--test-domains`` of a ``<domain>.jsonl`` folder; metric: perplexity."""
    root, model_path, proto = setup_suite(args, "multidomain")
    folder = Path(getattr(args, "domains_dir", None) or root / "multidomain")
    files = domain_files(folder)
    test = ([d.strip() for d in args.test_domains.split(",") if d.strip()] if getattr(args, "test_domains", None)
            else default_test_domains(files))
    test_tasks = load_domain_folder(folder, domains=test)
    if len(files) - len(test) < 3:
        raise DataError(f"{folder}: needs at least 3 meta-training domains besides the {len(test)} test domains")
    with tempfile.TemporaryDirectory(prefix="metaprep-md-") as tmp:
        for name, file in files.items():  # the meta-training pool: every domain except the test domains
            if name not in test:
                (Path(tmp) / f"{name}.jsonl").symlink_to(file.resolve())
        fold = Fold("multidomain", {"family": "multidomain", "path": tmp, "val_fraction": 0.15,
                                    "test_fraction": 0.05}, test=test_tasks)
        records = run_folds([fold], proto, model_path)
    return build_report("multidomain", records, proto, model_path, args, test_domains=test,
                        split_sizes=_sizes(fold))


def shard(task: Task, size: int, limit: int) -> list[Task]:
    """Cut a domain into disjoint tasks of ``size`` examples (fixed shuffle by domain name)."""
    examples = list(task.examples)
    random.Random(f"shard:{task.name}").shuffle(examples)
    n = min(len(examples) // size, limit)
    return [Task(f"{task.name}-{i:03d}", examples[i * size:(i + 1) * size], meta={"domain": task.name})
            for i in range(n)]


def _rouge_hook(model, tokenizer, episodes: list[Episode], res, proto: Protocol) -> dict[str, list[float]]:
    from metaprep.bench.generate import greedy_generate

    prompts = [[e.prompt for e in ep.query] for ep in episodes]
    preds = greedy_generate(model, tokenizer, prompts, res.fast, res.arch, proto.max_new_tokens, proto.seq_len)
    out: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for ep, pred in zip(episodes, preds, strict=True):
        scores = rouge_scores(pred, [e.target.strip() for e in ep.query])
        for key in out:
            out[key].append(scores[key])
    return out


def run_summarization(args: argparse.Namespace) -> dict:
    """Leave-one-domain-out over the summarization domains; ROUGE-1/2/L of greedy summaries."""
    root, model_path, proto = setup_suite(args, "summarization")
    domains = load_summarization_folder(root / "summarization")
    if len(domains) < 2:
        raise DataError(f"{root / 'summarization'}: leave-one-domain-out needs at least 2 domains")
    folds = []
    quick = bool(getattr(args, "quick", False))
    with tempfile.TemporaryDirectory(prefix="metaprep-sum-") as tmp:
        for held_out in domains[:1] if quick else domains:  # quick: one held-out domain
            folder = Path(tmp) / held_out.name
            folder.mkdir()
            for other in domains:
                if other.name == held_out.name:
                    continue
                for task in shard(other, proto.shard_size, proto.max_shards):
                    lines = [json.dumps({"prompt": e.prompt, "target": e.target}) for e in task.examples]
                    (folder / f"{task.name}.jsonl").write_text("\n".join(lines) + "\n")
            folds.append(Fold(held_out.name, {"family": "jsonl", "path": str(folder), "val_fraction": 0.15,
                                              "test_fraction": 0.05},
                              test=shard(held_out, proto.shard_size, proto.test_shards)))
        records = run_folds(folds, proto, model_path, hook=_rouge_hook)
    per_domain = {}
    for fold in folds:
        _, summary = aggregate([r for r in records if r["fold"] == fold.name], proto, ("rouge1", "rouge2", "rougeL"))
        per_domain[fold.name] = summary
    return build_report("summarization", records, proto, model_path, args, ("rouge1", "rouge2", "rougeL"),
                        per_domain=per_domain, split_sizes={f.name: _sizes(f) for f in folds})


def _sizes(fold: Fold) -> dict[str, int]:
    split = fold.split
    if split is None:
        return {}
    return {"meta_train": len(split.train), "meta_val_pool": len(split.val) + (len(split.test) if fold.test else 0),
            "test": len(fold.test) if fold.test is not None else len(split.test)}
