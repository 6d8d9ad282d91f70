"""Multi-domain language modelling: a folder of ``<domain>.jsonl`` files, one task per domain.

Each line is ``{"text": PASSAGE}``; an example is ``Example(prompt="", target=PASSAGE)`` (plain
LM). Any such folder works (default ``<data_dir>/multidomain``, or ``tasks.path``); a single
``.jsonl`` file is one domain. :func:`load_domain_folder` selects domains by name for benchmarks.
"""

from __future__ import annotations

from pathlib import Path

from metaprep.config import TasksConfig
from metaprep.errors import ConfigError, DataError
from metaprep.jsonio import read_jsonl
from metaprep.tasks.base import Example, Task

EXPECTED = 'expected one {"text": STR} object per line'


def read_records(path: Path, expected: str) -> list[tuple[int, dict]]:
    """A task family's JSONL file; ``expected`` names the family's line shape in errors."""
    return read_jsonl(path, "task file", expected)


def read_domain(path: Path) -> Task:
    """One domain file -> one task named after the file."""
    examples = []
    for lineno, obj in read_records(path, EXPECTED):
        text = obj.get("text")
        if text is None:
            raise DataError(f"{path}:{lineno}: missing field 'text' ({EXPECTED})")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{lineno}: field 'text' must be a non-empty string ({EXPECTED})")
        examples.append(Example("", text))
    return Task(path.stem, examples, meta={"family": "multidomain", "domain": path.stem, "source": str(path)})


def domain_files(path: str | Path) -> dict[str, Path]:
    """Domain name -> file for a folder of ``*.jsonl`` files (or one file)."""
    path = Path(path)
    if path.is_file():
        return {path.stem: path}
    if not path.is_dir():
        raise DataError(f"{path}: not found (expected a folder of <domain>.jsonl files)")
    files = {f.stem: f for f in sorted(path.glob("*.jsonl"))}
    if not files:
        raise DataError(f"{path}: folder has no <domain>.jsonl files ({EXPECTED})")
    return files


def load_domain_folder(path: str | Path, domains: list[str] | None = None,
                       exclude: list[str] | None = None) -> list[Task]:
    """Tasks of the domains in ``path`` (all, or only ``domains``), minus ``exclude``, sorted by name."""
    files = domain_files(path)
    unknown = sorted(set(domains or []) - set(files)) + sorted(set(exclude or []) - set(files))
    if unknown:
        raise DataError(f"{path}: unknown domain {', '.join(map(repr, unknown))} "
                        f"(available: {', '.join(files)})")
    chosen = [d for d in files if (domains is None or d in domains) and d not in (exclude or [])]
    return [read_domain(files[d]) for d in chosen]


def load_multidomain_tasks(cfg: TasksConfig, data_dir: Path | None) -> list[Task]:
    """``tasks.path``, else ``<data_dir>/multidomain``: every ``<domain>.jsonl`` is a task."""
    if cfg.path:
        return load_domain_folder(cfg.path)
    if data_dir is None:
        raise ConfigError("tasks.path: family 'multidomain' needs a folder of <domain>.jsonl files, "
                          "or tasks.data_dir (or $METAPREP_DATA_DIR) holding multidomain/")
    return load_domain_folder(Path(data_dir) / "multidomain")
