"""The harness every LM suite shares (and :mod:`metaprep.bench.convai2_mc`): prepare, tune, adapt, record.

* **Methods** (names of the algorithm registry, :data:`metaprep.meta.algorithm.ALGORITHMS`):
  ``finetune`` (the pretrained base, no meta-training), ``multitask`` (standard retraining),
  ``fomaml``, ``maml``, ``reptile``, ``meta_lora`` — all with LoRA fast weights — and ``mltd_tarp`` /
  ``mltd`` with TARP (the algorithms that need a TARP kind get the protocol's ``tarp_kind``) and,
  for ``mltd``, TAMS. Every method that meta-trains is meta-trained in-process by
  :func:`metaprep.train.local.meta_train_local` on the meta-training tasks with the same number of
  meta-steps, meta-batch size and episode shape (:class:`~metaprep.bench.protocol.Protocol`).
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

:func:`run_folds` returns one record per (fold, seed, method): per-step per-task query losses,
extras of a hook, the lr choice and timings; :mod:`metaprep.bench.lm_report` turns them into rows.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from metaprep.bench.journal import UnitJournal
from metaprep.bench.protocol import Protocol, protocol_for, split_method
from metaprep.bench.report import mean_or_nan
from metaprep.config import MetaTrainConfig, TasksConfig, apply_overrides, from_dict, to_dict
from metaprep.errors import ConfigError, DataError
from metaprep.meta.adapt import adapt_in_chunks, support_losses_in_chunks
from metaprep.meta.algorithm import ALGORITHMS
from metaprep.meta.build import build_meta_model
from metaprep.progress import Progress
from metaprep.tasks.base import Episode, TaskBatch, TaskSplit, fixed_episodes, make_batch
from metaprep.tasks.families import batch_encoder_for, resolve_data_dir
from metaprep.train.local import meta_train_local
from metaprep.train.loop import load_split


def setup_suite(args: argparse.Namespace, suite: str, default_model: str | None = None,
                encoder: bool = False) -> tuple[Path, str, Protocol]:
    root = data_root(args)
    model_path = getattr(args, "model_path", None) or default_model or default_model_path(root)
    overrides = getattr(args, "overrides", None) or ()
    proto = protocol_for(suite, model_path, bool(getattr(args, "quick", False)), getattr(args, "seeds", None),
                         getattr(args, "methods", None), getattr(args, "meta_steps", None), encoder=encoder,
                         overrides=overrides)
    return root, model_path, precision_for_this_cpu(proto, overrides)


def precision_for_this_cpu(proto: Protocol, overrides: Sequence[str] = ()) -> Protocol:
    """A recipe's bf16 runs in fp32 on a CPU without bf16 matmul instructions (about 10x slower there, see
    :func:`metaprep.runtime.native_bf16_matmul`), with a note; ``--set precision=bf16`` keeps bf16. The
    report's protocol records the precision that ran."""
    from metaprep.runtime import BF16_GEMM_FLAGS, native_bf16_matmul

    asked = any(o.split("=", 1)[0].strip() == "precision" for o in overrides)
    if proto.precision != "bf16" or asked or native_bf16_matmul() is not False:
        return proto
    print(f"note: the protocol's bf16 runs in fp32 here: this CPU has no bf16 matmul instructions "
          f"({', '.join(BF16_GEMM_FLAGS)}); --set precision=bf16 forces it", flush=True)
    return replace(proto, precision="fp32")


def data_root(args: argparse.Namespace) -> Path:
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
    """The method's meta-training config: the protocol's budget, then the method's own ``+KEY=VALUE``
    overrides (:func:`~metaprep.bench.protocol.split_method`)."""
    method, overrides = split_method(method)
    cfg = MetaTrainConfig(algorithm=method, seed=seed)
    cfg.model.path = model_path
    for key, value in fold.tasks.items():
        setattr(cfg.tasks, key, value)
    cfg.tasks.shots, cfg.tasks.query_size, cfg.tasks.seq_len = proto.shots, proto.query_size, proto.seq_len
    cfg.reparam.kind = proto.tarp_kind if ALGORITHMS[method].needs_tarp else "lora"
    cfg.reparam.rank, cfg.reparam.alpha = proto.rank, proto.alpha
    if proto.targets:
        cfg.reparam.targets = list(proto.targets)
    m = cfg.meta
    m.inner_lr, m.outer_lr, m.inner_steps, m.inner_optimizer = proto.inner_lr, proto.outer_lr, proto.inner_steps, "adam"
    m.meta_batch_size, m.meta_steps = proto.meta_batch_size, proto.meta_steps
    if ALGORITHMS[method].episodic:
        m.support_weight = proto.support_weight
    m.eval_every, m.eval_tasks = proto.meta_steps, 2  # the harness does its own meta-val evaluation
    cfg.distributed.precision, cfg.distributed.torch_threads = proto.precision, proto.threads
    cfg.checkpoint.select = "last"  # equal budgets: every method is evaluated after its last meta-step
    if overrides:
        cfg = from_dict(MetaTrainConfig, apply_overrides(to_dict(cfg), overrides), source=f"method {method}")
    return cfg.validate()


def prepare(method: str, seed: int, proto: Protocol, fold: Fold, model_path: str):
    """The model a method adapts from: meta-trained, or the wrapped pretrained base for ``finetune``."""
    cfg = make_config(method, seed, proto, fold, model_path)
    if not ALGORITHMS[cfg.algorithm].meta_trains:  # finetune: the pretrained base with a fresh LoRA per task
        torch.manual_seed(seed)
        model, loaded = build_meta_model(cfg)
        return model, loaded.tokenizer, {}
    res = meta_train_local(cfg, split=fold.split)
    info = {k: res.final.get(k) for k in ("meta_val_loss_start", "meta_val_loss_end", "diverged_at")}
    return res.model, res.loaded.tokenizer, info


def method_batches(method: str, proto: Protocol, fold: Fold, model_path: str) -> Callable[..., TaskBatch]:
    """How a method's episodes are encoded: its family's encoder, with the TAMS task encoder if configured."""
    return batch_encoder_for(make_config(method, 0, proto, fold, model_path))


def evaluate(model, tokenizer, episodes: list[Episode], proto: Protocol, lr: float,
             hook: Hook | None = None, batch_fn: Callable[..., TaskBatch] = make_batch, *,
             optimizer: str = "adam", steps: int | None = None) -> tuple[list[list[float]], dict[str, list[float]]]:
    """Adapt every episode's task (in chunks of ``eval_chunk`` tasks); per-step per-task query losses.

    ``batch_fn(episodes, part, tokenizer, seq_len)`` encodes a chunk (``make_batch``: causal-LM examples);
    ``optimizer`` and ``steps`` (default: the protocol's ``adapt_steps``) are the adaptation's.
    """
    dtype = torch.bfloat16 if proto.precision == "bf16" else None
    steps = proto.adapt_steps if steps is None else steps
    extras: dict[str, list[float]] = {}

    def collect(chunk: list[Episode], res) -> None:
        if res.arch is not None:  # TAMS: each task's chosen op per (layer, edge), for the diversity report
            extras.setdefault("architecture", []).extend(res.arch.argmax(-1).flatten(1).tolist())
        if hook is not None:
            for key, values in hook(model, tokenizer, chunk, res, proto).items():
                extras.setdefault(key, []).extend(values)

    curve = adapt_in_chunks(model, episodes, lambda chunk, part: batch_fn(chunk, part, tokenizer, proto.seq_len),
                            steps, lr, optimizer, chunk=proto.eval_chunk, autocast_dtype=dtype, on_chunk=collect)
    return curve, extras


def support_losses(model, tokenizer, episodes: list[Episode], proto: Protocol,
                   batch_fn: Callable[..., TaskBatch] = make_batch) -> list[float]:
    """Per episode, the prepared model's loss on its support examples before adapting (as :func:`evaluate`
    encodes, chunks and casts)."""
    dtype = torch.bfloat16 if proto.precision == "bf16" else None
    return support_losses_in_chunks(model, episodes, lambda chunk, part: batch_fn(chunk, part, tokenizer,
                                                                                  proto.seq_len),
                                    chunk=proto.eval_chunk, autocast_dtype=dtype)


def tune_lr(grid: Sequence[float], score_at: Callable[[float], float], extend: int,
            note: Callable[[str], None] = lambda message: None) -> tuple[float, dict[float, float]]:
    """The lr of ``grid`` with the lowest meta-val score, and every lr's score.

    While the best lr sits at an end of the grid, the grid grows past it by the ratio of its two outermost
    points on that side (``extend`` points at most): a choice at an edge says only that the optimum may lie
    beyond it. Scores are ``score_at(lr)`` (lower is better; ``inf`` for a diverged run); ``note`` hears of each
    extension."""
    scores = {lr: score_at(lr) for lr in grid}
    for _ in range(extend if len(scores) > 1 else 0):
        lrs, best = sorted(scores), min(scores, key=scores.get)
        if best == lrs[0]:
            new = lrs[0] * lrs[0] / lrs[1]
        elif best == lrs[-1] and math.isfinite(scores[best]):
            new = lrs[-1] * lrs[-1] / lrs[-2]
        else:
            break
        new = float(f"{new:.2g}")
        if new in scores or not 0 < new < math.inf:
            break
        note(f"meta-val picked lr {best:g}, an edge of the grid: trying {new:g}")
        scores[new] = score_at(new)
    return min(scores, key=scores.get), scores


def _meta_val_scorer(model, tok, episodes: list, proto: Protocol, hook: Hook | None, batch_fn: Callable[..., TaskBatch],
                     val_score: Callable[[list[list[float]], dict], float],
                     curves: dict[float, list[list[float]]]) -> Callable[[float], float]:
    """``score_at(lr)`` for :func:`tune_lr`: adapt at ``lr`` on the meta-val ``episodes``, keep the curve in
    ``curves``, return ``val_score`` (``inf`` where it is not finite)."""
    def score_at(lr: float) -> float:
        curves[lr], extras = evaluate(model, tok, episodes, proto, lr, hook, batch_fn)
        score = val_score(curves[lr], extras)
        return score if math.isfinite(score) else float("inf")

    return score_at


def _identity(suite: str, folds: list[Fold], proto: Protocol, model_path: str) -> dict:
    """What a journal's units belong to: all but the seeds and methods, which a resumed run may extend.
    A fold's ``path`` is left out: the multidomain and summarization folds are temporary folders."""
    protocol = {k: v for k, v in to_dict(proto).items() if k not in ("seeds", "methods")}
    return {"suite": suite, "model_path": model_path, "protocol": protocol,
            "folds": [{"name": f.name, "tasks": {k: v for k, v in f.tasks.items() if k != "path"},
                       "test": [t.name for t in f.test or []],
                       "val": [t.name for t in f.val or []]} for f in folds]}


def run_folds(suite: str, folds: list[Fold], proto: Protocol, model_path: str, hook: Hook | None = None,
              val_score: Callable[[list[list[float]], dict], float] | None = None,
              prepare_fn: Callable | None = None, batch_fn: Callable[..., TaskBatch] | None = None,
              journal: UnitJournal | None = None) -> list[dict]:
    """Meta-train and evaluate every (fold, seed, method); one record each (curves, timings, lr choice).

    Prints the plan (folds x seeds x methods) and a line as each unit starts and ends, with the ETA
    (:class:`metaprep.progress.Progress`, prefixed ``[suite]``).

    ``val_score(curve, extras)`` ranks the lr candidates on meta-val (lower is better; default: mean
    query loss after adaptation); ``hook`` runs at meta-val only when a ``val_score`` is given.
    ``prepare_fn`` (default :func:`prepare`) and ``batch_fn`` swap in another model family (the
    convai2_mc sentence encoder); by default each method's batches come from its config's
    :func:`~metaprep.tasks.families.batch_encoder` (with the TAMS task encoder where configured).
    ``journal`` (:mod:`metaprep.bench.journal`) keeps each finished unit on disk and hands back those of an
    interrupted run of the same suite, protocol and tasks, which are then not run again.
    """
    prepare_fn = prepare_fn or prepare
    torch.set_num_threads(proto.threads)  # finetune never enters the training loop, which would set it
    tune_hook = hook if val_score is not None else None
    val_score = val_score or (lambda curve, extras: mean_or_nan(curve[-1]))
    records, chosen = [], {}
    progress = Progress(suite, (len(folds), "fold"), (proto.seeds, "seed"), (len(proto.methods), "method"))
    resumed = journal.open(_identity(suite, folds, proto, model_path)) if journal is not None else {}
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
                unit = f"fold {fold.name} seed {seed} method {method}"
                progress.start(unit)
                if (fold.name, seed, method) in resumed:
                    rec = resumed[(fold.name, seed, method)]
                    if seed == 0:
                        chosen[(fold.name, method)] = (rec["lr"], {float(k): v for k, v in rec["val_scores"].items()})
                    records.append(rec)
                    progress.done(unit, f"lr={rec['lr']:g} query loss {mean_or_nan(rec['curve'][-1]):.3f} "
                                        f"(resumed from {journal.path})")
                    continue
                c0, t0 = time.process_time(), time.perf_counter()
                model, tok, info = prepare_fn(method, seed, proto, fold, model_path)
                method_batch_fn = batch_fn or method_batches(method, proto, fold, model_path)
                t1 = time.perf_counter()
                key = (fold.name, method)
                val_curves = {}
                if key not in chosen:  # tuned once per fold, on the first seed, on meta-val tasks only
                    score_at = _meta_val_scorer(model, tok, val_eps, proto, tune_hook, method_batch_fn, val_score,
                                                val_curves)
                    chosen[key] = tune_lr(proto.lr_grid, score_at, proto.lr_grid_extend, progress.say)
                lr, scores = chosen[key]
                if lr not in val_curves:  # later seeds: meta-val at the chosen lr (paired choices on meta-val)
                    val_curves[lr], _ = evaluate(model, tok, val_eps, proto, lr, tune_hook, method_batch_fn)
                t2 = time.perf_counter()
                curve, extras = evaluate(model, tok, test_eps, proto, lr, hook, method_batch_fn)
                t3 = time.perf_counter()
                records.append({"fold": fold.name, "seed": seed, "method": method, "lr": lr,
                                "val_scores": {str(k): v for k, v in scores.items()},
                                "val_tasks": [ep.task for ep in val_eps], "val_query_loss": val_curves[lr][-1],
                                "tasks": [ep.task for ep in test_eps], "curve": curve, "extras": extras,
                                "meta_train_s": round(t1 - t0, 2), "tune_s": round(t2 - t1, 2),
                                "eval_s": round(t3 - t2, 2), "cpu_s": round(time.process_time() - c0, 2), **info})
                if journal is not None:
                    journal.add(records[-1])
                progress.done(unit, f"lr={lr:g} query loss {mean_or_nan(curve[0]):.3f} -> {mean_or_nan(curve[-1]):.3f} "
                                    f"(train {t1 - t0:.0f}s, tune {t2 - t1:.0f}s, eval {t3 - t2:.0f}s)")
                del model
    progress.finish()
    return records
