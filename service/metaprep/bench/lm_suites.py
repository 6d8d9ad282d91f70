"""LM benchmark suites ``persona``, ``multidomain`` and ``summarization`` (DESIGN.md §4, issue 8).

Each suite builds its folds (meta-train / meta-val / meta-test arrangements) and runs them through
the shared harness (:mod:`metaprep.bench.harness`) under its protocol recipe
(``jobs/configs/bench/<suite>.yaml``, :mod:`metaprep.bench.protocol`); the report is
:func:`metaprep.bench.lm_report.build_report`.

* ``persona`` — ConvAI2 persona tasks split by task (meta-train / meta-val / meta-test, fixed split
  seed), or with ``--persona-test-csv`` the Synthetic-Persona-Chat personas as the test tasks
  (ConvAI2 meta-test personas then join meta-val). Metric: reply perplexity.
* ``multidomain`` — a folder of ``<domain>.jsonl``; ``--test-domains`` are excluded from
  meta-training (default: a seeded draw of 6, :func:`default_test_domains`); the remaining domains
  split into meta-train and meta-val.
* ``summarization`` — the AdaptSum set-up with domains as tasks, leave-one-domain-out: for each
  domain the other domains are meta-trained on (their examples cut into shards of ``shard_size``,
  each shard a task, held-out shards as meta-val) and the held-out domain's shards are the test
  tasks; adds ROUGE-1/2/L of greedy generations (:mod:`metaprep.bench.generate`) for the query sources.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from metaprep.bench.harness import Fold, make_config, run_folds, setup_suite  # noqa: F401 (make_config: convai2_mc)
from metaprep.bench.journal import unit_journal
from metaprep.bench.lm_report import aggregate, build_report
from metaprep.bench.protocol import Protocol
from metaprep.bench.report import mean_or_nan  # noqa: F401 (re-exported for bench.convai2_mc)
from metaprep.errors import DataError
from metaprep.tasks.base import Episode, Task
from metaprep.tasks.multidomain import domain_files, load_domain_folder
from metaprep.tasks.persona import load_synthetic_persona_csv
from metaprep.tasks.summarization import load_summarization_folder, rouge_scores

NUM_TEST_DOMAINS = 6


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
    records = run_folds("persona", [fold], proto, model_path, journal=unit_journal(args))
    return build_report("persona", records, proto, model_path, args, test_source=test_source,
                        split_sizes=_sizes(fold))


def default_test_domains(files: dict[str, Path], k: int = NUM_TEST_DOMAINS, min_examples: int = 50) -> list[str]:
    """The fixed rule for held-out domains: ``random.Random(0).sample`` of the domains with >= 50 passages."""
    eligible = sorted(d for d, f in files.items() if sum(1 for line in f.open() if line.strip()) >= min_examples)
    return sorted(random.Random(0).sample(eligible, min(k, len(eligible) - 3)))


@contextlib.contextmanager
def multidomain_fold(args: argparse.Namespace, root: Path) -> Iterator[tuple[Fold, list[str]]]:
    """The multidomain arrangement: ``--test-domains`` (default :func:`default_test_domains`) of the
    ``--domains-dir`` folder (default ``<data>/multidomain``) held out as test tasks, every other domain in the
    meta-training pool (split into meta-train and meta-val). Yields (fold, test domains)."""
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
        yield Fold("multidomain", {"family": "multidomain", "path": tmp, "val_fraction": 0.15,
                                   "test_fraction": 0.05}, test=test_tasks), test


def run_multidomain(args: argparse.Namespace) -> dict:
    """Held-out ``--test-domains`` of a ``<domain>.jsonl`` folder; metric: perplexity."""
    root, model_path, proto = setup_suite(args, "multidomain")
    with multidomain_fold(args, root) as (fold, test):
        records = run_folds("multidomain", [fold], proto, model_path, journal=unit_journal(args))
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
        records = run_folds("summarization", folds, proto, model_path, hook=_rouge_hook, journal=unit_journal(args))
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
