"""Summarization domains (the AdaptSum set-up): one task per domain.

Accepted files in a domain folder:

* ``*.json``: a JSON list of objects, e.g. SAMSum ``[{"instruction", "dialogue", "summary"}]``;
* ``*.jsonl``: one object per line, e.g. AESLC / SciTLDR ``{"document", "summary"}``.

The source text is ``document`` (or ``dialogue``); ``instruction`` is ignored. An example is
``Example(prompt=source + "\\nSummary:", target=" " + summary)``. ``tasks.path`` (default
``<data_dir>/summarization``) is a folder of domain subfolders, one domain folder, or one file;
all ``*.json``/``*.jsonl`` files of a domain are used (``validation.json`` + ``test.json`` for
SAMSum, ``dev.jsonl`` + ``test.jsonl`` for the others).
"""

from __future__ import annotations

import json
from pathlib import Path

from metaprep.config import TasksConfig
from metaprep.errors import ConfigError, DataError
from metaprep.jsonio import read_bytes
from metaprep.tasks.base import Example, Task
from metaprep.tasks.multidomain import read_records

EXPECTED = 'expected {"document": STR, "summary": STR} or {"dialogue": STR, "summary": STR}'
SUFFIXES = (".json", ".jsonl")


def record_to_example(obj: dict, where: str) -> Example:
    source = obj.get("document", obj.get("dialogue"))
    if source is None:
        raise DataError(f"{where}: missing field 'document' (or 'dialogue'); {EXPECTED}")
    if "summary" not in obj:
        raise DataError(f"{where}: missing field 'summary'; {EXPECTED}")
    summary = obj["summary"]
    if not (isinstance(source, str) and isinstance(summary, str) and source.strip() and summary.strip()):
        raise DataError(f"{where}: source text and 'summary' must be non-empty strings; {EXPECTED}")
    return Example(source.strip() + "\nSummary:", " " + summary.strip())


def read_json_list(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each element of a JSON list, so errors can name the element's line."""
    raw = read_bytes(path, "summarization file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: undecodable bytes (UTF-8 expected)") from None
    if not text.strip():
        raise DataError(f"{path}: empty task file (expected a JSON list of objects; {EXPECTED})")
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}:1: top level must be a JSON list of objects; {EXPECTED}")
    if not items:
        raise DataError(f"{path}: empty task file (expected a non-empty JSON list; {EXPECTED})")
    # json.loads keeps no positions: re-scan with raw_decode to find where each element starts
    decoder, records = json.JSONDecoder(), []
    pos, line, counted = text.index("[") + 1, 1, 0
    for obj in items:
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted, pos)
        counted = pos
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line}: list element must be a JSON object; {EXPECTED}")
        records.append((line, obj))
        _, pos = decoder.raw_decode(text, pos)
    return records


def read_summaries(path: Path) -> list[Example]:
    """Examples of one ``.json`` (list) or ``.jsonl`` file."""
    records = read_json_list(path) if path.suffix == ".json" else read_records(path, EXPECTED)
    return [record_to_example(obj, f"{path}:{lineno}") for lineno, obj in records]


def domain_folders(path: str | Path) -> dict[str, list[Path]]:
    """Domain name -> its data files, for a folder of domain folders, a domain folder, or a file."""
    path = Path(path)
    if path.is_file():
        return {path.stem: [path]}
    if not path.is_dir():
        raise DataError(f"{path}: not found (expected a folder of domain folders of *.json/*.jsonl files)")

    def files(folder: Path) -> list[Path]:
        return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in SUFFIXES)

    domains = {d.name: files(d) for d in sorted(path.iterdir()) if d.is_dir() and files(d)}
    if not domains and files(path):
        domains = {path.name: files(path)}
    if not domains:
        raise DataError(f"{path}: no domain folders with *.json or *.jsonl files ({EXPECTED})")
    return domains


def load_summarization_folder(path: str | Path, domains: list[str] | None = None) -> list[Task]:
    """One task per domain of ``path`` (all, or only ``domains``), sorted by name."""
    found = domain_folders(path)
    unknown = sorted(set(domains or []) - set(found))
    if unknown:
        raise DataError(f"{path}: unknown domain {', '.join(map(repr, unknown))} "
                        f"(available: {', '.join(found)})")
    tasks = []
    for name, files in found.items():
        if domains is not None and name not in domains:
            continue
        examples = [e for f in files for e in read_summaries(f)]
        tasks.append(Task(name, examples, meta={"family": "summarization", "domain": name,
                                                "files": [str(f) for f in files]}))
    return tasks


def load_summarization_tasks(cfg: TasksConfig, data_dir: Path | None) -> list[Task]:
    """``tasks.path``, else ``<data_dir>/summarization``: every domain folder is a task."""
    if cfg.path:
        return load_summarization_folder(cfg.path)
    if data_dir is None:
        raise ConfigError("tasks.path: family 'summarization' needs a folder of domain folders, "
                          "or tasks.data_dir (or $METAPREP_DATA_DIR) holding summarization/")
    return load_summarization_folder(Path(data_dir) / "summarization")


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (``rouge_score``, Porter stemming) over prediction/reference pairs."""
    from rouge_score import rouge_scorer  # imported here: only evaluation needs it

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references (> 0), got {len(predictions)} "
                         f"and {len(references)}")
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # score(target, prediction)
        for k in keys:
            totals[k] += scores[k].fmeasure
    return {k: v / len(predictions) for k, v in totals.items()}
