"""Exports that standard tools load, checked before any work starts (issue 19, item 3; item 6's --controller).

- ``--export-peft`` / ``--export-merged`` folders load with transformers (+ peft) in a fresh interpreter where
  importing metaprep fails, and give the adapted model's logits and tokens;
- the tokenizers exported for them (byte-level for the tiny model, llama2.c's BPE for stories260K) give our ids;
- an export the model cannot give, a bad ``--register`` name and a missing controller fail in seconds, before
  any weights load;
- ``--register NAME`` (here an mltd model: TARP + TAMS) registers a pyfunc model that reproduces the adapted
  model, loads by ``models:/NAME/1`` and is served by ``mlflow models serve``.
Registry tests use a private sqlite store, not the shared stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from metaprep.config import MetaTrainConfig, load_config
from metaprep.errors import MetaprepError
from metaprep.meta.adapt import adapt
from metaprep.models.tokenizer import ByteTokenizer
from metaprep.models.tokenizer_export import save_standalone_tokenizer
from metaprep.registry.export import export_merged, export_peft
from metaprep.tasks.base import fixed_episodes, make_batch
from metaprep.train.local import meta_train_local
from metaprep.train.loop import WorkerResult

ROOT = Path(__file__).resolve().parents[1]
STORIES = "models/stories260K"
TEXT = "Once upon a time, a b 3 = x3"
SAMPLES = ["a b", "", "  two  spaces ", "Tom said: \"Let's go!\"\nThey went home.\n\n",
           "héllo wörld ✓ 日本 <s> </s> <unk> <pad> <0x41>"]
NAME = "metaprep-test-adapted"
SEQ_LEN = 24  # tasks.seq_len of jobs/configs/tiny.yaml, the recipe every case prepares


# --------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def prepared():
    """``get(kind, algorithm, model_path)``: the tiny recipe meta-trained 2 steps in-process (cached)."""
    cache: dict[tuple, WorkerResult] = {}

    def get(kind: str = "lora", algorithm: str = "fomaml", model_path: str = "tiny") -> WorkerResult:
        key = (kind, algorithm, model_path)
        if key not in cache:
            cache[key] = meta_train_local(_recipe(*key), export=True)
        return cache[key]
    return get


def _recipe(kind: str, algorithm: str, model_path: str) -> MetaTrainConfig:
    return load_config(MetaTrainConfig, ROOT / "jobs/configs/tiny.yaml",
                       [f"reparam.kind={kind}", f"algorithm={algorithm}", f"model.path={model_path}",
                        "meta.meta_steps=2", "meta.eval_every=2"])


def _model_path(model: str, request: pytest.FixtureRequest) -> str:
    """``tiny``, or the stories260K folder (the test skips without ../shared)."""
    return "tiny" if model == "tiny" else str(request.getfixturevalue("shared_dir") / STORIES)


def _tasks_file(path: Path) -> str:
    path.write_text("".join(json.dumps({"task": "t", "prompt": f"a b {i} =", "target": f" x{i}"}) + "\n"
                            for i in range(12)))
    return str(path)


def _without_metaprep(script: str, cwd: Path) -> dict:
    """Run ``script`` in a fresh interpreter in which ``import metaprep`` fails; its stdout's last line as JSON."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", "import sys\nsys.modules['metaprep'] = None\n" + script],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


LOGITS = """
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import AutoPeftModelForCausalLM
folder, kind, text = {folder!r}, {kind!r}, {text!r}
model = (AutoPeftModelForCausalLM if kind == "peft" else AutoModelForCausalLM).from_pretrained(folder)
tok = AutoTokenizer.from_pretrained(folder)
ids = tok(text, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(input_ids=ids).logits[0]
text = tok.decode(ids[0], skip_special_tokens=True)
print(json.dumps({{"ids": ids[0].tolist(), "logits": logits.tolist(), "text": text}}))
"""

QUERY_LOSS = """
import json, torch, torch.nn.functional as F
from transformers import AutoModelForCausalLM
from peft import AutoPeftModelForCausalLM
batch = json.loads(open({batch!r}).read())
ids, mask, labels = (torch.tensor(batch[k]) for k in ("input_ids", "attention_mask", "labels"))
out = {{}}
for kind, folder in (("peft", {peft!r}), ("merged", {merged!r})):
    model = (AutoPeftModelForCausalLM if kind == "peft" else AutoModelForCausalLM).from_pretrained(folder)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    out[kind] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                ignore_index=-100).item()
print(json.dumps(out))
"""


def _refused(argv: list[str], expected: str, seconds: float = 20.0) -> str:
    """``jobs.adapt`` fails with one line holding ``expected``, within ``seconds``."""
    from jobs.adapt import main

    t0 = time.perf_counter()
    with pytest.raises(MetaprepError) as err:
        main(argv)
    message = str(err.value)
    assert expected in message and "\n" not in message, message
    assert time.perf_counter() - t0 < seconds
    return message


def _spec_only(tmp_path: Path, algorithm: str, kind: str, family: str = "synthetic") -> list[str]:
    """``--base``/``--controller`` of a model known only by its spec: folders without weights or manifest
    (loading them would fail with 'no manifest.json'), holding only metaprep_base.json and spec.json."""
    base, ctrl = tmp_path / "base", tmp_path / "controller"
    base.mkdir()
    ctrl.mkdir()
    (base / "metaprep_base.json").write_text(json.dumps({"format": "full", "kind": "tiny", "source": "tiny"}))
    (ctrl / "spec.json").write_text(json.dumps({"algorithm": algorithm, "reparam": {"kind": kind},
                                                "tasks": {"family": family}}))
    return ["--base", str(base), "--controller", str(ctrl), "--tasks", _tasks_file(tmp_path / "t.jsonl"),
            "--shots", "4", "--no-mlflow"]


# --------------------------------------------------------------------------- tokenizers

def _check_same_ids(ours, folder: Path, texts: list[str]) -> None:
    hf = AutoTokenizer.from_pretrained(folder)
    for text in texts:
        ids = ours.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf(text).input_ids == [ours.bos_id, *ids]  # bos prompt, as in training
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    assert (hf.bos_token_id, hf.eos_token_id) == (ours.bos_id, ours.eos_id)


def test_byte_tokenizer_exports_to_autotokenizer_with_the_same_ids(tmp_path) -> None:
    save_standalone_tokenizer(ByteTokenizer(), tmp_path, 64)
    _check_same_ids(ByteTokenizer(), tmp_path, SAMPLES)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token_id == ByteTokenizer.pad_id


def test_llama2c_tokenizer_exports_to_autotokenizer_with_the_same_ids(shared_dir, tmp_path) -> None:
    from metaprep.models.llama2c import Llama2cTokenizer

    ours = Llama2cTokenizer(shared_dir / STORIES / "tok512.bin", 512)
    save_standalone_tokenizer(ours, tmp_path, 512)
    dialogues = (shared_dir / "data/convai2/valid_self_original_no_cands.txt").read_text().splitlines()[:400]
    _check_same_ids(ours, tmp_path, SAMPLES + [line.split(" ", 1)[1] for line in dialogues])


# --------------------------------------------------------------------------- exports load alone

@pytest.mark.parametrize("export, model, kind", [
    ("peft", "tiny", "lora"), ("peft", "stories260K", "lora"),
    ("merged", "tiny", "tarp_bilinear"), ("merged", "stories260K", "lora"),
])
def test_export_loads_without_metaprep_and_gives_the_adapted_logits(prepared, request, tmp_path, export: str,
                                                                    model: str, kind: str) -> None:
    result = prepared(kind, model_path=_model_path(model, request))
    tok = result.loaded.tokenizer
    eps = fixed_episodes(result.split.test[:1], 4, 4, seed=0)
    support, query = (make_batch(eps, part, tok, SEQ_LEN) for part in ("support", "query"))
    fast = adapt(result.model, support, query, 3, 0.3).fast
    save = export_peft if export == "peft" else export_merged
    save(result.model, fast, 0, tmp_path / export, tok)

    out = _without_metaprep(LOGITS.format(folder=str(tmp_path / export), kind=export, text=TEXT), tmp_path)
    ids = torch.tensor([[tok.bos_id, *tok.encode(TEXT)]])
    assert out["ids"] == ids[0].tolist() and out["text"] == tok.decode(tok.encode(TEXT))
    with torch.no_grad(), result.model.ctx.use(fast, None, 1):
        adapted = result.model.lm(input_ids=ids).logits[0]
    with torch.no_grad():
        base = result.model.lm(input_ids=ids).logits[0]
    assert torch.allclose(torch.tensor(out["logits"]), adapted, atol=1e-4)
    assert (adapted - base).abs().max() > 1e-3  # the export carries a real adaptation


def test_adapt_job_exports_reproduce_its_query_loss_without_metaprep(prepared, tmp_path) -> None:
    """``jobs.adapt --export-peft --export-merged`` without --controller (found next to --base): both folders,
    loaded by transformers/peft alone, give the query loss the job reports."""
    from jobs.adapt import main
    from metaprep.tasks.jsonl import load_jsonl_tasks
    from metaprep.train.adapt_task import draw_episode, pick_task

    result = prepared("lora")
    tasks = _tasks_file(tmp_path / "t.jsonl")
    peft, merged = tmp_path / "out" / "peft", tmp_path / "out" / "merged"
    assert main(["--base", str(result.export_dir / "base"), "--tasks", tasks, "--shots", "4", "--steps", "3",
                 "--export-peft", str(peft), "--export-merged", str(merged), "--no-mlflow",
                 "--summary-out", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["controller"] == str(result.export_dir / "controller")
    assert json.loads((peft / "adapter_config.json").read_text())["base_model_name_or_path"] == str(peft / "base")
    episode = draw_episode(pick_task(load_jsonl_tasks(tasks), None, tasks), 4, 32, 0)
    query = make_batch([episode], "query", result.loaded.tokenizer, SEQ_LEN)
    (tmp_path / "q.json").write_text(json.dumps({k: getattr(query, k)[0].tolist()
                                                 for k in ("input_ids", "attention_mask", "labels")}))
    out = _without_metaprep(QUERY_LOSS.format(batch=str(tmp_path / "q.json"), peft=str(peft), merged=str(merged)),
                            tmp_path)
    for kind in ("peft", "merged"):
        assert out[kind] == pytest.approx(summary["query_loss_after"], abs=1e-4), kind
    assert summary["query_loss_after"] < summary["query_loss_before"]


# --------------------------------------------------------------------------- refused before any work

@pytest.mark.parametrize("algorithm, kind, flag, expected", [
    ("mltd", "tarp_bilinear", "--export-merged", "algorithm mltd adds TAMS cells"),
    ("fomaml", "tarp_dynamic", "--export-merged", "reparam.kind tarp_dynamic depends on the input"),
    ("mltd_tarp", "tarp_bilinear", "--export-peft", "needs reparam.kind lora (algorithms finetune"),
    ("mltd", "tarp_kronecker", "--export-peft", "the model uses tarp_kronecker (algorithm mltd); use --register"),
])
def test_an_export_the_model_cannot_give_fails_before_its_weights_load(tmp_path, algorithm, kind, flag,
                                                                       expected) -> None:
    message = _refused([*_spec_only(tmp_path, algorithm, kind), flag, str(tmp_path / "out")], expected)
    assert message.startswith(flag)
    assert not (tmp_path / "out").exists()


def test_register_refuses_a_scorer_a_bad_name_and_no_mlflow_up_front(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    argv = _spec_only(tmp_path, "fomaml", "lora", family="convai2_mc")
    _refused([*argv[:-1], "--register", "ok"], "--register: the model is a multiple-choice scorer")
    nobase = ["--base", str(tmp_path / "nobase"), "--tasks", str(tmp_path / "t.jsonl")]
    for bad in ("a/b", "a:b", "it's", "", "x@champion", " lead"):
        _refused([*nobase, "--register", bad], f"--register {bad!r}: not a valid registered model name")
    _refused([*nobase, "--register", "ok", "--no-mlflow"], "--register: the model is logged into the adapt run")


def test_controller_defaults_to_the_one_prepared_with_the_base_else_names_the_flag(tmp_path) -> None:
    (tmp_path / "alone").mkdir()
    _refused(["--base", str(tmp_path / "alone"), "--tasks", _tasks_file(tmp_path / "t.jsonl"), "--no-mlflow"],
             "--controller: not given, and there is no controller/ folder next to --base")
    _refused(["--base", "models:/some-model@champion", "--tasks", str(tmp_path / "t.jsonl"), "--no-mlflow"],
             "--controller: not given, and --base models:/some-model@champion is not models:/NAME-base@ALIAS")


# --------------------------------------------------------------------------- --register: a pyfunc model

@pytest.fixture(scope="module")
def registered(prepared, tmp_path_factory):
    """An mltd model (TARP + TAMS) registered as ``NAME-prep-base``/``-controller`` in a private sqlite store,
    then adapted by ``jobs.adapt --base models:/NAME-prep-base@candidate --register NAME`` (no --controller:
    the one registered by the same run is found)."""
    import mlflow

    from jobs.adapt import main
    from metaprep.registry.adapt_runs import ADAPT_EXPERIMENT
    from metaprep.registry.register import register_prepared

    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment(ADAPT_EXPERIMENT, artifact_location=str(tmp / "artifacts"))
    run_id = client.create_run(client.create_experiment("prepare", artifact_location=str(tmp / "prep"))).info.run_id
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        result = prepared("tarp_bilinear", "mltd")
        cfg = _recipe("tarp_bilinear", "mltd", "tiny")
        cfg.registry.name = f"{NAME}-prep"
        register_prepared(uri, run_id, result.export_dir, cfg, result.final, "test", "{}")
        tasks = _tasks_file(tmp / "t.jsonl")
        assert main(["--base", f"models:/{NAME}-prep-base@candidate", "--tasks", tasks, "--shots", "4",
                     "--steps", "3", "--register", NAME, "--summary-out", str(tmp / "s.json")]) == 0
        yield {"uri": uri, "tmp": tmp, "tasks": tasks, "result": result,
               "summary": json.loads((tmp / "s.json").read_text())}
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def test_registered_pyfunc_model_reproduces_the_adapted_model(registered) -> None:
    import mlflow
    import pandas as pd

    from metaprep.tasks.jsonl import load_jsonl_tasks
    from metaprep.train.adapt_task import draw_episode, pick_task

    summary, tasks = registered["summary"], registered["tasks"]
    assert summary["registered_model"] == f"models:/{NAME}/1"
    assert summary["controller"] == f"models:/{NAME}-prep-controller/1"
    mlflow.set_tracking_uri(registered["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    completions = model.predict(pd.DataFrame({"prompt": ["a b", "a b 3 ="]}), params={"max_new_tokens": 4})
    assert len(completions) == 2 and all(isinstance(c, str) for c in completions)
    adapted = model.unwrap_python_model()
    assert adapted.arch is not None  # the TAMS architecture the controller chose travels with the model
    episode = draw_episode(pick_task(load_jsonl_tasks(tasks), None, tasks), 4, 32, 0)
    query = make_batch([episode], "query", adapted.tokenizer, SEQ_LEN)
    with torch.no_grad():
        loss = adapted.model.task_losses(query, adapted.fast, adapted.arch).item()
    assert loss == pytest.approx(summary["query_loss_after"], abs=1e-5)
    files = [p.name for p in Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1")).rglob("*")]
    assert "python_model.pkl" not in files and not [f for f in files if f.endswith((".pkl", ".pt", ".bin"))]
    tags = mlflow.MlflowClient().get_model_version(NAME, "1").tags
    assert tags["algorithm"] == "mltd" and tags["mlflow_run_id"] == summary["mlflow_run_id"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.loads(resp.read())


def _wait_until_up(url: str, proc: subprocess.Popen, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "mlflow models serve exited"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(1.0)
    raise AssertionError(f"{url} did not answer within {timeout_s:.0f} s")


@pytest.mark.integration
def test_mlflow_models_serve_answers_with_completions(registered) -> None:
    import mlflow
    import pandas as pd

    port = _free_port()
    bin_dir = Path(sys.executable).parent  # the venv's bin, as an activated venv has it: MLflow execs uvicorn
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    log = (registered["tmp"] / "serve.log").open("w")
    proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m",
                             f"models:/{NAME}/1", "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], cwd=registered["tmp"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/ping", proc)
        body = {"dataframe_split": {"columns": ["prompt"], "data": [["a b"], ["a b 3 ="]]},
                "params": {"max_new_tokens": 4}}
        served = _post(f"http://127.0.0.1:{port}/invocations", body)["predictions"]
    finally:
        with contextlib.suppress(ProcessLookupError):  # the server and its uvicorn worker: this test's group
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    mlflow.set_tracking_uri(registered["uri"])
    local = mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict(
        pd.DataFrame({"prompt": ["a b", "a b 3 ="]}), params={"max_new_tokens": 4})
    assert served == local and all(isinstance(c, str) for c in served)
