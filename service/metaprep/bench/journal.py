"""Finished units of an LM suite, kept on disk so that an interrupted run resumes (``jobs.benchmark --resume``).

A suite of hours (SmolLM2-135M at hundreds of meta-steps, convai2_mc at 5 seeds) runs as units, one per
(fold, seed, method) (:func:`metaprep.bench.harness.run_folds`). Each finished unit's record is appended
to ``<out>.units.jsonl`` as one JSON line, after a first line that names what the records belong to: the
suite, the base model, the protocol (without ``seeds`` and ``methods``) and the folds' tasks. With
``--resume`` a run with the same identity skips the units the journal holds (and the meta-val lr choice
made on their first seed), so it may add seeds or methods; a journal of another run is refused in one
line. Without ``--resume`` the journal starts over. A line cut short by a kill is ignored.

Once the result file is written, ``jobs.benchmark`` stores the journal's identity in it (``"identity"``,
beside the records under ``"runs"``) and deletes the journal: ``--resume`` on a finished result then
extends it the same way (another seed, another method), from the result file. A result written before
0.12.4 carries no identity and is run again in full.
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

    def __init__(self, path: Path, resume: bool, result: Path | None = None) -> None:
        self.path, self.resume, self.result = path, resume, result

    def open(self, identity: dict) -> dict[Key, dict]:
        identity = json.loads(json.dumps(identity))  # tuples as lists, as they read back
        done: dict[Key, dict] = {}
        if self.resume and self.path.exists():
            lines = self.path.read_text().splitlines()
            head = _parse(lines[0]) if lines else None
            _check(self.path, "the units", (head or {}).get("identity"), identity)
            done = _by_unit(_parse(line) for line in lines[1:])
            if done:
                return done
        elif self.resume and self.result is not None and self.result.exists():
            finished = _parse(self.result.read_text()) or {}
            if "identity" in finished:
                _check(self.result, "the result", finished["identity"], identity)
                done = _by_unit(finished.get("runs", []))
        # a fresh journal: its header, then the units a finished result hands over
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(x) + "\n" for x in [{"identity": identity}, *done.values()]))
        return done

    def add(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def journal_identity(out: str | Path) -> dict | None:
    """The identity in the header of ``out``'s journal (None without one), for the result file."""
    path = journal_path(out)
    if not path.exists():
        return None
    with path.open() as f:
        return (_parse(f.readline()) or {}).get("identity")


def unit_journal(args: argparse.Namespace) -> UnitJournal | None:
    """The journal of ``jobs.benchmark --out OUT [--resume]`` (None where a suite runs without ``--out``)."""
    out = getattr(args, "out", None)
    return UnitJournal(journal_path(out), bool(getattr(args, "resume", False)), Path(out)) if out else None


def _check(path: Path, what: str, found: dict | None, identity: dict) -> None:
    if found != identity:
        differ = sorted(k for k in identity if (found or {}).get(k) != identity[k])
        raise ConfigError(f"--resume: {path} holds {what} of another run (differs in: "
                          f"{', '.join(differ) or 'its header'}); run without --resume to start over")


def _by_unit(records) -> dict[Key, dict]:
    return {(r["fold"], r["seed"], r["method"]): r for r in records if isinstance(r, dict)}


def _parse(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
