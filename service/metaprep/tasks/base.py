"""Tasks and episodes: a task is a named set of examples; an episode is (support, query).

An :class:`Example` is conditional text ``prompt -> target``: the loss counts target tokens
only (an empty prompt makes it plain language modelling). Every family (synthetic, persona,
multi-domain, summarization, users' JSONL) produces :class:`Task` lists of these, so the
meta-learning code never sees family-specific formats.

Sampling is a pure function of ``(seed, step)``: every Ray Train worker draws the same
meta-batch and takes its own share, and a resumed run redraws exactly the batches it missed.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field, replace

import torch

from metaprep.errors import DataError


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str


@dataclass
class Task:
    name: str
    examples: list[Example]
    meta: dict = field(default_factory=dict)  # family-specific extras (domain, source file, ...)


@dataclass
class TaskSplit:
    train: list[Task]
    val: list[Task]
    test: list[Task]


@dataclass
class Episode:
    task: str
    support: list[Example]
    query: list[Example]


@dataclass
class TaskBatch:
    """Tensors for T tasks with n examples each: ``input_ids``/``labels`` of shape (T, n, L)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    embedding: torch.Tensor | None = None  # (T, D) sentence-encoder task embedding, when configured
    task_ids: list[int] | None = None  # index of each task in its split (Meta-LoRA's adapter table)
    # one seed per task for its random draws (TAMS Gumbel noise), a function of (seed, step, slot in the
    # meta-batch): a task draws the same noise whichever worker runs it, so W workers = 1 worker
    noise_seeds: list[int] | None = None

    @property
    def num_tasks(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: list[int]) -> TaskBatch:
        pick = (lambda xs: None if xs is None else [xs[i] for i in idx])
        return TaskBatch(self.input_ids[idx], self.labels[idx], self.attention_mask[idx],
                         None if self.embedding is None else self.embedding[idx],
                         pick(self.task_ids), pick(self.noise_seeds))

    def to(self, device: torch.device | str) -> TaskBatch:
        return replace(self, input_ids=self.input_ids.to(device), labels=self.labels.to(device),
                       attention_mask=self.attention_mask.to(device),
                       embedding=None if self.embedding is None else self.embedding.to(device))

    def concat(self, other: TaskBatch) -> TaskBatch:
        """Pool this batch's examples with ``other``'s, per task: (T, n_a + n_b, ...) (support + query)."""
        return replace(self, input_ids=torch.cat([self.input_ids, other.input_ids], 1),
                       labels=torch.cat([self.labels, other.labels], 1),
                       attention_mask=torch.cat([self.attention_mask, other.attention_mask], 1))

    def num_target_tokens(self) -> int:
        return int((self.labels[..., 1:] != -100).sum())


def validate_tasks(tasks: list[Task], min_examples: int, source: str) -> list[Task]:
    """Reject empty task lists and tasks too small for ``min_examples`` (shots + query)."""
    if not tasks:
        raise DataError(f"{source}: no tasks found")
    for task in tasks:
        if len(task.examples) < min_examples:
            raise DataError(f"{source}: task {task.name!r} has {len(task.examples)} examples, needs at least "
                            f"{min_examples} (tasks.shots + tasks.query_size)")
    return tasks


def split_tasks(tasks: list[Task], val_fraction: float, test_fraction: float, seed: int) -> TaskSplit:
    """Split by task (never by example) with a fixed seed: meta-train / meta-val / meta-test."""
    if len(tasks) < 3:
        raise DataError(f"need at least 3 tasks to split into meta-train/val/test, got {len(tasks)}")
    order = sorted(tasks, key=lambda t: t.name)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    n_test = max(1, round(len(order) * test_fraction))
    return TaskSplit(train=order[n_val + n_test:], val=order[:n_val], test=order[n_val:n_val + n_test])


def sample_episode(task: Task, shots: int, query_size: int, rng: random.Random) -> Episode:
    """k-shot support and a disjoint query set drawn from one task."""
    idx = rng.sample(range(len(task.examples)), shots + query_size)
    return Episode(task.name, [task.examples[i] for i in idx[:shots]], [task.examples[i] for i in idx[shots:]])


def sample_meta_batch(tasks: list[Task], batch_size: int, shots: int, query_size: int,
                      seed: int, step: int) -> list[Episode]:
    """The meta-batch of step ``step``: a deterministic function of (seed, step)."""
    rng = random.Random(f"{seed}:{step}")
    chosen = rng.sample(range(len(tasks)), batch_size) if batch_size <= len(tasks) else \
        [rng.randrange(len(tasks)) for _ in range(batch_size)]
    return [sample_episode(tasks[i], shots, query_size, rng) for i in chosen]


def fixed_episodes(tasks: list[Task], shots: int, query_size: int, seed: int) -> list[Episode]:
    """One fixed episode per task (meta-val / meta-test): same support/query for every method."""
    return [sample_episode(t, shots, query_size, random.Random(f"{seed}:{t.name}")) for t in tasks]


def fingerprint(tasks: list[Task]) -> str:
    """Stable hash of task names and contents (registry lineage: data fingerprint)."""
    h = hashlib.sha256()
    for task in sorted(tasks, key=lambda t: t.name):
        h.update(json.dumps([task.name, [[e.prompt, e.target] for e in task.examples]]).encode())
    return h.hexdigest()[:16]


def encode_examples(examples: list[Example], tokenizer, seq_len: int) -> tuple[torch.Tensor, ...]:
    """Tokenise ``bos prompt target eos`` into (n, L) ids/labels/mask; labels mask prompt and padding.

    Long examples keep the end of the prompt and the start of the target (the reply is what is
    scored); every example keeps at least one target token.
    """
    ids = torch.full((len(examples), seq_len), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(examples), seq_len), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), seq_len), dtype=torch.long)
    for i, ex in enumerate(examples):
        prompt = [tokenizer.bos_id] + tokenizer.encode(ex.prompt) if ex.prompt else [tokenizer.bos_id]
        target = tokenizer.encode(ex.target) + [tokenizer.eos_id]
        target = target[: max(seq_len // 2, seq_len - len(prompt))]
        prompt = prompt[-(seq_len - len(target)):]
        seq = prompt + target
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(prompt): len(seq)] = torch.tensor(target)
        mask[i, : len(seq)] = 1
    return ids, labels, mask


def make_batch(episodes: list[Episode], part: str, tokenizer, seq_len: int,
               task_index: dict[str, int] | None = None) -> TaskBatch:
    """Stack the ``support`` or ``query`` sets of several episodes into one (T, n, L) batch."""
    parts = [encode_examples(getattr(ep, part), tokenizer, seq_len) for ep in episodes]
    ids, labels, mask = (torch.stack(x) for x in zip(*parts, strict=True))
    task_ids = [task_index[ep.task] for ep in episodes] if task_index is not None else None
    return TaskBatch(ids, labels, mask, task_ids=task_ids)
