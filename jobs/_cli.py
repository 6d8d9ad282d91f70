"""Shared CLI plumbing: the parser every job starts from, one-line errors and non-zero exit for user mistakes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

# Jobs run with `python -m jobs.X` from the repo root (locally or via `ray job submit
# --working-dir .`), where the library lives in service/: make it importable without install.
_SERVICE = Path(__file__).resolve().parents[1] / "service"
if _SERVICE.is_dir() and str(_SERVICE) not in sys.path:
    sys.path.insert(0, str(_SERVICE))
from metaprep.runtime import quiet_third_party  # noqa: E402

# before any job imports transformers, MLflow or tqdm: the jobs print their own progress, line by line
quiet_third_party()

from metaprep.errors import MetaprepError  # noqa: E402

EXIT_USER_ERROR = 2


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of a job: ``--help`` shows every option's default."""
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run ``main``; print a :class:`MetaprepError` as one line on stderr and exit 2."""
    try:
        code = main(argv)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
    except MetaprepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `python -m jobs.X | head`: the reader left; no traceback, as a shell tool would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        sys.exit(141)
    sys.exit(code or 0)


def write_summary(path: str | None, summary: dict) -> None:
    """Write the job's summary JSON (atomically: never a half-written file)."""
    if not path:
        return
    from metaprep.jsonio import write_json

    write_json(Path(path), summary)
