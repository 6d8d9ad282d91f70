"""Task families: generated data for every loader, the real shared data when present, bad input."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import metaprep
from metaprep.config import TasksConfig
from metaprep.errors import ConfigError, DataError
from metaprep.tasks.base import Example, Task, fixed_episodes, sample_meta_batch, split_tasks
from metaprep.tasks.convai2_mc import NUM_CANDIDATES, load_convai2_mc_tasks, load_mc_tasks
from metaprep.tasks.families import load_tasks
from metaprep.tasks.jsonl import load_jsonl_tasks
from metaprep.tasks.multidomain import load_domain_folder, load_multidomain_tasks
from metaprep.tasks.persona import (
    HISTORY_UTTERANCES,
    load_parlai_persona_tasks,
    load_persona_tasks,
    load_synthetic_persona_csv,
)
from metaprep.tasks.summarization import load_summarization_folder, load_summarization_tasks, rouge_scores

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")

# --------------------------------------------------------------------------- generated data

# cluster id -> variants as the persona map spells them ("i am", no final period)
CLUSTERS = {
    "0": [["i am a nurse", "i like cats", "i live in ohio"],
          ["i am a nurse", "i like dogs", "i live in ohio"]],
    "1": [["i play chess", "i have two sisters", "i do not eat meat"]],
    "2": [["i drive a truck", "i love country music", "i am tall"]],
    "3": [["i bake bread", "i read a lot", "my dad is a pilot"]],
}


def _parlai_dialogues() -> list[list[str]]:
    """Personas as a dialogue file spells them ("i'm", "don't", final period, any order)."""
    dialogues = []
    for variants in CLUSTERS.values():
        for k in range(3):
            variant = variants[k % len(variants)]
            spelled = [s.replace("i am", "i'm").replace("do not", "don't") + "." for s in variant]
            dialogues.append(spelled[::-1] if k == 2 else spelled)
    dialogues += [["i collect stamps.", "i am from peru."]] * 3  # no cluster: grouped by its text
    dialogues += [["i am a lonely dialogue."]]  # no cluster and too few dialogues: left out
    return dialogues


def write_parlai(folder: Path, turns: int = 5) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for d, persona in enumerate(_parlai_dialogues()):
        n = 0
        for sentence in persona:
            n += 1
            lines.append(f"{n} your persona: {sentence}")
        for t in range(turns):
            n += 1
            lines.append(f"{n} partner says {t} in dialogue {d}\treply {t} of dialogue {d}")
    path = folder / "valid_self_original_no_cands.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "persona_map_valid.json").write_text(json.dumps(CLUSTERS), encoding="utf-8")
    return path


def write_synthetic_csv(path: Path) -> Path:
    persona_a = "I am a chef.\nI love jazz."
    persona_b = "I am a pilot.\nI hate rain."
    conv = ("User 1: Hi!\nUser 2: Hello, I cook.\n\n[A few minutes later]\nUser 1: Nice.\n"
            "* User 2: I like jazz too. *\nUser 1: Bye!\nUser 2: Bye {k}!")
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user 1 personas", "user 2 personas", "Best Generated Conversation"])
        w.writerow(["I like tea.", persona_a, conv.format(k=1)])
        w.writerow(["I like tea.", persona_b, conv.format(k=2)])
        w.writerow(["I like cake.", "I love jazz.\nI am a chef.", conv.format(k=3)])  # persona A reordered
    return path


def write_multidomain(folder: Path, sizes: dict[str, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for domain, n in sizes.items():
        lines = [json.dumps({"text": f"{domain} passage {i}"}) for i in range(n)]
        (folder / f"{domain}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_summarization(root: Path) -> Path:
    samsum = root / "samsum"
    samsum.mkdir(parents=True)
    for name, n in (("validation.json", 3), ("test.json", 2)):
        items = [{"instruction": "Summarize.", "dialogue": f"A: hi {i}\nB: hello",
                  "summary": f"They greet {i}."} for i in range(n)]
        (samsum / name).write_text(json.dumps(items, indent=2), encoding="utf-8")
    for domain in ("news", "emails"):
        (root / domain).mkdir()
        for name in ("dev.jsonl", "test.jsonl"):
            lines = [json.dumps({"document": f"{domain} doc {i}", "summary": f"{domain} sum {i}"})
                     for i in range(4)]
            (root / domain / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# --------------------------------------------------------------------------- persona

def test_persona_parlai_groups_by_cluster(tmp_path):
    path = write_parlai(tmp_path / "convai2")
    tasks = load_parlai_persona_tasks(path)
    names = [t.name for t in tasks]
    assert names == sorted(names)
    assert [t.meta["cluster"] for t in tasks if t.meta["cluster"]] == [f"valid:{c}" for c in CLUSTERS]
    assert len(tasks) == len(CLUSTERS) + 1  # plus the unmatched persona with 3 dialogues
    assert len(load_parlai_persona_tasks(path, min_dialogues=1)) == len(CLUSTERS) + 2
    for task in tasks:
        assert len(task.meta["dialogue_ids"]) == 3
        assert len(task.meta["dialogue"]) == len(task.examples) == 3 * 5
        assert set(task.meta["dialogue"]) == set(task.meta["dialogue_ids"])
    first = next(t for t in tasks if t.name == "persona-valid-0")
    example = first.examples[4]
    lines = example.prompt.split("\n")
    assert lines[0].startswith("Persona: ") and lines[-1] == "You:"
    assert lines[-2] == "Partner: partner says 4 in dialogue 0"
    assert len(lines) == HISTORY_UTTERANCES + 2  # older history dropped
    assert example.target == " reply 4 of dialogue 0"
    assert first.examples[0].prompt.count("\n") == 2  # persona, partner, "You:"


def test_persona_family_default_path_and_load_tasks(tmp_path):
    write_parlai(tmp_path / "convai2")
    tasks = load_persona_tasks(TasksConfig(family="persona"), tmp_path)
    assert len(tasks) == len(CLUSTERS) + 1
    cfg = TasksConfig(family="persona", data_dir=str(tmp_path), shots=5, query_size=5)
    assert [t.name for t in load_tasks(cfg)] == [t.name for t in tasks]


def test_synthetic_persona_csv(tmp_path):
    path = write_synthetic_csv(tmp_path / "valid.csv")
    tasks = load_synthetic_persona_csv(path)
    assert len(tasks) == 2  # persona A (two rows, sentences reordered) and persona B
    by_size = sorted(tasks, key=lambda t: len(t.examples))
    assert [len(t.examples) for t in by_size] == [3, 6]
    big = by_size[1]
    assert len(big.meta["dialogue_ids"]) == 2 and len(big.meta["dialogue"]) == 6
    assert [e.target for e in big.examples[:3]] == [" Hello, I cook.", " I like jazz too.", " Bye 1!"]
    assert big.examples[1].prompt.endswith("Partner: Nice.\nYou:")
    assert "[A few minutes later]" not in big.examples[1].prompt
    cfg = TasksConfig(family="persona", path=str(path), shots=1, query_size=2)
    assert len(load_tasks(cfg)) == 2
    cfg = TasksConfig(family="persona", path=str(path), shots=2, query_size=2)
    assert len(load_persona_tasks(cfg, None)) == 1  # personas too small for an episode are left out


# --------------------------------------------------------------------------- multidomain, summarization

def test_multidomain_any_folder(tmp_path):
    folder = write_multidomain(tmp_path / "md", {"alpha": 9, "beta": 10, "gamma": 12})
    tasks = load_multidomain_tasks(TasksConfig(family="multidomain", path=str(folder)), None)
    assert [t.name for t in tasks] == ["alpha", "beta", "gamma"]
    assert tasks[0].examples[0] == Example("", "alpha passage 0")
    assert [t.name for t in load_domain_folder(folder, domains=["gamma", "alpha"])] == ["alpha", "gamma"]
    assert [t.name for t in load_domain_folder(folder, exclude=["beta"])] == ["alpha", "gamma"]
    write_multidomain(tmp_path / "data" / "multidomain", {"x": 8, "y": 8, "z": 8})
    assert len(load_tasks(TasksConfig(family="multidomain", data_dir=str(tmp_path / "data")))) == 3


def test_summarization_domains(tmp_path):
    root = write_summarization(tmp_path / "summarization")
    tasks = load_summarization_tasks(TasksConfig(family="summarization"), tmp_path)
    assert [t.name for t in tasks] == ["emails", "news", "samsum"]
    assert [len(t.examples) for t in tasks] == [8, 8, 5]
    assert tasks[2].examples[0] == Example("A: hi 0\nB: hello\nSummary:", " They greet 0.")
    assert tasks[0].examples[0] == Example("emails doc 0\nSummary:", " emails sum 0")
    assert [t.name for t in load_summarization_folder(root / "news")] == ["news"]  # one domain folder


def test_rouge_scores():
    same = rouge_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    partial = rouge_scores(["the cat sat", "dogs run"], ["the cat sat down", "birds fly"])
    assert 0.0 < partial["rouge1"] < 1.0 and partial["rouge2"] <= partial["rouge1"]


# --------------------------------------------------------------------------- convai2 multiple choice

def _mc_signature(tasks) -> list:
    return [[t.name, [[list(e.candidates), e.label] for e in t.examples]] for t in tasks]


def test_convai2_mc_candidates(tmp_path):
    path = write_parlai(tmp_path / "convai2")
    tasks = load_mc_tasks(tmp_path)
    assert [t.name for t in tasks] == [t.name for t in load_parlai_persona_tasks(path)]
    labels = set()
    for task in tasks:
        for example, dialogue in zip(task.examples, task.meta["dialogue"], strict=True):
            gold = example.candidates[example.label]
            assert len(example.candidates) == NUM_CANDIDATES == len(set(example.candidates))
            assert example.candidates.count(gold) == 1
            number = dialogue.lstrip("d").lstrip("0") or "0"
            assert gold.endswith(f"of dialogue {number}")
            assert not any(c.endswith(f"of dialogue {number}") for c in example.candidates if c != gold)
            labels.add(example.label)
    assert len(labels) > 1  # gold is not always first
    assert _mc_signature(load_mc_tasks(tmp_path)) == _mc_signature(tasks)
    assert _mc_signature(load_mc_tasks(tmp_path, seed=1)) != _mc_signature(tasks)
    plain = load_convai2_mc_tasks(TasksConfig(family="convai2_mc"), tmp_path)
    assert plain[0].examples[0].target == tasks[0].examples[0].candidates[tasks[0].examples[0].label]
    choice, example = plain[0].examples[0], load_parlai_persona_tasks(path)[0].examples[0]
    assert (choice.prompt, choice.target) == (example.prompt, example.target)  # an Example to every LM path
    assert (choice.candidates, choice.label) == (tasks[0].examples[0].candidates, tasks[0].examples[0].label)


def test_convai2_mc_independent_of_hash_seed(tmp_path):
    write_parlai(tmp_path / "convai2")
    code = ("import json, sys; from metaprep.tasks.convai2_mc import load_mc_tasks; "
            "print(json.dumps([[t.name, [[list(e.candidates), e.label] for e in t.examples]] "
            "for t in load_mc_tasks(sys.argv[1])]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345",
           "PYTHONPATH": str(Path(metaprep.__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == _mc_signature(load_mc_tasks(tmp_path))


# --------------------------------------------------------------------------- real shared data

def _sizes(tasks: list[Task]) -> tuple[int, float, int]:
    n = [len(t.examples) for t in tasks]
    return min(n), statistics.median(n), max(n)


@needs_shared
def test_real_persona():
    tasks = load_persona_tasks(TasksConfig(family="persona"), SHARED_DATA)
    assert 88 <= len(tasks) <= 108
    assert all(t.meta["cluster"] for t in tasks)
    assert all(5 <= len(t.meta["dialogue_ids"]) <= 30 for t in tasks)
    assert _sizes(tasks)[0] >= 8
    assert 7000 <= sum(len(t.examples) for t in tasks) <= 7801


@needs_shared
def test_real_synthetic_persona_csv():
    tasks = load_synthetic_persona_csv(SHARED_DATA / "synthetic_persona_chat" / "valid.csv")
    assert 300 <= len(tasks) <= 1000
    assert sum(len(t.meta["dialogue_ids"]) for t in tasks) >= 950
    assert all(e.target.startswith(" ") and e.prompt.endswith("You:") for t in tasks for e in t.examples)


@needs_shared
def test_real_multidomain():
    tasks = load_multidomain_tasks(TasksConfig(family="multidomain"), SHARED_DATA)
    assert 40 <= len(tasks) <= 60
    assert _sizes(tasks)[0] >= 8
    assert {"foldoc", "pydoc-library"} <= {t.name for t in tasks}


@needs_shared
def test_real_summarization():
    tasks = load_summarization_tasks(TasksConfig(family="summarization"), SHARED_DATA)
    assert {t.name for t in tasks} == {"aeslc", "samsum", "scitldr"}
    assert _sizes(tasks)[0] >= 500


@needs_shared
def test_real_convai2_mc():
    tasks = load_mc_tasks(SHARED_DATA)
    assert 88 <= len(tasks) <= 108
    example = tasks[0].examples[0]
    assert len(example.candidates) == NUM_CANDIDATES
    assert example.candidates.count(example.candidates[example.label]) == 1


# --------------------------------------------------------------------------- bad input, one per case

def test_malformed_json_line(tmp_path):
    folder = write_multidomain(tmp_path / "md", {"a": 3})
    (folder / "b.jsonl").write_text('{"text": "ok"}\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.jsonl:2: malformed JSON") as err:
        load_domain_folder(folder)
    assert "\n" not in str(err.value)


def test_missing_field(tmp_path):
    root = write_summarization(tmp_path / "summ")
    (root / "news" / "dev.jsonl").write_text('{"document": "d", "summary": "s"}\n{"document": "d"}\n',
                                             encoding="utf-8")
    with pytest.raises(DataError, match=r"dev\.jsonl:2: missing field 'summary'.*expected \{\"document\""):
        load_summarization_folder(root)


def test_missing_field_in_json_list_names_element_line(tmp_path):
    root = write_summarization(tmp_path / "summ")
    file = root / "samsum" / "test.json"
    items = [{"dialogue": "A: hi", "summary": "hi"}, {"dialogue": "A: bye"}]
    file.write_text(json.dumps(items, indent=2), encoding="utf-8")
    line = file.read_text().split("\n").index("  {", 2) + 1
    with pytest.raises(DataError, match=rf"test\.json:{line}: missing field 'summary'"):
        load_summarization_folder(root)


def test_empty_task_file(tmp_path):
    folder = write_multidomain(tmp_path / "md", {"a": 3})
    (folder / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty task file.*expected one \{\"text\": STR\}"):
        load_domain_folder(folder)


def test_undecodable_bytes(tmp_path):
    path = write_parlai(tmp_path / "convai2")
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2] + b" \xff\xfe"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"no_cands\.txt:3: undecodable bytes .*UTF-8 expected"):
        load_parlai_persona_tasks(path)


def test_parlai_missing_tab(tmp_path):
    path = tmp_path / "dialogues.txt"
    path.write_text("1 your persona: i swim.\n2 hello there\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dialogues\.txt:2: missing reply after a TAB \(expected 'N partner"):
        load_parlai_persona_tasks(path)


def test_parlai_bad_turn_number(tmp_path):
    path = tmp_path / "dialogues.txt"
    path.write_text("1 your persona: i swim.\n3 hi\thello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dialogues\.txt:2: turn number 3 follows 1 \(expected 2"):
        load_parlai_persona_tasks(path)


def test_csv_missing_column(tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text("user 1 personas,conversation\na,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"chat\.csv:1: missing column 'user 2 personas'.*expected columns"):
        load_synthetic_persona_csv(path)


def test_fewer_examples_than_shots(tmp_path):
    folder = write_multidomain(tmp_path / "md", {"big": 20, "small": 5})
    cfg = TasksConfig(family="multidomain", path=str(folder), shots=4, query_size=4)
    with pytest.raises(DataError, match=r"task 'small' has 5 examples, needs at least 8 \(tasks.shots"):
        load_tasks(cfg)


def test_unknown_family():
    with pytest.raises(ConfigError, match=r"tasks.family: 'nope' is not valid; choose one of .*persona"):
        load_tasks(TasksConfig(family="nope"))


def test_unknown_domain(tmp_path):
    folder = write_multidomain(tmp_path / "md", {"alpha": 8, "beta": 8})
    with pytest.raises(DataError, match=r"unknown domain 'gamma' \(available: alpha, beta\)"):
        load_domain_folder(folder, domains=["alpha", "gamma"])


# --------------------------------------------------------------------------- users' JSONL (tasks/jsonl.py)

def test_jsonl_text_and_prompt_target_shapes(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"task": "lm", "text": "hello world"}, {"task": "qa", "prompt": "2+2=", "target": " 4"},
            {"task": "lm", "text": "second"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    tasks = load_jsonl_tasks(path)
    assert [(t.name, t.examples) for t in tasks] == [
        ("lm", [Example("", "hello world"), Example("", "second")]), ("qa", [Example("2+2=", " 4")])]


def test_jsonl_folder_of_files(tmp_path):
    (tmp_path / "alpha.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    (tmp_path / "beta.jsonl").write_text('{"prompt": "p", "target": "t"}\n{"task": "gamma", "text": "g"}\n',
                                         encoding="utf-8")
    tasks = {t.name: t.examples for t in load_jsonl_tasks(tmp_path)}
    assert tasks == {"alpha": [Example("", "a"), Example("", "b")], "beta": [Example("p", "t")],
                     "gamma": [Example("", "g")]}


def test_jsonl_missing_task_field(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"task": "a", "text": "x"}\n{"text": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"mine\.jsonl:2: missing field 'task'; expected"):
        load_jsonl_tasks(path)


# --------------------------------------------------------------------------- episodes (tasks/base.py)

def _tasks(n: int = 20, size: int = 12) -> list[Task]:
    return [Task(f"t{i:02d}", [Example(f"p{i}-{j}", f" x{i}-{j}") for j in range(size)]) for i in range(n)]


def test_split_tasks_by_task_disjoint_deterministic():
    tasks = _tasks()
    split = split_tasks(tasks, 0.15, 0.15, seed=7)
    names = [[t.name for t in part] for part in (split.train, split.val, split.test)]
    assert sorted(sum(names, [])) == [t.name for t in tasks]  # every task once, none split apart
    train, val, test = map(set, names)
    assert train.isdisjoint(val) and train.isdisjoint(test) and val.isdisjoint(test)
    again = split_tasks(list(reversed(tasks)), 0.15, 0.15, seed=7)
    assert [[t.name for t in p] for p in (again.train, again.val, again.test)] == names
    other = split_tasks(tasks, 0.15, 0.15, seed=8)
    assert [t.name for t in other.val + other.test] != names[1] + names[2]


def test_sample_meta_batch_deterministic_in_seed_and_step():
    tasks = _tasks()

    def draw(seed: int, step: int) -> list:
        return [(e.task, e.support, e.query) for e in sample_meta_batch(tasks, 4, 3, 2, seed, step)]

    assert draw(0, 5) == draw(0, 5)
    assert draw(0, 5) != draw(0, 6)
    assert draw(0, 5) != draw(1, 5)
    assert len({e.task for e in sample_meta_batch(tasks, 4, 3, 2, 0, 5)}) == 4


def test_fixed_episodes_support_query_disjoint():
    tasks = _tasks()
    episodes = fixed_episodes(tasks, shots=4, query_size=5, seed=3)
    assert [e.task for e in episodes] == [t.name for t in tasks]
    for episode in episodes:
        assert len(episode.support) == 4 and len(episode.query) == 5
        assert set(episode.support).isdisjoint(episode.query)
    assert fixed_episodes(tasks, 4, 5, seed=3) == episodes
