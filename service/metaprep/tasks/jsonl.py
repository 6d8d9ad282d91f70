"""Users' own tasks: JSONL, one example per line with a ``task`` field naming its task.

Accepted line shapes: ``{"task": NAME, "text": ...}`` (language modelling) or
``{"task": NAME, "prompt": ..., "target": ...}`` (conditional LM), or for multiple-choice scorers
(``convai2_mc``) ``{"task": NAME, "prompt": ..., "candidates": [...], "label": INDEX}``. A folder of ``*.jsonl``
files is also accepted, one task per file (a line's ``task`` field, if present, wins).
Every problem is reported as ``file:line: what is wrong (what is expected)``.
"""

from __future__ import annotations

from pathlib import Path

from metaprep import jsonio
from metaprep.errors import DataError
from metaprep.jsonio import read_jsonl
from metaprep.tasks.base import Example, Task

EXPECTED = ('expected {"task": NAME, "text": STR}, {"task": NAME, "prompt": STR, "target": STR} or '
            '{"task": NAME, "prompt": STR, "candidates": [STR, ...], "label": INDEX}')


def read_jsonl_records(path: Path) -> list[tuple[int, dict]]:
    """Parse a users' task file into (line number, object) pairs with file:line errors."""
    return read_jsonl(path, "task file", EXPECTED)


def record_to_example(obj: dict, where: str) -> Example:
    if "candidates" in obj:
        return _choice_example(obj, where)
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise DataError(f"{where}: field 'text' must be a non-empty string")
        return Example("", obj["text"])
    if "prompt" in obj and "target" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["target"], str) or not obj["target"].strip():
            raise DataError(f"{where}: fields 'prompt' and 'target' must be strings, 'target' non-empty")
        return Example(obj["prompt"], obj["target"])
    raise DataError(f"{where}: missing field 'text' (or 'prompt' and 'target'); {EXPECTED}")


def _choice_example(obj: dict, where: str) -> Example:
    from metaprep.tasks.convai2_mc import ChoiceExample

    prompt, candidates, label = obj.get("prompt"), obj["candidates"], obj.get("label")
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' must be a string; {EXPECTED}")
    if (not isinstance(candidates, list) or len(candidates) < 2
            or not all(isinstance(c, str) and c.strip() for c in candidates)):
        raise DataError(f"{where}: field 'candidates' must be a list of at least 2 non-empty strings")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(candidates):
        raise DataError(f"{where}: field 'label' must be an integer index into 'candidates' "
                        f"(0..{len(candidates) - 1}), got {label!r}")
    return ChoiceExample(prompt, candidates[label], tuple(candidates), label)


def load_jsonl_tasks(path: str | Path) -> list[Task]:
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise DataError(f"{path}: folder has no *.jsonl task files")
    total = sum(f.stat().st_size for f in files if f.is_file()) if path.is_dir() else 0
    if total > jsonio.MAX_DATA_BYTES:  # each file is bounded when read; a folder of many is bounded here
        raise DataError(f"{path}: task files hold {total} bytes together, more than the limit of "
                        f"{jsonio.MAX_DATA_BYTES} bytes (1/16 of this machine's memory, at most 1 GiB)")
    by_task: dict[str, list[Example]] = {}
    for file in files:
        for lineno, obj in read_jsonl_records(file):
            where = f"{file}:{lineno}"
            name = obj.get("task", file.stem if path.is_dir() else None)
            if name is None:
                raise DataError(f"{where}: missing field 'task'; {EXPECTED}")
            if not isinstance(name, str) or not name.strip():
                raise DataError(f"{where}: field 'task' must be a non-empty string")
            by_task.setdefault(name, []).append(record_to_example(obj, where))
    return [Task(name, examples) for name, examples in sorted(by_task.items())]
