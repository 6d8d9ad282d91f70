"""LM benchmark suites (issue 8): steps_to_match math, target checks, and quick runs of every suite.

The quick runs call ``python -m jobs.benchmark --suite S --quick`` in a subprocess (the real CLI, real
stories260K weights, real meta-training) and check the JSON schema and that every row is finite.
They are skipped when ``../shared`` (data and stories260K) is absent.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from metaprep.bench.journal import journal_path
from metaprep.bench.lm_report import (
    aggregate,
    check_targets,
    paired_differences,
    paired_extra_differences,
    per_task_steps,
    steps_to_match,
)
from metaprep.bench.lm_suites import shard
from metaprep.bench.protocol import RECIPES, Protocol, load_protocol, protocol_for
from metaprep.errors import ConfigError
from metaprep.tasks.base import Example, Task

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HAVE_SHARED = (SHARED / "data" / "convai2").is_dir() and (SHARED / "models" / "stories260K").is_dir()


def test_steps_to_match_first_step_at_or_below_target():
    curve = [3.0, 2.0, 1.5, 1.2]
    assert steps_to_match(curve, 1.5) == 2
    assert steps_to_match(curve, 1.6) == 2
    assert steps_to_match(curve, 3.5) == 0  # already there before adapting
    assert steps_to_match(curve, 0.5) == len(curve)  # never reached: censored at steps + 1
    assert steps_to_match([2.0, 1.0, 1.4], 1.4) == 1  # first crossing, even if the curve goes back up


def test_paired_differences_match_by_fold_seed_and_task():
    def rec(method, seed, tasks, before, after):
        return {"fold": "f", "seed": seed, "method": method, "tasks": tasks, "curve": [before, after]}

    records = [rec("multitask", 0, ["a", "b"], [3.0, 4.0], [2.0, 3.0]),
               rec("mltd", 0, ["b", "a"], [4.5, 3.5], [2.9, 1.9]),  # other task order: pairing is by name
               rec("multitask", 1, ["a", "b"], [3.0, 4.0], [2.2, 3.2]),
               rec("mltd", 1, ["a", "b"], [3.5, 4.5], [2.1, 3.1])]
    d = paired_differences(records)["mltd"]
    assert d["n"] == 4
    assert math.isclose(d["after"], -0.1) and math.isclose(d["before"], 0.5)
    assert math.isclose(d["after_ci95"], 0.0, abs_tol=1e-9)  # every pair differs by exactly -0.1


def test_per_task_steps_against_finetune_of_same_seed_and_task():
    def rec(method, seed, curves):  # curves per task -> the harness layout curve[step][task]
        return {"fold": "f", "seed": seed, "method": method, "curve": [list(s) for s in zip(*curves, strict=True)],
                "extras": {}}

    records = [rec("finetune", 0, [[4.0, 3.0, 2.0], [5.0, 4.5, 4.0]]),
               rec("mltd", 0, [[2.5, 1.9, 1.8], [4.6, 4.2, 4.1]]),
               rec("finetune", 1, [[4.0, 3.0, 1.0], [5.0, 4.5, 4.4]]),
               rec("mltd", 1, [[0.9, 0.8, 0.7], [4.0, 3.9, 3.8]])]
    steps = per_task_steps(records)
    assert steps[0] == [2, 2]  # finetune reaches its own final loss at the last step
    assert steps[1] == [1, 3]  # task 2 never reaches 4.0 within 2 steps: censored at 3
    assert steps[3] == [0, 0]
    proto = replace(load_protocol(RECIPES / "persona.yaml"), methods=("finetune", "mltd"), adapt_steps=2)
    rows, summary = aggregate(records, proto)
    assert summary["mltd"]["steps_to_match"] == pytest.approx((1 + 3 + 0 + 0) / 4)
    assert summary["finetune"]["perplexity"] == pytest.approx(
        sum(math.exp(v) for v in (2.0, 4.0, 1.0, 4.4)) / 4)
    assert {r["metric"] for r in rows} == {"perplexity", "query_loss", "steps_to_match"}
    assert all(r["n"] == 4 for r in rows)


def test_check_targets():
    summary = {"finetune": {"perplexity": 40.0, "steps_to_match": 9.0},
               "multitask": {"perplexity": 30.0, "accuracy": 0.40},
               "mltd": {"perplexity": 28.0, "steps_to_match": 2.0},
               "meta_lora": {"accuracy": 0.45}}
    persona = check_targets("persona", summary)
    assert persona["mltd_vs_finetune_ppl"]["met"] and persona["mltd_vs_finetune_ppl"]["ratio"] == pytest.approx(0.7)
    assert persona["mltd_below_multitask_ppl"]["met"]
    assert persona["mltd_steps_to_match"]["met"]
    assert not check_targets("multidomain", {**summary, "mltd": {"perplexity": 31.0}})["mltd_vs_finetune_ppl"]["met"]
    mc = check_targets("convai2_mc", summary)["meta_lora_vs_multitask_accuracy"]
    assert mc["met"] and mc["gap"] == pytest.approx(0.05)


def test_shard_is_disjoint_and_deterministic():
    task = Task("dom", [Example(f"p{i}", f" t{i}") for i in range(50)])
    a, b = shard(task, 8, 10), shard(task, 8, 10)
    assert [t.examples for t in a] == [t.examples for t in b]
    assert len(a) == 6 and all(len(t.examples) == 8 for t in a)
    seen = [e for t in a for e in t.examples]
    assert len(set(seen)) == len(seen)


@pytest.mark.skipif(not HAVE_SHARED, reason="../shared data or stories260K not present")
@pytest.mark.parametrize("suite,extra", [("persona", []), ("multidomain", []), ("summarization", []),
                                         ("convai2_mc", []), ("convai2_mc", ["--mc-scorer", "lm"]),
                                         ("convai2_mc", ["--methods", "finetune,meta_lora+meta.inner_steps=2"])])
def test_quick_suite_runs_and_reports_finite_rows(suite, extra, tmp_path):
    out = tmp_path / f"{suite}.json"
    env = {k: v for k, v in os.environ.items() if k != "METAPREP_BENCH_METHODS"}
    proc = subprocess.run([sys.executable, "-m", "jobs.benchmark", "--suite", suite, "--quick", "--out", str(out),
                           "--no-mlflow", "--data-dir", str(SHARED / "data"), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["suite"] == suite and report["runtime_s"] > 0
    assert out.with_suffix(".md").exists()
    assert not journal_path(out).exists()  # the unit journal goes once the result holds every unit
    rows = report["results"]
    methods = {r["method"] for r in rows}
    assert "finetune" in methods and len(methods) >= 2
    metrics = {r["metric"] for r in rows}
    assert {"perplexity", "steps_to_match"} <= metrics
    expected = {"summarization": {"rouge1", "rouge2", "rougeL"}, "convai2_mc": {"accuracy"}}.get(suite, set())
    assert expected <= metrics
    for r in rows:
        assert set(r) >= {"method", "metric", "mean", "ci95", "n", "setting"}
        assert r["n"] >= 2
        assert math.isfinite(r["mean"]) and math.isfinite(r["ci95"]), r
    if suite == "convai2_mc":
        assert all(0.0 <= r["mean"] <= 1.0 for r in rows if r["metric"] == "accuracy")
        # no --model-path: MiniLM (DESIGN.md §4); a method variant runs on the encoder scorer too
        assert report["scorer"] == ("lm" if "--mc-scorer" in extra else "encoder")
    assert report["plots"] and all(Path(p).is_file() for p in report["plots"])
    assert set(report["curves"]) and report["protocol"]["quick"] is True


def test_paired_extra_metric_differences_pair_by_seed_and_task():
    def run(method, seed, acc):
        return {"method": method, "fold": "f", "seed": seed, "tasks": ["a", "b"], "extras": {"accuracy": acc}}

    records = [run("multitask", 0, [0.5, 0.2]), run("meta_lora", 0, [0.6, 0.3]),
               run("multitask", 1, [0.1, 0.9]), run("meta_lora", 1, [0.2, 1.0]), run("finetune", 0, [0.5, 0.2])]
    out = paired_extra_differences(records, "accuracy")
    assert out["meta_lora"]["n"] == 4 and out["meta_lora"]["mean"] == pytest.approx(0.1)
    assert out["meta_lora"]["ci95"] == pytest.approx(0.0, abs=1e-9)  # the same +0.1 on every pair
    assert out["finetune"]["n"] == 2 and out["finetune"]["mean"] == pytest.approx(0.0)  # seed 0 only
    assert "multitask" not in out


def test_methods_and_meta_steps_override_the_suite_protocol(monkeypatch):
    monkeypatch.setenv("METAPREP_BENCH_METHODS", "finetune,maml")
    default = protocol_for("persona", "any-model", quick=False, seeds=None)
    assert default.methods == ("finetune", "maml") and default.meta_steps != 160
    longer = protocol_for("persona", "any-model", quick=False, seeds=None, methods="finetune, multitask,mltd",
                          meta_steps=160)
    assert longer.methods == ("finetune", "multitask", "mltd") and longer.meta_steps == 160


def test_set_overrides_any_protocol_key_and_names_the_flag():
    proto = protocol_for("persona", "any-model", quick=False, seeds=None,
                         overrides=["precision=bf16", "threads=2", "lr_grid=[1.0e-3, 3.0e-3]"])
    assert (proto.precision, proto.threads, proto.lr_grid) == ("bf16", 2, (1e-3, 3e-3))
    for item, message in (("precision=fp8", "--set precision=fp8: precision: must be one of fp32, bf16"),
                          ("threads=abc", "--set threads=abc: threads: expected int"),
                          ("thread=2", "--set thread=2: unknown protocol key 'thread'; valid keys: shots")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            protocol_for("persona", "any-model", quick=False, seeds=None, overrides=[item])


# protocol_for of every (suite, model, quick, encoder) as computed by the Python constants the recipes
# replaced (commit 34a751d); a row lists the fields that differ from PERSONA (persona on stories260K)
PERSONA = dict(shots=8, query_size=8, seq_len=48, adapt_steps=10, lr_grid=(3e-4, 1e-3, 3e-3, 1e-2), inner_lr=1e-2,
               inner_steps=1, support_weight=1.0, meta_steps=40, meta_batch_size=4, outer_lr=1e-3, rank=4, alpha=4.0,
               tarp_kind="tarp_bilinear", targets=(), val_tasks=4, test_tasks=0, eval_chunk=16, seeds=3,
               methods=("finetune", "multitask", "fomaml", "maml", "reptile", "meta_lora", "mltd_tarp", "mltd"),
               precision="fp32", threads=1, max_new_tokens=0, shard_size=24, max_shards=40, test_shards=4,
               lr_grid_extend=2)
QUICK = dict(shots=2, query_size=2, seq_len=32, adapt_steps=2, lr_grid=(3e-3, 1e-2), meta_steps=2, meta_batch_size=2,
             val_tasks=2, test_tasks=3, seeds=1, methods=("finetune", "mltd"), shard_size=8, max_shards=4,
             test_shards=2, lr_grid_extend=0)
LARGE = dict(  # persona.yaml's large_model section (SmolLM2-135M)
    shots=4, query_size=4, seq_len=40, adapt_steps=5, lr_grid=(1e-3, 3e-3), inner_lr=3e-3, meta_steps=12,
    meta_batch_size=2, outer_lr=1e-4, targets=("q_proj", "v_proj"), val_tasks=3, test_tasks=6, eval_chunk=3,
    methods=("finetune", "multitask", "mltd"))
LARGE_QUICK = dict(QUICK, inner_lr=3e-3, outer_lr=1e-4, targets=("q_proj", "v_proj"), eval_chunk=3)
PERSONA_LARGE = dict(LARGE, lr_grid=(3e-4, 1e-3, 3e-3, 1e-2), meta_steps=100, precision="bf16", threads=2)
PROTOCOLS = [  # (suite, model, quick, encoder, fields that differ from PERSONA)
    ("persona", "llama2c", False, False, {}),
    ("persona", "llama2c", True, False, QUICK),
    ("persona", "other", False, False, PERSONA_LARGE),
    ("persona", "other", True, False, dict(LARGE_QUICK, precision="bf16", threads=2)),
    ("multidomain", "llama2c", False, False, dict(seq_len=64, rank=8, alpha=8.0, lr_grid=(1e-4, 3e-4, 1e-3, 3e-3))),
    ("multidomain", "llama2c", True, False, dict(QUICK, rank=8, alpha=8.0)),
    ("multidomain", "other", False, False, dict(LARGE, rank=8, alpha=8.0)),
    ("multidomain", "other", True, False, dict(LARGE_QUICK, rank=8, alpha=8.0)),
    ("summarization", "llama2c", False, False, dict(
        shots=4, query_size=4, seq_len=128, meta_steps=30, meta_batch_size=2, rank=16, alpha=16.0,
        max_new_tokens=32, lr_grid=(1e-3, 3e-3, 1e-2), support_weight=0.0)),
    ("summarization", "llama2c", True, False, dict(QUICK, seq_len=96, rank=16, alpha=16.0, max_new_tokens=6,
                                                   support_weight=0.0)),
    ("summarization", "other", False, False, dict(LARGE, rank=16, alpha=16.0, max_new_tokens=32,
                                                  support_weight=0.0)),
    ("summarization", "other", True, False, dict(LARGE_QUICK, seq_len=96, rank=16, alpha=16.0, max_new_tokens=6,
                                                 support_weight=0.0)),
    ("convai2_mc", "llama2c", False, False, {}),
    ("convai2_mc", "llama2c", True, False, QUICK),
    ("convai2_mc", "other", False, False, PERSONA_LARGE),  # the persona recipe
    ("convai2_mc", "other", True, False, dict(LARGE_QUICK, precision="bf16", threads=2)),
    *[("convai2_mc", model, False, True, dict(
        shots=4, query_size=4, lr_grid=(3e-4, 1e-3, 3e-3), inner_lr=1e-3, meta_batch_size=2, outer_lr=2e-5, rank=8,
        alpha=8.0, targets=("query", "value"), val_tasks=3, test_tasks=12, eval_chunk=12,
        methods=("finetune", "multitask", "meta_lora"), precision="bf16", threads=2, support_weight=0.0))
      for model in ("llama2c", "other")],
    *[("convai2_mc", model, True, True, dict(
        QUICK, inner_lr=1e-3, outer_lr=2e-5, rank=8, alpha=8.0, targets=("query", "value"), eval_chunk=12,
        methods=("finetune", "meta_lora"), precision="bf16", threads=2, support_weight=0.0))
      for model in ("llama2c", "other")],
]


@pytest.mark.parametrize("suite,model,quick,encoder,differ", PROTOCOLS,
                         ids=[f"{s}-{m}{'-quick' * q}{'-encoder' * e}" for s, m, q, e, _ in PROTOCOLS])
def test_recipes_give_the_protocols_of_the_former_constants(suite, model, quick, encoder, differ, tmp_path,
                                                            monkeypatch):
    monkeypatch.delenv("METAPREP_BENCH_METHODS", raising=False)
    path = tmp_path / "stories260K.bin"  # a llama2.c checkpoint by its suffix; "other": not a model at all
    path.touch()
    got = protocol_for(suite, str(path) if model == "llama2c" else "any-model", quick=quick, seeds=None,
                       encoder=encoder)
    assert got == Protocol(**{**PERSONA, **differ})


def _recipe(tmp_path: Path, edit) -> Path:
    text = (RECIPES / "persona.yaml").read_text()
    out = tmp_path / "r.yaml"
    out.write_text(edit(text))
    return out


@pytest.mark.parametrize("edit,quick,needle", [
    (lambda t: t.replace("  shots: 8", "  shotz: 8"), False, r"r\.yaml:\d+: unknown key 'protocol.shotz'"),
    (lambda t: t.replace("  shots: 8\n", ""), False, r"r\.yaml:\d+: protocol: missing shots"),
    (lambda t: t.replace("  seq_len: 32", "  seq_len: long"), True, r"r\.yaml:\d+: seq_len: expected int, got 'long'"),
    (lambda t: t.replace("  meta_steps: 40", "  meta_steps: 0"), False, r"r\.yaml:\d+: meta_steps: must be >= 1"),
    (lambda t: t.replace("[finetune, mltd]", "[finetune, mltdd]"), True,
     r"r\.yaml:\d+: methods: must be registered algorithms \(.*\).* including finetune"),
    (lambda t: t.replace("  methods: [finetune, multitask, mltd]", "  methods: [mltd]"), False, None),
    (lambda t: t.replace("tarp_kind: tarp_bilinear", "tarp_kind: lora"), False, r"tarp_kind: must be a TARP kind"),
    (lambda t: t.replace("quick:", "quik:"), False, r"r\.yaml:\d+: unknown section 'quik'"),
])
def test_bad_bench_recipe_is_one_line_with_file_and_line(tmp_path, edit, quick, needle):
    path = _recipe(tmp_path, edit)
    if needle is None:  # an error in large_model shows when that section applies
        load_protocol(path)
        with pytest.raises(ConfigError, match=r"r\.yaml:\d+: methods: .* including finetune"):
            load_protocol(path, large_model=True)
        return
    with pytest.raises(ConfigError, match=needle) as err:
        load_protocol(path, quick=quick)
    assert "\n" not in str(err.value)
    lineno = int(str(err.value).split(":")[1])
    assert path.read_text().splitlines()[lineno - 1].strip()  # the line named is a line of the recipe


def test_compare_pairs_two_runs_and_refuses_different_protocols(tmp_path):
    from jobs.compare import compare

    def run(path, steps, method, after, seq_len=48, precision="fp32"):
        runs = [{"fold": "f", "seed": seed, "method": method, "tasks": ["a", "b"],
                 "curve": [[3.0, 4.0], [after + seed, after + 1 + seed]]} for seed in (0, 1)]
        path.write_text(json.dumps({"suite": "persona", "runs": runs, "protocol": {
            "meta_steps": steps, "methods": [method], "seq_len": seq_len, "precision": precision}}))
        return path

    long, short = run(tmp_path / "long.json", 160, "mltd", 2.0), run(tmp_path / "short.json", 80, "multitask", 2.25)
    out = compare(f"{long}:mltd", f"{short}:multitask")
    assert out["n"] == 4 and math.isclose(out["after"], -0.25) and math.isclose(out["before"], 0.0)
    assert (out["a"]["meta_steps"], out["b"]["meta_steps"]) == (160, 80)
    bf16 = run(tmp_path / "bf16.json", 160, "mltd", 2.5, precision="bf16")  # precision may differ (issue 17)
    out = compare(f"{bf16}:mltd", f"{long}:mltd")
    assert math.isclose(out["after"], 0.5) and (out["a"]["precision"], out["b"]["precision"]) == ("bf16", "fp32")
    other = run(tmp_path / "other.json", 80, "multitask", 2.25, seq_len=64)
    with pytest.raises(ConfigError, match="protocol differs from .* in seq_len"):
        compare(f"{long}:mltd", f"{other}:multitask")
    # a compute-matched variant reports the meta-steps it ran, not the protocol's
    matched = run(tmp_path / "matched.json", 160, "multitask+meta.meta_steps=520", 2.0)
    out = compare(f"{long}:mltd", f"{matched}:multitask+meta.meta_steps=520")
    assert (out["a"]["meta_steps"], out["b"]["meta_steps"]) == (160, 520)


def test_method_override_reads_the_last_value_a_method_sets():
    from metaprep.bench.protocol import method_override

    assert method_override("multitask+meta.meta_steps=130", "meta.meta_steps") == "130"
    assert method_override("mltd+meta.meta_steps=5+meta.inner_steps=2+meta.meta_steps=9", "meta.meta_steps") == "9"
    assert method_override("mltd+meta.inner_steps=2", "meta.meta_steps") is None
    assert method_override("mltd+meta.meta_steps_x=2", "meta.meta_steps") is None


def test_readme_results_section_is_what_the_result_files_render():
    """README's results summary and RESULTS.md are regenerated from results/*.json, never edited by hand:
    they must agree with what the result files render."""
    from jobs.readme_results import BEGIN, END, RESULTS, results_md, summary

    readme = (ROOT / "README.md").read_text()
    stale = "results are stale: run PYTHONPATH=service python -m jobs.readme_results"
    assert readme.split(BEGIN, 1)[1].split(END, 1)[0] == f"\n{summary()}", f"README {stale}"
    assert RESULTS.read_text() == results_md(), f"RESULTS.md {stale}"
    for stem in (p.stem for p in (ROOT / "results").glob("*.json")):
        assert f"[{stem}](RESULTS.md#{stem})" in readme and f"\n### {stem}\n" in RESULTS.read_text()
