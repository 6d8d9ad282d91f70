"""Issue 22: inputs that cost more than they look, registry artifacts trusted too easily, exports and outputs
checked too late, runs that learned nothing reported as success.

Every case ends in ONE line naming the cause and what is valid, exit 2, nothing written. Cases that would
hang or exhaust memory without their guard run under a deadline, or in a subprocess with a memory limit.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jobs._cli import run_main
from metaprep.config import MetaTrainConfig, load_config
from metaprep.errors import ConfigError, RegistryError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "jobs/configs/tiny.yaml")


class _Hung(Exception):
    """Not an OSError: a guard that turns a hang into a failure must not look like a read error."""


@contextlib.contextmanager
def _deadline(seconds: int):
    def hung(*_):
        raise _Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _one_line_error(capsys, job: str, argv: list[str], expected: str, seconds: int = 60) -> str:
    main = importlib.import_module(f"jobs.{job}").main
    with _deadline(seconds), pytest.raises(SystemExit) as code:
        run_main(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2 and err, err
    assert err[-1].startswith("error: ") and expected in err[-1], err[-3:]
    assert not any("Traceback" in line for line in err), "\n".join(err)
    return err[-1]


def _examples(path: Path, n: int = 12) -> str:
    path.write_text("".join(json.dumps({"task": "t", "prompt": f"a b {i} =", "target": f" x{i}"}) + "\n"
                            for i in range(n)))
    return str(path)


# --------------------------------------------------------------------------- 1. small input, unbounded cost

def test_fifo_as_config_or_task_file_is_refused_not_waited_on(tmp_path, capsys) -> None:
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    _one_line_error(capsys, "meta_train", ["--config", str(fifo)], "config file must be a regular file (got a FIFO)",
                    seconds=10)
    _one_line_error(capsys, "adapt", ["--base", str(tmp_path), "--controller", str(tmp_path), "--tasks", str(fifo)],
                    "task file must be a regular file (got a FIFO)", seconds=10)


@pytest.mark.parametrize("argv, expected", [
    (["-m", "jobs.meta_train", "--config", "/dev/zero"], "error: /dev/zero: config file must be a regular file"),
    (["-m", "jobs.adapt", "--base", ".", "--controller", ".", "--tasks", "/dev/zero", "--no-mlflow"],
     "error: /dev/zero: task file must be a regular file (got a character device)"),
])
def test_dev_zero_is_refused_without_reading_it(argv, expected) -> None:
    """In a subprocess limited to 4 GB of address space: without the guard it dies of MemoryError, not the machine."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          preexec_fn=limit, env={"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(expected), proc.stderr[-800:]


def test_task_files_above_the_size_bound_are_refused(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("metaprep.jsonio.MAX_DATA_BYTES", 1024)
    big = _examples(tmp_path / "big.jsonl", 40)  # ~2 KB
    _one_line_error(capsys, "adapt", ["--base", str(tmp_path), "--controller", str(tmp_path), "--tasks", big],
                    "big.jsonl: task file is larger than the limit of 1 KiB")
    folder = tmp_path / "tasks"
    folder.mkdir()
    for i in range(3):
        _examples(folder / f"t{i}.jsonl", 8)  # each under the bound, together above it
    _one_line_error(capsys, "adapt", ["--base", str(tmp_path), "--controller", str(tmp_path), "--tasks", str(folder)],
                    "more than the limit of 1024 bytes")


@pytest.mark.parametrize("override, expected", [
    ("model.tiny.vocab_size=20000000", "model.tiny.vocab_size: must be <= 1048576, got 20000000"),
    ("tasks.num_tasks=100000000", "tasks.num_tasks: must be <= 100000, got 100000000"),
    ("meta.meta_batch_size=1000000", "meta.meta_batch_size: must be <= 4096"),
    ("tasks.seq_len=1000000", "tasks.seq_len: must be <= 32768"),
    ("model.tiny.layers=100000", "model.tiny.layers: must be <= 256"),
    ("model.tiny.heads=0", "model.tiny.heads: must be >= 1, got 0"),
    ("model.tiny.heads=5", "model.tiny.heads: must divide model.tiny.dim (64), got 5"),
    ("seed=18446744073709551616", "seed: must be an integer in [0, 2**63 - 1]"),
])
def test_size_fields_have_upper_bounds(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(MetaTrainConfig, TINY, [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_tiny_model_memory_is_bounded_by_this_machine(monkeypatch) -> None:
    """Each field within its cap, together more than half of the machine's memory (pretend 1 GiB)."""
    monkeypatch.setattr("metaprep.config_bounds.machine_memory_bytes", lambda: 1 << 30)
    load_config(MetaTrainConfig, TINY)  # the tiny recipe needs a few MB
    with pytest.raises(ConfigError) as err:
        load_config(MetaTrainConfig, TINY, ["model.tiny.vocab_size=500000", "model.tiny.dim=512"])
    message = str(err.value)
    assert message.startswith("model.tiny / tasks / meta: a run of this size needs about")
    assert "above the bound of 0.5 GiB (half of this machine's 1.0 GiB)" in message and "\n" not in message


# --------------------------------------------------------------------------- 5. a run that learned nothing

@pytest.mark.parametrize("override, expected", [
    ("meta.grad_clip=.nan", "meta.grad_clip: must be a finite number >= 0, got nan"),
    ("meta.grad_clip=-1", "meta.grad_clip: must be a finite number >= 0, got -1.0"),
    ("reparam.alpha=.nan", "reparam.alpha: must be a finite number > 0, got nan"),
    ("reparam.alpha=0", "reparam.alpha: must be a finite number > 0, got 0.0"),
    ("reparam.alpha=.inf", "reparam.alpha: must be a finite number > 0, got inf"),
])
def test_non_finite_clip_and_alpha_are_refused(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(MetaTrainConfig, TINY, [override])


def test_saturating_inner_lr_is_detected_as_learning_nothing() -> None:
    """meta.inner_lr=1e12 saturates every output: the meta-gradient is 0 and meta-val never moves."""
    from metaprep.train.launch import FitResult
    from metaprep.train.local import meta_train_local

    cfg = load_config(MetaTrainConfig, TINY, ["meta.inner_lr=1e12", "meta.meta_steps=3", "meta.eval_every=2"])
    final = meta_train_local(cfg).final
    assert final["no_update_steps"] == 3 and final["diverged_at"] is None
    assert FitResult(final, None).learned_nothing == ("all 3 outer steps left the weights unchanged "
                                                      "(meta-gradient norm 0)")


@pytest.mark.parametrize("final, reason", [
    ({"meta_steps": 6, "no_update_steps": 0, "meta_val_curve": [[0, 5.5], [3, 5.5], [6, 5.5]]},
     "meta-val loss never changed (5.5 at all 3 evaluations)"),
    ({"meta_steps": 6, "no_update_steps": 0, "meta_val_curve": [[0, 5.5], [3, float("nan")], [6, 5.5]]},
     "meta-val loss never changed (5.5 at all 3 evaluations)"),
    ({"meta_steps": 6, "no_update_steps": 6, "meta_val_curve": [[0, 5.5], [6, 5.4]]},
     "all 6 outer steps left the weights unchanged (meta-gradient norm 0)"),
    ({"meta_steps": 6, "no_update_steps": 5, "meta_val_curve": [[0, 5.5], [6, 5.4]]}, None),
    ({"meta_steps": 0, "no_update_steps": 0, "meta_val_curve": [[0, 5.5]]}, None),  # finetune: nothing to learn
])
def test_learned_nothing_rules(final: dict, reason: str | None) -> None:
    from metaprep.train.launch import FitResult

    assert FitResult({**final, "meta_val_loss_end": 0.0}, None).learned_nothing == reason


def test_learned_nothing_fails_the_job_and_registers_nothing(tmp_path, capsys, monkeypatch) -> None:
    """The launch path (Ray's fit replaced by a run whose meta-val never moved): exit 2, one line, run FAILED."""
    from mlflow.tracking import MlflowClient

    from metaprep.train import launch

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("METAPREP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(launch, "connect_ray", lambda cfg, log_to_driver: {})
    flat = {"meta_steps": 4, "meta_val_loss_start": 5.5568, "meta_val_loss_end": 5.5568, "diverged_at": None,
            "meta_val_curve": [[0, 5.5568], [2, 5.5568], [4, 5.5568]], "no_update_steps": 0}
    monkeypatch.setattr(launch, "fit", lambda run, callbacks=(): launch.FitResult(flat, str(tmp_path / "export")))
    line = _one_line_error(capsys, "meta_train", ["--config", TINY, "--set", "meta.meta_steps=4"],
                           "the run learned nothing: meta-val loss never changed (5.5568 at all 3 evaluations)")
    assert line.endswith("Nothing was registered.")
    client = MlflowClient(tracking_uri=uri)
    assert client.search_registered_models() == []
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.integration
def test_learned_nothing_run_is_not_registered(stack) -> None:
    """The real job on the local stack: meta.inner_lr=1e12 exits 2 with one line and registers nothing."""
    import uuid

    from mlflow.tracking import MlflowClient

    name = f"flat-{uuid.uuid4().hex[:6]}"
    proc = subprocess.run([sys.executable, "-m", "jobs.meta_train", "--config", TINY, "--set", f"registry.name={name}",
                           "--set", "meta.inner_lr=1e12", "--set", "meta.meta_steps=4", "--set", "meta.eval_every=2"],
                          cwd=ROOT, env={**stack["env"], "RAY_ADDRESS": stack["ray"]}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the run learned nothing")
    assert MlflowClient(tracking_uri=stack["mlflow"]).search_model_versions(f"name='{name}-base'") == []


# --------------------------------------------------------------------------- 3. registry artifacts

@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """An exported tiny prepared model (untrained: loading is what is tested)."""
    from metaprep.meta.build import build_meta_model
    from metaprep.registry.artifacts import export_prepared

    cfg = load_config(MetaTrainConfig, TINY)
    model, loaded = build_meta_model(cfg)
    out = tmp_path_factory.mktemp("artifact")
    export_prepared(model, loaded, cfg, out)
    return out


@pytest.fixture()
def copy(artifact, tmp_path) -> Path:
    shutil.copytree(artifact, tmp_path / "a")
    return tmp_path / "a"


def _rewrite_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _tamper_spec(folder: Path) -> None:
    spec = json.loads((folder / "controller/spec.json").read_text())
    spec["meta"]["inner_lr"] = 123.0
    (folder / "controller/spec.json").write_text(json.dumps(spec))


def _load(folder: Path, base: str = "base", ctrl: str = "controller"):
    from metaprep.registry.artifacts import load_prepared

    return load_prepared(folder / base, folder / ctrl)


def test_untampered_artifact_loads(copy) -> None:
    _, _, cfg = _load(copy)
    assert cfg.meta.inner_lr == 0.3


@pytest.mark.parametrize("manifest", [{}, []], ids=["empty-mapping", "list"])
def test_manifest_must_be_a_non_empty_mapping(copy, manifest) -> None:
    _tamper_spec(copy)
    (copy / "controller/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match="manifest.json must be a non-empty mapping"):
        _load(copy)


@pytest.mark.parametrize("rel", ["../outside.txt", "/etc/hostname", "sub/../../outside.txt"])
def test_manifest_paths_must_stay_inside_the_folder(copy, rel) -> None:
    outside = copy / "outside.txt"
    outside.write_text("secret")
    from metaprep.registry.artifacts import _sha256

    target = (copy / "controller" / rel) if not rel.startswith("/") else Path(rel)
    entry = {"sha256": _sha256(target), "bytes": target.stat().st_size} if target.exists() else {}
    _rewrite_manifest(copy / "controller", lambda m: {**m, rel: entry})
    with pytest.raises(RegistryError, match="not a path inside the artifact folder"):
        _load(copy)


def test_unlisted_files_are_refused(copy) -> None:
    _tamper_spec(copy)
    _rewrite_manifest(copy / "controller", lambda m: {k: v for k, v in m.items() if k != "spec.json"})
    with pytest.raises(RegistryError, match="holds spec.json, which manifest.json does not list"):
        _load(copy)


def test_a_pickle_in_a_base_is_refused_even_when_listed(copy) -> None:
    import torch

    from metaprep.registry.artifacts import write_manifest

    torch.save({}, copy / "base/pytorch_model.bin")
    write_manifest(copy / "base")
    with pytest.raises(RegistryError, match="holds pytorch_model.bin, a pickle"):
        _load(copy)


def test_a_base_without_safetensors_is_one_line(copy) -> None:
    from metaprep.registry.artifacts import write_manifest

    (copy / "base/model.safetensors").unlink()
    write_manifest(copy / "base")
    with pytest.raises(RegistryError, match="cannot load the model or tokenizer") as err:
        _load(copy)
    assert "\n" not in str(err.value)


def test_a_reference_base_to_pickled_weights_is_refused(copy, tmp_path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from metaprep.registry.artifacts import write_manifest

    source = tmp_path / "gpt2"  # a transformers folder whose weights are a pickle only
    config = GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    config.save_pretrained(source)
    torch.save(GPT2LMHeadModel(config).state_dict(), source / "pytorch_model.bin")
    base = copy / "base"
    shutil.rmtree(base)  # files and the transformers flavor's components/ folder
    base.mkdir()
    (base / "metaprep_base.json").write_text(json.dumps({"format": "reference", "kind": "hf", "source": str(source),
                                                         "tokenizer": {"kind": "from_source"}}))
    write_manifest(base)
    with pytest.raises(RegistryError, match="whose weights are pickle files"):
        _load(copy)


@pytest.mark.parametrize("base, ctrl, expected", [
    ("base", "base", "controller: .* has no spec.json \\(it is a base artifact: give a controller URI here"),
    ("controller", "base", "base: .* has no metaprep_base.json \\(it is a controller artifact"),
])
def test_a_base_given_as_controller_is_named(copy, base, ctrl, expected) -> None:
    with pytest.raises(RegistryError, match=expected):
        _load(copy, base, ctrl)


def test_adapt_with_swapped_folders_is_one_line(copy, tmp_path, capsys) -> None:
    _one_line_error(capsys, "adapt", ["--base", str(copy / "controller"), "--controller", str(copy / "base"),
                                      "--tasks", _examples(tmp_path / "t.jsonl"), "--no-mlflow"],
                    "(it is a controller artifact: give a base URI here (--base and --controller swapped?))")


# --------------------------------------------------------------------------- 4. exports and outputs

def _adapt(copy: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--base", str(copy / "base"), "--controller", str(copy / "controller"), "--tasks",
            _examples(tmp_path / "t.jsonl"), "--shots", "2", "--steps", "1", "--query-size", "2", *extra]


def test_export_with_overwrite_writes_into_a_non_empty_folder(copy, tmp_path, capsys) -> None:
    out = tmp_path / "peft"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as code:
        run_main(importlib.import_module("jobs.adapt").main,
                 _adapt(copy, tmp_path, "--no-mlflow", "--export-peft", str(out), "--overwrite"))
    assert code.value.code == 0, capsys.readouterr().err[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "base",
                                                    "notes.txt", "tokenizer.json", "tokenizer_config.json"]
    assert not list(tmp_path.glob(".peft.partial-*"))  # the staging folder is gone


def test_export_is_not_written_when_the_mlflow_step_fails(copy, tmp_path, capsys, monkeypatch) -> None:
    from metaprep.train import adapt_task

    def down(*args, **kwargs):
        raise RegistryError("MLflow tracking server is unreachable (test)")

    monkeypatch.setattr(adapt_task, "_log_run", down)
    _one_line_error(capsys, "adapt", _adapt(copy, tmp_path, "--export-peft", str(tmp_path / "peft")),
                    "MLflow tracking server is unreachable (test)")
    assert not (tmp_path / "peft").exists() and not list(tmp_path.glob(".peft.partial-*"))


def _never_run(args) -> dict:
    raise AssertionError("the suite ran before --out was checked")


@pytest.mark.parametrize("out, expected", [
    ("file.txt/o.json", "file.txt is a file, not a folder"),
    ("folder", "it is a folder; expected a file path"),
])
def test_benchmark_out_is_checked_before_the_run(tmp_path, capsys, monkeypatch, out, expected) -> None:
    from metaprep.bench import SUITES

    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    monkeypatch.setitem(SUITES, "meta_lora_linear", f"{__name__}:_never_run")
    _one_line_error(capsys, "benchmark", ["--suite", "meta_lora_linear", "--out", str(tmp_path / out), "--quick"],
                    expected)
