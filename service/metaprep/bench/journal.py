"""Finished units of an LM suite, kept on disk so that an interrupted run resumes (``jobs.benchmark --resume``).

A suite of hours (SmolLM2-135M at hundreds of meta-steps, convai2_mc at 5 seeds) runs as units, one per
(fold, seed, method) (:func:`metaprep.bench.harness.run_folds`). Each finished unit's record is appended
to ``<out>.units.jsonl`` as one JSON line, after a first line that names what the records belong to: the
suite, the base model, the protocol (without ``seeds`` and ``methods``) and the folds' tasks. With
``--resume`` a run with the same identity skips the units the journal holds (and the meta-val lr choice
made on their first seed), so it may add seeds or methods; a journal of another run is refused in one
line. Without ``--resume`` the journal starts over. ``jobs.benchmark`` deletes it once the result file
is written. A line cut short by a kill is ignored.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from metaprep.errors import ConfigError

Key = tuple[str, int, str]  # (fold, seed, method)


def journal_path(out: str | Path) -> Path:
    return Path(f"{out}.units.jsonl")


class UnitJournal:
    """Append-only record of finished units; ``open(identity)`` returns the records it can reuse."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path, self.resume = path, resume

    def open(self, identity: dict) -> dict[Key, dict]:
        identity = json.loads(json.dumps(identity))  # tuples as lists, as they read back
        done: dict[Key, dict] = {}
        if self.resume and self.path.exists():
            lines = self.path.read_text().splitlines()
            head = _parse(lines[0]) if lines else None
            if head is None or head.get("identity") != identity:
                differ = sorted(k for k in identity if (head or {}).get("identity", {}).get(k) != identity[k])
                raise ConfigError(f"--resume: {self.path} holds the units of another run (differs in: "
                                  f"{', '.join(differ) or 'its header'}); run without --resume to start over")
            for line in lines[1:]:
                rec = _parse(line)
                if rec is not None:
                    done[(rec["fold"], rec["seed"], rec["method"])] = rec
        if not done:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"identity": identity}) + "\n")
        return done

    def add(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def unit_journal(args: argparse.Namespace) -> UnitJournal | None:
    """The journal of ``jobs.benchmark --out OUT [--resume]`` (None where a suite runs without ``--out``)."""
    out = getattr(args, "out", None)
    return UnitJournal(journal_path(out), bool(getattr(args, "resume", False))) if out else None


def _parse(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
