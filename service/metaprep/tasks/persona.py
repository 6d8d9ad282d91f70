"""Persona tasks: one task per persona, one example per reply (the PAML / MLtD set-up).

Two sources:

* ConvAI2 / Persona-Chat in ParlAI format (``convai2/valid_self_original_no_cands.txt``): turn
  numbers restart at 1 for each dialogue; ``N your persona: ...`` lines give the speaker's persona,
  ``N partner utterance<TAB>reply`` lines the turns (further TAB fields, e.g. candidates, are
  ignored). Dialogues are grouped by matching their persona sentences to the clusters of
  ``persona_map_{train,valid,test}.json`` (``{cluster_id: [[sentence, ...], ...]}``, each cluster
  listing revised variants of one persona); a dialogue matching no cluster is grouped with the
  dialogues that share its persona text.
* Synthetic-Persona-Chat CSV (``synthetic_persona_chat/valid.csv``): columns ``user 1 personas``,
  ``user 2 personas`` (one sentence per line) and ``Best Generated Conversation``
  (``User 1: ...`` / ``User 2: ...`` lines). One task per user-2 persona; user 2's lines are targets.

An example's prompt is the persona, the last few utterances and the partner's line, ending in
``"\\nYou:"``; its target is ``" " + reply`` so the loss counts reply tokens only. Every task's
``meta["dialogue"]`` lists the dialogue id of each example, so support and query sets can be
drawn from different dialogues of the same persona.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from metaprep.config import TasksConfig
from metaprep.errors import ConfigError, DataError
from metaprep.jsonio import read_bytes
from metaprep.tasks.base import Example, Task

PARLAI_FILE = "valid_self_original_no_cands.txt"
PARLAI_EXPECTED = "expected ParlAI lines 'N your persona: SENTENCE' and 'N partner utterance<TAB>reply'"
SPLITS = ("train", "valid", "test")
CSV_COLUMNS = ("user 1 personas", "user 2 personas", "Best Generated Conversation")

HISTORY_UTTERANCES = 5  # the partner's line plus the two exchanges before it
MAX_PROMPT_CHARS = 1000  # older history is dropped first; persona and partner line always stay
MIN_DIALOGUES = 3  # support and query should come from different dialogues of one persona

_SILENCE = "__SILENCE__"  # ParlAI's placeholder when the model speaks first
_CONTRACTIONS = ((r"\bcan't\b", "can not"), (r"\bcannot\b", "can not"), (r"\bwon't\b", "will not"),
                 (r"n't\b", " not"), (r"'m\b", " am"), (r"'ve\b", " have"), (r"'ll\b", " will"),
                 (r"'re\b", " are"), (r"'d\b", " would"))
_SPEAKER = re.compile(r"^[\s*]*user\s*([12])[\s*]*:[\s*]*(.*?)[\s*]*$", re.IGNORECASE)


@dataclass(frozen=True)
class Dialogue:
    """One dialogue: ``turns`` are (partner utterance, reply) pairs; ``line`` is where it starts."""

    id: str
    line: int
    persona: tuple[str, ...]
    turns: tuple[tuple[str, str], ...]


@dataclass
class PersonaGroup:
    """Dialogues of one persona: ``cluster`` is ``split:id`` of the matched cluster, or None."""

    name: str
    cluster: str | None
    dialogues: list[Dialogue]


def normalize_sentence(sentence: str) -> str:
    """Lower-case, expand contractions, drop punctuation: the map spells "i am", dialogues "i'm"."""
    text = sentence.lower().replace("\u2019", "'")
    if "'" in text:
        for pattern, repl in _CONTRACTIONS:
            text = re.sub(pattern, repl, text)
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text).split())


def build_prompt(persona: Sequence[str], history: Sequence[tuple[str, str]]) -> str:
    """Persona line, then ``Speaker: text`` lines (last few, bounded length), then ``You:``."""
    head = "Persona: " + " ".join(s.strip() for s in persona)
    lines = [f"{speaker}: {text}" for speaker, text in history if text and text != _SILENCE]
    lines = lines[-HISTORY_UTTERANCES:]
    while len(lines) > 1 and len(head) + sum(len(x) + 1 for x in lines) > MAX_PROMPT_CHARS:
        lines.pop(0)
    return "\n".join([head, *lines, "You:"])


def dialogue_examples(dialogue: Dialogue) -> list[Example]:
    """One example per reply: the prompt holds everything said before it."""
    history: list[tuple[str, str]] = []
    examples = []
    for partner, reply in dialogue.turns:
        history.append(("Partner", partner))
        examples.append(Example(build_prompt(dialogue.persona, history), " " + reply))
        history.append(("You", reply))
    return examples


# --------------------------------------------------------------------------- ParlAI file

def read_parlai_dialogues(path: str | Path) -> list[Dialogue]:
    """Parse a ParlAI dialogue file with ``file:line`` errors; dialogue ids are ``d0000``, ``d0001``..."""
    path = Path(path)
    raw = read_bytes(path, "dialogue file")
    dialogues: list[Dialogue] = []
    persona: list[str] = []
    turns: list[tuple[str, str]] = []
    start, prev = 0, 0

    def close() -> None:
        if not turns:
            raise DataError(f"{path}:{start}: dialogue has no 'partner utterance<TAB>reply' lines "
                            f"({PARLAI_EXPECTED})")
        if not persona:
            raise DataError(f"{path}:{start}: dialogue has no 'your persona:' lines ({PARLAI_EXPECTED})")
        dialogues.append(Dialogue(f"d{len(dialogues):04d}", start, tuple(persona), tuple(turns)))

    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{lineno}: undecodable bytes at column {exc.start + 1} "
                            f"(UTF-8 expected)") from None
        number, _, rest = text.partition(" ")
        if not number.isdigit():
            raise DataError(f"{path}:{lineno}: line does not start with its turn number ({PARLAI_EXPECTED})")
        n = int(number)
        if n == 1:
            if prev:
                close()
            persona, turns, start = [], [], lineno
        elif n != prev + 1:
            raise DataError(f"{path}:{lineno}: turn number {n} follows {prev} (expected {prev + 1}, "
                            f"or 1 to start a new dialogue)")
        prev = n
        if rest.startswith("your persona:"):
            persona.append(rest[len("your persona:"):].strip())
        elif rest.startswith("partner's persona:"):
            continue  # the other speaker's persona (``both_*`` files): not part of this task
        else:
            fields = rest.split("\t")
            if len(fields) < 2 or not fields[1].strip():
                raise DataError(f"{path}:{lineno}: missing reply after a TAB "
                                f"(expected 'N partner utterance<TAB>reply')")
            turns.append((fields[0].strip(), fields[1].strip()))
    if not prev:
        raise DataError(f"{path}: empty dialogue file ({PARLAI_EXPECTED})")
    close()
    return dialogues


def read_persona_maps(folder: str | Path) -> dict[frozenset[str], list[str]]:
    """Read ``persona_map_{train,valid,test}.json`` present in ``folder``.

    Returns normalised sentence set -> ``["split:cluster_id", ...]`` over every variant.
    """
    index: dict[frozenset[str], list[str]] = {}
    for split in SPLITS:
        file = Path(folder) / f"persona_map_{split}.json"
        if not file.exists():
            continue
        clusters = _read_json(file)
        expected = "expected {cluster_id: [[persona sentence, ...], ...]}"
        if not isinstance(clusters, dict):
            raise DataError(f"{file}:1: persona map must be a JSON object ({expected})")
        for cid, variants in clusters.items():
            if not isinstance(variants, list) or not all(
                    isinstance(v, list) and all(isinstance(s, str) for s in v) for v in variants):
                raise DataError(f"{file}: cluster {cid!r} is not a list of sentence lists ({expected})")
            for variant in variants:
                key = frozenset(normalize_sentence(s) for s in variant)
                index.setdefault(key, []).append(f"{split}:{cid}")
    return index


def group_dialogues(dialogues: list[Dialogue], clusters: dict[frozenset[str], list[str]],
                    prefer: str = "valid", min_dialogues: int = MIN_DIALOGUES) -> list[PersonaGroup]:
    """Group dialogues by persona cluster (exact variant, else a majority of sentences).

    Clusters from split ``prefer`` win ties (ids repeat across splits). A dialogue matching no
    cluster joins the group of its persona text. Groups under ``min_dialogues`` are dropped.
    """
    by_sentence: dict[str, set[str]] = {}
    for key, ids in clusters.items():
        for sentence in key:
            by_sentence.setdefault(sentence, set()).update(ids)

    def rank(cluster: str) -> tuple[bool, str, str]:
        split, cid = cluster.split(":", 1)
        return split != prefer, split, cid.rjust(20)  # right-justified: numeric ids sort as numbers

    groups: dict[str, PersonaGroup] = {}
    for dialogue in dialogues:
        sentences = [normalize_sentence(s) for s in dialogue.persona]
        cluster = None
        if frozenset(sentences) in clusters:
            cluster = min(clusters[frozenset(sentences)], key=rank)
        else:
            votes: dict[str, int] = {}
            for sentence in set(sentences):
                for cid in by_sentence.get(sentence, ()):
                    votes[cid] = votes.get(cid, 0) + 1
            best = min(votes, key=lambda c: (-votes[c], rank(c)), default=None)
            if best is not None and 2 * votes[best] >= len(set(sentences)):
                cluster = best
        if cluster is not None:
            name = "persona-" + cluster.replace(":", "-")
        else:
            name = "persona-text-" + _digest(sentences)
        groups.setdefault(name, PersonaGroup(name, cluster, [])).dialogues.append(dialogue)
    return [g for _, g in sorted(groups.items()) if len(g.dialogues) >= min_dialogues]


def resolve_parlai_path(path: str | Path) -> Path:
    """A ParlAI file, or a folder holding it directly or under ``convai2/``."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / PARLAI_FILE, path / "convai2" / PARLAI_FILE):
            if candidate.is_file():
                return candidate
        raise DataError(f"{path}: no {PARLAI_FILE} here or under convai2/ (expected a ParlAI dialogue file)")
    return path


def load_parlai_groups(path: str | Path,
                       min_dialogues: int = MIN_DIALOGUES) -> tuple[list[PersonaGroup], list[Dialogue]]:
    """Persona groups of a ParlAI file (maps read from its folder) and all of its dialogues."""
    file = resolve_parlai_path(path)
    dialogues = read_parlai_dialogues(file)
    prefer = next((s for s in SPLITS if s in file.name), "valid")
    return group_dialogues(dialogues, read_persona_maps(file.parent), prefer, min_dialogues), dialogues


def load_parlai_persona_tasks(path: str | Path, min_dialogues: int = MIN_DIALOGUES) -> list[Task]:
    """Persona tasks from a ParlAI file; see the module docstring for the grouping."""
    groups, _ = load_parlai_groups(path, min_dialogues)
    file = resolve_parlai_path(path)
    tasks = []
    for group in groups:
        examples, dialogue_of = [], []
        for dialogue in group.dialogues:
            turns = dialogue_examples(dialogue)
            examples.extend(turns)
            dialogue_of.extend([dialogue.id] * len(turns))
        tasks.append(Task(group.name, examples, meta={
            "family": "persona", "source": str(file), "cluster": group.cluster,
            "persona": list(group.dialogues[0].persona),
            "dialogue_ids": [d.id for d in group.dialogues], "dialogue": dialogue_of}))
    return tasks


# --------------------------------------------------------------------------- Synthetic-Persona-Chat

def load_synthetic_persona_csv(path: str | Path) -> list[Task]:
    """One task per user-2 persona of a Synthetic-Persona-Chat CSV; user 2's lines are targets.

    Lines of the conversation that are not ``User 1:``/``User 2:`` turns (stage directions such as
    ``[A few minutes later]``) are skipped. Dialogue ids are ``r<CSV line of the row>``.
    """
    path = Path(path)
    raw = read_bytes(path, "CSV file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: undecodable bytes (UTF-8 expected)") from None
    expected = "expected columns " + ", ".join(repr(c) for c in CSV_COLUMNS)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty CSV file ({expected})")
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path}:1: missing column {', '.join(map(repr, missing))} ({expected})")
        col = {c: header.index(c) for c in CSV_COLUMNS}
        groups: dict[str, tuple[list[str], list[tuple[str, list[Example]]]]] = {}
        while True:
            start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                break
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{start}: row has {len(row)} fields "
                                f"({len(header)} expected: {expected})")
            persona = [s.strip() for s in row[col["user 2 personas"]].splitlines() if s.strip()]
            if not persona:
                raise DataError(f"{path}:{start}: empty 'user 2 personas' "
                                f"(expected one persona sentence per line)")
            examples = _conversation_examples(persona, row[col["Best Generated Conversation"]])
            name = "synthetic-persona-" + _digest(normalize_sentence(s) for s in persona)
            groups.setdefault(name, (persona, []))[1].append((f"r{start}", examples))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    tasks = []
    for name, (persona, convs) in sorted(groups.items()):
        examples = [e for _, exs in convs for e in exs]
        if not examples:
            continue
        tasks.append(Task(name, examples, meta={
            "family": "persona", "source": str(path), "cluster": None, "persona": persona,
            "dialogue_ids": [d for d, exs in convs if exs],
            "dialogue": [d for d, exs in convs for _ in exs]}))
    if not tasks:
        raise DataError(f"{path}: no 'User 2: ...' lines in column 'Best Generated Conversation' "
                        f"(expected 'User 1: ...'/'User 2: ...' lines)")
    return tasks


def _conversation_examples(persona: list[str], conversation: str) -> list[Example]:
    history: list[tuple[str, str]] = []
    examples = []
    for line in conversation.splitlines():
        m = _SPEAKER.match(line)
        if not m or not m.group(2):
            continue
        if m.group(1) == "2":
            examples.append(Example(build_prompt(persona, history), " " + m.group(2)))
        history.append(("You" if m.group(1) == "2" else "Partner", m.group(2)))
    return examples


# --------------------------------------------------------------------------- family entry point

def load_persona_tasks(cfg: TasksConfig, data_dir: Path | None) -> list[Task]:
    """``tasks.path`` (a ParlAI .txt, a Synthetic-Persona-Chat .csv, or a folder), else ConvAI2 valid.

    From a CSV, personas with fewer replies than one episode (``shots + query_size``) are left out:
    many personas there have a single short conversation.
    """
    if cfg.path:
        if str(cfg.path).lower().endswith(".csv"):
            tasks = load_synthetic_persona_csv(cfg.path)
            return [t for t in tasks if len(t.examples) >= cfg.shots + cfg.query_size]
        return load_parlai_persona_tasks(cfg.path)
    if data_dir is None:
        raise ConfigError("tasks.path: family 'persona' needs a ParlAI .txt or Synthetic-Persona-Chat .csv "
                          "file, or tasks.data_dir (or $METAPREP_DATA_DIR) holding convai2/")
    return load_parlai_persona_tasks(Path(data_dir) / "convai2" / PARLAI_FILE)


def _digest(sentences: object) -> str:
    # sha1 of the sorted sentences, not hash(): names must not change with PYTHONHASHSEED
    return hashlib.sha1("\n".join(sorted(sentences)).encode()).hexdigest()[:10]


def _read_json(path: Path) -> object:
    raw = read_bytes(path, "JSON file")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: undecodable bytes (UTF-8 expected)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
