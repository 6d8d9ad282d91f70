"""ConvAI2 multiple choice (hits@1 of 20): pick the gold reply among 19 distractors.

Tasks are the persona tasks of :mod:`metaprep.tasks.persona` (same ParlAI file, same grouping,
same prompts). For every reply, 19 distractors are replies of OTHER dialogues of the file, drawn
with ``random.Random(f"{seed}:{dialogue id}:{turn}")`` (string seeds hash with SHA-512, so the
draw does not depend on ``PYTHONHASHSEED``); the gold reply's position is drawn the same way.
Candidates are formatted like :attr:`Example.target` (leading space): score ``Example(context, c)``.

The family's tasks hold :class:`ChoiceExample` objects: an ``Example(context, gold)`` for every LM
code path, plus the candidates for scorers (:func:`make_mc_batch` encodes them for a sentence encoder).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from metaprep.config import TasksConfig
from metaprep.errors import ConfigError, DataError
from metaprep.tasks.base import Episode, Example, Task, TaskBatch
from metaprep.tasks.persona import PARLAI_FILE, dialogue_examples, load_parlai_groups, resolve_parlai_path

NUM_CANDIDATES = 20


@dataclass(frozen=True)
class ChoiceExample(Example):
    """``Example(context, gold)`` that also carries its candidates; ``candidates[label]`` is the gold."""

    candidates: tuple[str, ...] = ()
    label: int = 0


def _distractors(gold: str, dialogue_id: str, pool: list[tuple[str, str]], rng: random.Random) -> list[str]:
    """Up to 19 distinct replies of other dialogues (fewer only on degenerate pools)."""
    def order() -> Iterator[int]:
        for _ in range(20 * NUM_CANDIDATES):
            yield rng.randrange(len(pool))
        start = rng.randrange(len(pool))  # a full scan ends the search on degenerate pools
        yield from ((start + i) % len(pool) for i in range(len(pool)))

    chosen: list[str] = []
    seen = {gold}
    for i in order():
        other, reply = pool[i]
        # a distractor must come from another dialogue and differ from the gold and the others
        if other != dialogue_id and reply not in seen:
            seen.add(reply)
            chosen.append(reply)
            if len(chosen) == NUM_CANDIDATES - 1:
                break
    return chosen


def load_mc_tasks(path_or_data_dir: str | Path, seed: int = 0) -> list[Task]:
    """MC tasks of :class:`ChoiceExample` from a ParlAI file, or a folder holding it directly or in ``convai2/``."""
    file = resolve_parlai_path(path_or_data_dir)
    groups, dialogues = load_parlai_groups(file)
    pool = [(d.id, " " + reply) for d in dialogues for _, reply in d.turns]
    tasks = []
    for group in groups:
        examples, dialogue_of = [], []
        for dialogue in group.dialogues:
            for turn, example in enumerate(dialogue_examples(dialogue)):
                rng = random.Random(f"{seed}:{dialogue.id}:{turn}")
                candidates = _distractors(example.target, dialogue.id, pool, rng)
                if len(candidates) < NUM_CANDIDATES - 1:
                    raise DataError(f"{file}:{dialogue.line}: fewer than {NUM_CANDIDATES - 1} distinct "
                                    f"replies in other dialogues (expected a file with more dialogues)")
                label = rng.randrange(NUM_CANDIDATES)
                candidates.insert(label, example.target)
                examples.append(ChoiceExample(example.prompt, example.target, tuple(candidates), label))
                dialogue_of.append(dialogue.id)
        tasks.append(Task(group.name, examples, meta={
            "family": "convai2_mc", "source": str(file), "cluster": group.cluster, "seed": seed,
            "dialogue_ids": [d.id for d in group.dialogues], "dialogue": dialogue_of}))
    return tasks


def load_convai2_mc_tasks(cfg: TasksConfig, data_dir: Path | None) -> list[Task]:
    """Persona tasks of the MC set, as :class:`ChoiceExample` (``Example(context, gold)`` + candidates)."""
    source = cfg.path or data_dir
    if source is None:
        raise ConfigError(f"tasks.path: family 'convai2_mc' needs a ParlAI {PARLAI_FILE} file, "
                          f"or tasks.data_dir (or $METAPREP_DATA_DIR) holding convai2/")
    return load_mc_tasks(source)


def _encode_texts(texts: list[str], tokenizer, length: int, keep_end: bool) -> list[list[int]]:
    """``[CLS] text [SEP]`` ids of at most ``length`` tokens; ``keep_end`` keeps a context's last turns."""
    body = length - 2
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = ids[-body:] if keep_end else ids[:body]
        out.append([tokenizer.cls_token_id, *ids, tokenizer.sep_token_id])
    return out


def make_mc_batch(episodes: list[Episode], part: str, tokenizer, seq_len: int,
                  task_index: dict[str, int] | None = None) -> TaskBatch:
    """Encoder batch of the ``part`` sets: ids/mask (T, n, 1 + C, L) = context then candidates; labels (T, n).

    ``tokenizer`` is a Hugging Face encoder tokenizer (``cls_token_id``/``sep_token_id``/``pad_token_id``).
    L is the longest sequence of the batch, at most ``seq_len``: contexts keep their end, candidates their start.
    """
    sets = [getattr(ep, part) for ep in episodes]
    for examples in sets:
        for e in examples:
            if not isinstance(e, ChoiceExample) or not e.candidates:
                raise TypeError("make_mc_batch needs ChoiceExample examples (the convai2_mc family)")
    width = 1 + len(sets[0][0].candidates)
    rows = []
    for examples in sets:
        for e in examples:
            if 1 + len(e.candidates) != width:
                raise ValueError(f"every example needs {width - 1} candidates, got {len(e.candidates)}")
            rows.append(_encode_texts([e.prompt], tokenizer, seq_len, keep_end=True)
                        + _encode_texts(list(e.candidates), tokenizer, seq_len, keep_end=False))
    length = max(len(ids) for row in rows for ids in row)
    t, n = len(sets), len(sets[0])
    input_ids = torch.full((t * n, width, length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((t * n, width, length), dtype=torch.long)
    for i, row in enumerate(rows):
        for j, ids in enumerate(row):
            input_ids[i, j, : len(ids)] = torch.tensor(ids)
            mask[i, j, : len(ids)] = 1
    labels = torch.tensor([e.label for examples in sets for e in examples]).view(t, n)
    task_ids = [task_index[ep.task] for ep in episodes] if task_index is not None else None
    return TaskBatch(input_ids.view(t, n, width, length), labels, mask.view(t, n, width, length), task_ids=task_ids)
