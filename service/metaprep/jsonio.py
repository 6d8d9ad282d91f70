"""Reading users' JSON/JSONL files with one-line ``file:line`` errors (task families, meta-datasets)."""

from __future__ import annotations

import json
from pathlib import Path

from metaprep.errors import DataError


def read_bytes(path: Path, what: str) -> bytes:
    """The file's bytes, or ``path: WHAT not found`` / ``cannot read``."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None


def read_jsonl(path: Path, what: str, expected: str = "") -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; ``expected`` describes the valid line shape."""
    hint = f"; {expected}" if expected else ""
    records = []
    for lineno, line in enumerate(read_bytes(path, what).split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{lineno}: undecodable bytes at column {exc.start + 1} (UTF-8 expected)") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: each line must be a JSON object{hint}")
        records.append((lineno, obj))
    if not records:
        raise DataError(f"{path}: empty {what}{hint}")
    return records
