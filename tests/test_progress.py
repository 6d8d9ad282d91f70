"""What a user sees while a long job runs (issue 19, items 1 and 6): progress lines, no third-party noise, one
state folder.

- :class:`metaprep.progress.Progress`: the plan, a line as each unit starts and ends, the ETA from the mean
  unit time so far;
- ``jobs.benchmark`` prints them for a suite run through the real CLI, and the LM harness for every
  (fold, seed, method);
- ``jobs.adapt`` prints the query loss of every adaptation step, and a real tiny job (meta-train, export,
  adapt: transformers saves and loads the model) prints no progress bar and no "Loading weights";
- Ray workers get the same quiet settings and the driver's state folder; every default local folder is
  :func:`metaprep.train.launch.state_dir`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from metaprep import progress as progress_module
from metaprep.progress import Progress, duration
from metaprep.runtime import QUIET_ENV
from metaprep.train import launch

ROOT = Path(__file__).resolve().parents[1]
UNIT_DONE = re.compile(r"^\[(?P<name>[\w-]+)\] (?P<label>.+) \((?P<k>\d+)/(?P<n>\d+)\) done in "
                       r"(?P<took>[\dhms.]+)(?P<note>: .*)?; ETA (?P<eta>[\dhms.]+)$")
BAR_MARKS = ("\r", "it/s]", "s/it]", "█", "Loading weights", "Writing model shards", "%|")


def _clean_env() -> dict[str, str]:
    """This environment without the quiet settings: the job must set them itself."""
    return {k: v for k, v in os.environ.items() if k not in QUIET_ENV}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plan_units_and_eta_from_the_mean_unit_time(monkeypatch, capsys) -> None:
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    p = Progress("persona", (2, "fold"), (1, "seed"), (2, "method"))
    for i, label in enumerate(("fold a seed 0 method finetune", "fold a seed 0 method mltd")):
        p.start(label)
        clock.now += 10.0 * (i + 1)  # 10 s, then 20 s: mean 15 s
        p.done(label, "lr=0.01")
    p.drop(1, "fold b has no test tasks")
    p.finish()
    assert capsys.readouterr().out.splitlines() == [
        "[persona] plan: 2 folds x 1 seed x 2 methods = 4 units",
        "[persona] fold a seed 0 method finetune (1/4) ...",
        "[persona] fold a seed 0 method finetune (1/4) done in 10.0s: lr=0.01; ETA 30.0s",
        "[persona] fold a seed 0 method mltd (2/4) ...",
        "[persona] fold a seed 0 method mltd (2/4) done in 20.0s: lr=0.01; ETA 30.0s",
        "[persona] 1 unit skipped (fold b has no test tasks); 3 planned",
        "[persona] 2/3 units done in 30.0s",
    ]
    assert p.eta() == pytest.approx(15.0)  # one unit left after the drop


def test_durations_read_at_a_glance() -> None:
    assert [duration(s) for s in (0.04, 59.94, 61, 3599, 3600, 7384)] == [
        "0.0s", "59.9s", "1m01s", "59m59s", "1h00m", "2h03m"]


def _done_lines(out: str, name: str) -> list[re.Match]:
    return [m for m in map(UNIT_DONE.match, out.splitlines()) if m and m["name"] == name]


def test_benchmark_job_prints_its_plan_and_a_line_per_unit_with_the_eta(tmp_path) -> None:
    """``jobs.benchmark --suite meta_lora_linear --quick --seeds 2`` (the cheapest suite): 2 seeds x 3 task
    counts, every unit started and done in order, its time and ETA, all before the results table."""
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "jobs.benchmark", "--suite", "meta_lora_linear", "--quick",
                           "--seeds", "2", "--out", str(out), "--no-mlflow"],
                          cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == f"[meta_lora_linear] benchmark --quick: results to {out}"
    assert lines[1] == "[meta_lora_linear] plan: 2 seeds x 3 task counts = 6 units"
    done = _done_lines(proc.stdout, "meta_lora_linear")
    assert [(int(m["k"]), int(m["n"])) for m in done] == [(k, 6) for k in range(1, 7)]
    assert [m["label"] for m in done] == [f"seed {s} T={t} methods standard_retraining+meta_lora"
                                          for s in (0, 1) for t in (2, 3, 5)]
    assert all(m["note"].startswith(": test loss standard_retraining ") for m in done)
    for m in done:  # each done line follows its own start line
        assert lines[lines.index(m.string) - 1] == f"[meta_lora_linear] {m['label']} ({m['k']}/6) ..."
    assert done[-1]["eta"] == "0.0s"
    assert lines.index("[meta_lora_linear] 6/6 units done in " + lines[lines.index(done[-1].string) + 1]
                       .rsplit(" ", 1)[-1]) < next(i for i, ln in enumerate(lines) if ln.startswith("| method"))
    assert not any(mark in proc.stdout + proc.stderr for mark in BAR_MARKS)


def test_lm_harness_prints_a_line_per_fold_seed_and_method(capsys) -> None:
    """The harness every LM suite (persona, multidomain, summarization, convai2_mc) runs through, on the tiny
    model and synthetic tasks: the plan, then each (fold, seed, method) with its lr, losses and ETA."""
    from metaprep.bench.harness import Fold, run_folds
    from metaprep.bench.protocol import protocol_for

    proto = replace(protocol_for("persona", "tiny", quick=True, seeds=1, methods="finetune,fomaml"),
                    seq_len=24, threads=1)
    records = run_folds("persona", [Fold("synthetic", {"family": "synthetic", "num_tasks": 16})], proto, "tiny")
    out = capsys.readouterr().out
    assert len(records) == 2
    assert "[persona] plan: 1 fold x 1 seed x 2 methods = 2 units" in out.splitlines()
    done = _done_lines(out, "persona")
    assert [m["label"] for m in done] == [f"fold synthetic seed 0 method {m}" for m in ("finetune", "fomaml")]
    assert all(re.match(r": lr=[\d.e-]+ query loss [\d.]+ -> [\d.]+ \(train \d+s, tune \d+s, eval \d+s\)$", m["note"])
               for m in done)
    assert "[persona] 2/2 units done in " in out


ADAPT_JOB = """
import sys
import jobs._cli  # noqa: F401 - what every job imports first
from jobs.adapt import main
from metaprep.config import MetaTrainConfig, load_config
from metaprep.train.local import meta_train_local
cfg = load_config(MetaTrainConfig, "jobs/configs/tiny.yaml", ["meta.meta_steps=2", "meta.eval_every=2"])
export = meta_train_local(cfg, export=True).export_dir  # transformers save_pretrained
main(["--base", str(export / "base"), "--tasks", sys.argv[1], "--shots", "4", "--steps", "3", "--no-mlflow"])
"""


def test_adapt_prints_the_loss_of_every_step_and_no_third_party_bar(tmp_path) -> None:
    """A real tiny job path in a fresh interpreter: meta-train and export the tiny model, then ``jobs.adapt``
    loads it with transformers and adapts it 3 steps. Its output is the jobs' own lines only."""
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps({"task": "t", "prompt": f"a b {i} =", "target": f" x{i}"}) + "\n"
                             for i in range(12)))
    proc = subprocess.run([sys.executable, "-c", ADAPT_JOB, str(tasks)], cwd=ROOT, env=_clean_env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [ln for ln in proc.stdout.splitlines() if ln.startswith("[adapt] step ")]
    assert [ln.split(" query loss ")[0] for ln in steps] == [f"[adapt] step {k}/3" for k in range(4)]
    assert steps[0].endswith("(before adapting)")
    losses = [float(ln.split(" query loss ")[1].split()[0]) for ln in steps]
    summary = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:])
    assert losses[0] == pytest.approx(summary["query_loss_before"], abs=1e-4)
    assert losses[-1] == pytest.approx(summary["query_loss_after"], abs=1e-4)
    assert f"[adapt] query loss {losses[0]:.4f} -> {losses[-1]:.4f}, perplexity " in proc.stdout
    noise = [mark for mark in BAR_MARKS if mark in proc.stdout + proc.stderr]
    assert not noise, (noise, proc.stderr[-2000:])


def test_ray_workers_get_the_quiet_settings_and_the_state_folder(monkeypatch, tmp_path) -> None:
    import ray

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("METAPREP_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # a user's own choice travels as it is
    launch.init_ray(log_to_driver=False)
    env = seen["runtime_env"]["env_vars"]
    assert env["METAPREP_STATE_DIR"] == str(tmp_path)
    assert env["TRANSFORMERS_VERBOSITY"] == "info"
    assert {k: v for k, v in env.items() if k in QUIET_ENV and k != "TRANSFORMERS_VERBOSITY"} == {
        k: v for k, v in QUIET_ENV.items() if k != "TRANSFORMERS_VERBOSITY"}
    # the package travels through Ray (any node), not as a path of this machine
    assert "PYTHONPATH" not in env and seen["runtime_env"]["py_modules"] == [str(ROOT / "service" / "metaprep")]


def test_state_dir_env_then_the_checkout_then_home(monkeypatch, tmp_path) -> None:
    from metaprep.config import MetaTrainConfig

    monkeypatch.setenv("METAPREP_STATE_DIR", str(tmp_path / "s"))
    assert launch.state_dir() == tmp_path / "s"
    assert launch.storage_root(MetaTrainConfig()).root == str((tmp_path / "s" / "ray_results").resolve())
    monkeypatch.delenv("METAPREP_STATE_DIR")
    checkout = tmp_path / "repo"
    (checkout / ".git").mkdir(parents=True)
    monkeypatch.setattr(launch, "CHECKOUT", checkout)
    assert launch.state_dir() == checkout / ".state"  # what `make up`, cluster/stack.sh and the README use
    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_x"
    (copy / ".git").mkdir(parents=True)
    monkeypatch.setattr(launch, "CHECKOUT", copy)  # Ray's per-job copy of the working dir: deleted with the job
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert launch.state_dir() == tmp_path / "home" / ".metaprep"
    monkeypatch.setattr(launch, "CHECKOUT", tmp_path / "site-packages")  # an installed package
    assert launch.state_dir() == tmp_path / "home" / ".metaprep"


def test_every_default_state_path_comes_from_state_dir() -> None:
    """Only train/launch.py picks the state folder; the sweep's Tune storage and every run's Ray storage come from
    its storage_root; the shell side (Makefile, cluster/) agrees with its checkout default."""
    owners = [path.relative_to(ROOT).as_posix()
              for path in [*(ROOT / "service").rglob("*.py"), *(ROOT / "jobs").rglob("*.py")]
              if re.search(r"METAPREP_STATE_DIR|[\"']\.metaprep[\"']|[\"']ray_results[\"']", path.read_text())]
    assert owners == ["service/metaprep/train/launch.py"], owners
    sweep = (ROOT / "service/metaprep/tune/sweep.py").read_text()
    assert "storage = storage_root(cfg)" in sweep and "storage_path=storage.ray_storage[0]" in sweep
    assert "export METAPREP_STATE_DIR ?= $(CURDIR)/.state" in (ROOT / "Makefile").read_text()
    assert 'STATE="${METAPREP_STATE_DIR:-$ROOT/.state}"' in (ROOT / "cluster/stack.sh").read_text()
