"""An interrupted LM suite resumes from its unit journal (``jobs.benchmark --resume``).

The harness's meta-training and adaptation are replaced here by a prepare function and an
``evaluate`` that count their calls and return losses that depend on (seed, method, lr) only, so the
records of an interrupted-then-resumed run can be compared with an uninterrupted one."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from metaprep.bench import harness
from metaprep.bench.harness import Fold, run_folds
from metaprep.bench.journal import UnitJournal, journal_identity, journal_path
from metaprep.bench.protocol import protocol_for
from metaprep.errors import ConfigError
from metaprep.tasks.base import TaskSplit
from metaprep.tasks.synthetic import make_synthetic_tasks


class Interrupted(Exception):
    pass


@pytest.fixture
def suite(monkeypatch, tmp_path):
    tasks = make_synthetic_tasks(12, examples_per_task=16)
    proto = replace(protocol_for("persona", None, quick=True, seeds=2), methods=("finetune", "multitask"),
                    lr_grid=(1e-3, 3e-3, 1e-2), lr_grid_extend=0, val_tasks=2, test_tasks=2)
    calls = {"prepare": [], "evaluate": 0}

    def evaluate(model, tok, episodes, proto, lr, hook=None, batch_fn=None, **kw):
        calls["evaluate"] += 1
        seed, method = model
        loss = 1.0 + abs(lr - 3e-3) * 100 + seed + (method == "multitask") * 0.5
        return [[loss + 1] * len(episodes), [loss] * len(episodes)], {}

    monkeypatch.setattr(harness, "evaluate", evaluate)

    def run(journal, fail_at=None, seeds=None):
        def prepare(method, seed, proto, fold, model_path):
            if (seed, method) == fail_at:
                raise Interrupted
            calls["prepare"].append((seed, method))
            return (seed, method), None, {}

        fold = Fold("synthetic", {"family": "synthetic"}, test=tasks[10:],
                    split=TaskSplit(tasks[:8], tasks[8:10], tasks[10:]))
        fold.val = tasks[8:10]
        return run_folds("persona", [fold], replace(proto, seeds=seeds or proto.seeds), "stories260K",
                         prepare_fn=prepare, batch_fn=lambda *a: None, journal=journal)

    return run, calls, proto, tmp_path


def _timeless(records):
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]


def test_a_resumed_run_skips_finished_units_and_gives_the_same_records(suite):
    run, calls, _, tmp = suite
    straight = run(None)
    path = journal_path(tmp / "out.json")
    calls["prepare"].clear()
    with pytest.raises(Interrupted):
        run(UnitJournal(path, resume=False), fail_at=(1, "multitask"))
    assert calls["prepare"] == [(0, "finetune"), (0, "multitask"), (1, "finetune")]
    assert len(path.read_text().splitlines()) == 1 + 3  # the header and the three finished units

    calls["prepare"].clear()
    calls["evaluate"] = 0
    resumed = run(UnitJournal(path, resume=True))
    assert calls["prepare"] == [(1, "multitask")]  # only the unit that had not finished
    assert calls["evaluate"] == 2  # its meta-val at the lr chosen on seed 0 (restored, not re-tuned) and its test
    assert _timeless(resumed) == _timeless(straight)


def test_without_resume_the_journal_starts_over(suite):
    run, calls, _, tmp = suite
    path = journal_path(tmp / "out.json")
    run(UnitJournal(path, resume=False))
    calls["prepare"].clear()
    run(UnitJournal(path, resume=False))
    assert len(calls["prepare"]) == 4 and len(path.read_text().splitlines()) == 1 + 4


def test_a_line_cut_short_by_a_kill_is_run_again(suite):
    run, calls, _, tmp = suite
    path = journal_path(tmp / "out.json")
    run(UnitJournal(path, resume=False))
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    calls["prepare"].clear()
    run(UnitJournal(path, resume=True))
    assert calls["prepare"] == [(1, "multitask")]


def test_resuming_the_journal_of_another_protocol_is_refused(suite, monkeypatch):
    run, _, proto, tmp = suite
    path = journal_path(tmp / "out.json")
    run(UnitJournal(path, resume=False))
    header = json.loads(path.read_text().splitlines()[0])
    header["identity"]["protocol"]["shots"] += 1
    lines = path.read_text().splitlines()
    path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(ConfigError, match=r"--resume: .*out\.json\.units\.jsonl.*another run.*protocol"):
        run(UnitJournal(path, resume=True))


def test_a_finished_result_is_extended_with_another_seed(suite):
    """jobs.benchmark stores the journal's identity in the result and deletes the journal; ``--resume``
    on that result then runs only the new seed's units, which equal those of a straight run."""
    run, calls, _, tmp = suite
    out = tmp / "out.json"
    straight = run(None)
    first = run(UnitJournal(journal_path(out), resume=False, result=out), seeds=1)
    out.write_text(json.dumps({"identity": journal_identity(out), "runs": first}))
    journal_path(out).unlink()

    calls["prepare"].clear()
    extended = run(UnitJournal(journal_path(out), resume=True, result=out))
    assert calls["prepare"] == [(1, "finetune"), (1, "multitask")]
    assert _timeless(extended) == _timeless(straight)
    assert len(journal_path(out).read_text().splitlines()) == 1 + 4  # the handed-over units are journaled too


def test_a_result_of_another_protocol_is_refused(suite):
    run, _, _, tmp = suite
    out = tmp / "out.json"
    first = run(UnitJournal(journal_path(out), resume=False, result=out))
    identity = {**journal_identity(out), "model_path": "another"}
    out.write_text(json.dumps({"identity": identity, "runs": first}))
    journal_path(out).unlink()
    with pytest.raises(ConfigError, match=r"--resume: .*out\.json holds the result of another run.*model_path"):
        run(UnitJournal(journal_path(out), resume=True, result=out))
