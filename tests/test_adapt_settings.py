"""Adaptation settings learned from a prepared model's own runs (issue 20, item 3): the cross-validated rule,
the saved model, ``jobs.learn_settings`` and ``jobs.adapt --settings recommended`` on a folder base, and the
registry path (a registered base -> ``NAME-base-settings`` tagged with its version -> found by ``jobs.adapt``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from metaprep.errors import DataError, ModelLoadError
from metaprep.registry.adapt_runs import AdaptRun
from metaprep.transfer.adapt_settings import AdaptSettings, cross_validate, setting_key, settings_grid

ROOT = Path(__file__).resolve().parents[1]
FIT = {"steps": 300, "members": 4}
GRID = settings_grid([0.001, 0.01, 0.1], ("adam", "sgd"), (2, 5))


def _runs(best_depends_on_meta: bool, tasks: int = 12, seed: int = 0) -> list[AdaptRun]:
    """Runs of GRID on ``tasks`` tasks x 2 shots. The best lr follows the task's support loss when
    ``best_depends_on_meta`` (low loss: 0.001, high: 0.1), else it is 0.01 for every task; adam beats sgd and
    5 steps beat 2 everywhere."""
    rng = random.Random(seed)
    runs = []
    for t in range(tasks):
        zero, noise = rng.uniform(1.0, 5.0), rng.uniform(0, 1)
        best_lr = (0.001 if zero < 2.3 else 0.01 if zero < 3.7 else 0.1) if best_depends_on_meta else 0.01
        for shots in (4, 8):
            for s in GRID:
                gap = abs(round(s["lr"] / best_lr) != 1) * 0.5 + (s["optimizer"] == "sgd") * 0.2 + \
                    (s["steps"] == 2) * 0.1 + rng.uniform(0, 0.01)
                loss = zero - 0.5 + gap
                runs.append(AdaptRun(task=f"t{t}@{shots}:m:b", config=dict(s),
                                     meta_features={"support_loss": zero, "shots": float(shots),
                                                    "noise": noise},
                                     curve=[zero, loss], final_loss=loss, cost_s=0.01,
                                     extra_params={"task_name": f"t{t}", "shots": shots}))
    return runs


def test_cross_validation_trusts_the_surrogate_where_the_best_setting_follows_the_meta_features() -> None:
    runs = _runs(best_depends_on_meta=True)
    settings = AdaptSettings.learn(runs, GRID, "m", fit_kwargs=FIT)
    assert settings.cv["n"] == 24 and settings.cv["folds"] == 3
    assert settings.cv["fixed"] > 0.2  # one lr cannot be right for every task
    assert settings.rule == "surrogate" and settings.cv["surrogate"] < settings.cv["fixed"]
    low, _ = settings.choose({"support_loss": 1.2, "shots": 4.0, "noise": 0.5})
    high, why = settings.choose({"support_loss": 4.8, "shots": 4.0, "noise": 0.5})
    assert (low["lr"], high["lr"]) == (0.001, 0.1) and low["optimizer"] == "adam"
    assert "surrogate chosen by cross-validation" in why


def test_where_one_setting_is_best_everywhere_the_fixed_setting_is_kept() -> None:
    """Every task's best lr is 0.01 with adam (5 steps beat 2): the best fixed setting's held-out regret is the
    noise (< 0.01), and a surrogate can at best tie it, which keeps the fixed setting."""
    runs = _runs(best_depends_on_meta=False)
    settings = AdaptSettings.learn(runs, GRID, "m", fit_kwargs=FIT)
    assert setting_key(settings.fixed)[:2] == (0.01, "adam") and settings.fixed["steps"] == 5
    assert settings.cv["fixed"] < 0.01 and settings.cv["surrogate"] >= settings.cv["fixed"]
    assert settings.rule == "fixed"
    chosen, why = settings.choose({"support_loss": 3.0, "shots": 8.0, "noise": 0.1})
    assert chosen == settings.fixed and "fixed setting chosen by cross-validation" in why


def test_cross_validation_holds_out_whole_tasks() -> None:
    """Each held-out (task, shots) is scored once; a task's two support sizes are never split across folds."""
    runs = _runs(best_depends_on_meta=True, tasks=5)
    cv = cross_validate(runs, GRID, folds=3, fit_kwargs={"steps": 50, "members": 2})
    assert (cv["n"], cv["folds"]) == (10, 3)
    assert cross_validate(runs, GRID, folds=9, fit_kwargs={"steps": 50, "members": 2})["folds"] == 5


def test_settings_model_saves_as_json_and_safetensors_and_loads_back(tmp_path) -> None:
    settings = AdaptSettings.learn(_runs(True, tasks=6), GRID, "m/1", fit_kwargs=FIT)
    folder = settings.save(tmp_path / "settings")
    assert not list(folder.glob("*.pkl")) and (folder / "settings.json").is_file()
    again = AdaptSettings.load(folder)
    meta = {"support_loss": 4.0, "shots": 4.0, "noise": 0.2}
    assert again.choose(meta) == settings.choose(meta) and again.rule == settings.rule
    assert (again.prepared_model, again.runs, again.grid) == ("m/1", len(_runs(True, tasks=6)), GRID)
    with pytest.raises(DataError, match="meta-features"):
        again.choose({"support_loss": 4.0})
    spec = json.loads((folder / "settings.json").read_text())
    (folder / "settings.json").write_text(json.dumps({**spec, "rule": "guess"}))
    with pytest.raises(ModelLoadError, match="valid rules"):
        AdaptSettings.load(folder)
    with pytest.raises(ModelLoadError, match="jobs.learn_settings"):
        AdaptSettings.load(tmp_path)
    for bad, message in (({**spec, "grid": [{"lr": "x"}]}, "grid must be"), ({**spec, "runs": "many"}, "runs must"),
                         ({**spec, "cv": {}}, "cv must"), ({k: v for k, v in spec.items() if k != "fixed"},
                                                           "missing keys ['fixed']")):
        (folder / "settings.json").write_text(json.dumps(bad))
        with pytest.raises(ModelLoadError, match=message.replace("[", r"\[")):
            AdaptSettings.load(folder)


def test_saving_replaces_a_settings_model_whole(tmp_path, monkeypatch) -> None:
    """A save that fails half-way leaves the previous model as it was, and no staging folder behind."""
    from metaprep.transfer.recommender import Recommender

    first = AdaptSettings.learn(_runs(True, tasks=4), GRID, "first", fit_kwargs={"steps": 50, "members": 2})
    folder = first.save(tmp_path / "settings")
    second = AdaptSettings.learn(_runs(False, tasks=4), GRID, "second", fit_kwargs={"steps": 50, "members": 2})

    def broken(self, dirpath):
        Path(dirpath).mkdir(parents=True, exist_ok=True)  # where a non-atomic save would write in place
        (Path(dirpath) / "surrogate.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(Recommender, "save", broken)
    with pytest.raises(OSError):
        second.save(folder)
    monkeypatch.undo()
    assert AdaptSettings.load(folder).prepared_model == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings"]
    second.save(folder)
    assert AdaptSettings.load(folder).prepared_model == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings"]


# --------------------------------------------------------------------------- the jobs, end to end

@pytest.fixture(scope="module")
def prepared_folder(tmp_path_factory) -> Path:
    """The tiny recipe meta-trained 2 steps and exported: ``X/base`` and ``X/controller``."""
    from metaprep.config import MetaTrainConfig, load_config
    from metaprep.train.local import meta_train_local

    cfg = load_config(MetaTrainConfig, ROOT / "jobs/configs/tiny.yaml", ["meta.meta_steps=2", "meta.eval_every=2"])
    result = meta_train_local(cfg, export=True)
    return result.export_dir


def _tasks(path: Path, names=("t0", "t1", "t2", "t3"), n: int = 12) -> str:
    lines = [json.dumps({"task": name, "prompt": f"{name} {i} =", "target": f" x{i % (3 + k)}"})
             for k, name in enumerate(names) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


LEARN = ["--max-tasks", "4", "--shots", "2,3", "--steps", "1,2", "--lrs", "0.003,0.03", "--query-size", "4"]


def _job(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    import importlib

    from jobs._cli import run_main

    with pytest.raises(SystemExit) as exit_:
        run_main(importlib.import_module(module).main, argv)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_learn_settings_then_adapt_with_recommended_settings_on_a_folder_base(prepared_folder, tmp_path,
                                                                               capsys) -> None:
    base = str(prepared_folder / "base")
    code, out, err = _job("jobs.learn_settings", ["--base", base, "--tasks", _tasks(tmp_path / "train.jsonl"),
                                                  "--no-mlflow", "--summary-out", str(tmp_path / "s.json"), *LEARN],
                          capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["runs"] == 4 * 2 * 8 and summary["rule"] in ("surrogate", "fixed")
    assert Path(summary["settings_dir"]) == prepared_folder / "settings"
    assert "[learn_settings] plan: 4 tasks x 2 support sizes x 8 settings = 64 adapt runs" in out
    assert "ETA" in out and "rule:" in out

    new_task = _tasks(tmp_path / "new.jsonl", names=("new",))
    code, out, err = _job("jobs.adapt", ["--base", base, "--tasks", new_task, "--shots", "2", "--settings",
                                         "recommended", "--no-mlflow"], capsys)
    assert code == 0, err
    result = json.loads(out[out.index("{\n"):])
    chosen = result["settings"]["setting"]
    assert chosen in summary["grid"]
    assert (result["lr"], result["steps"], result["optimizer"]) == (chosen["lr"], int(chosen["steps"]),
                                                                    chosen["optimizer"])
    assert f"step {int(chosen['steps'])}/{int(chosen['steps'])} query loss" in out
    assert f"settings from {prepared_folder / 'settings'}" in out and "cross-validation" in out

    code, _, err = _job("jobs.adapt", ["--base", base, "--tasks", new_task, "--settings", "recommended",
                                       "--lr", "0.1", "--no-mlflow"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--settings recommended chooses --lr and --steps" in err
    # learning again into the same folder: refused before any work without --overwrite
    code, _, err = _job("jobs.learn_settings", ["--base", base, "--tasks", str(tmp_path / "train.jsonl"),
                                                "--no-mlflow", *LEARN], capsys)
    assert code == 2 and "pass --overwrite" in err and err.count("\n") == 1


def test_adapt_recommended_without_a_settings_model_names_the_job_to_run(prepared_folder, tmp_path,
                                                                         capsys) -> None:
    import shutil

    copy = tmp_path / "prepared"
    for part in ("base", "controller"):
        shutil.copytree(prepared_folder / part, copy / part)
    code, _, err = _job("jobs.adapt", ["--base", str(copy / "base"), "--tasks", _tasks(tmp_path / "new.jsonl"),
                                       "--task", "t0", "--settings", "recommended", "--no-mlflow"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "no settings model next to --base" in err and "jobs.learn_settings" in err


def test_registered_base_gets_a_settings_model_tagged_with_its_version(prepared_folder, tmp_path, monkeypatch,
                                                                       capsys) -> None:
    """Runs logged to MLflow and learned back from it; ``NAME-base-settings`` registered with the base's version;
    ``jobs.adapt --base models:/NAME-base@candidate --settings recommended`` finds it; another base version has
    none and is told so."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # a sqlite store puts artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("prepare")).info.run_id
    for kind in ("base", "controller"):
        client.create_registered_model(f"toy-{kind}")
        for _ in range(2):  # versions 1 and 2 of each
            mv = client.create_model_version(f"toy-{kind}", source=str(prepared_folder / kind), run_id=run_id)
        client.set_registered_model_alias(f"toy-{kind}", "candidate", "1")
    code, out, err = _job("jobs.learn_settings", ["--base", "models:/toy-base@candidate", "--controller",
                                                  "models:/toy-controller/1", "--tasks",
                                                  _tasks(tmp_path / "train.jsonl"), "--summary-out",
                                                  str(tmp_path / "s.json"), *LEARN], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["prepared_model"] == "toy-base/1" and summary["logged_runs"] == 64
    assert summary["registered_model"] == "models:/toy-base-settings/1"
    # a second job on the same base version: its own batch, read back alone, registered as version 2
    code, out, err = _job("jobs.learn_settings", ["--base", "models:/toy-base/1", "--controller",
                                                  "models:/toy-controller/1", "--tasks", str(tmp_path / "train.jsonl"),
                                                  "--summary-out", str(tmp_path / "s2.json"), *LEARN], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "s2.json").read_text())
    assert again["logged_runs"] == 64 and again["batch"] != summary["batch"]
    assert again["registered_model"] == "models:/toy-base-settings/2"
    mv = client.get_model_version("toy-base-settings", "1")
    assert (mv.tags["base_model"], mv.tags["base_version"], mv.tags["rule"]) == ("toy-base", "1", summary["rule"])

    new_task = _tasks(tmp_path / "new.jsonl", names=("new",))
    code, out, err = _job("jobs.adapt", ["--base", "models:/toy-base@candidate", "--controller",
                                         "models:/toy-controller/1", "--tasks", new_task, "--shots", "2",
                                         "--settings", "recommended"], capsys)
    assert code == 0, err
    result = json.loads(out[out.index("{\n"):])
    assert result["settings"]["source"] == "models:/toy-base-settings/2" and result["mlflow_run_id"]
    assert result["settings"]["setting"] in summary["grid"]
    logged = client.get_run(result["mlflow_run_id"]).data.params
    assert logged["config.optimizer"] == result["optimizer"]
    assert float(logged["meta_feature.support_loss"]) == pytest.approx(
        result["settings"]["meta_features"]["support_loss"], rel=1e-5)
    assert float(logged["config.lr"]) == result["lr"]

    code, _, err = _job("jobs.adapt", ["--base", "models:/toy-base/2", "--controller", "models:/toy-controller/2",
                                       "--tasks", new_task, "--settings", "recommended"], capsys)
    assert code == 2 and "no toy-base-settings version is tagged with toy-base version 2" in err


def test_a_diverged_setting_counts_as_the_episodes_worst_loss_plus_one_nat() -> None:
    from metaprep.transfer.adapt_settings import DIVERGED_MARGIN, adapt_grid

    grid = settings_grid([0.01, 1.0], ("sgd",), (1, 2))

    def curve(lr: float, optimizer: str, steps: int) -> list[list[float]]:  # 2 episodes; lr 1.0 blows up
        return [[3.0, 4.0], [2.5, 3.5], [2.0, 3.0]] if lr < 0.1 else [[3.0, 4.0], [9.0, float("inf")],
                                                                       [float("nan"), float("nan")]]
    losses, support, info = adapt_grid(curve, [3.1, 4.2], grid)
    assert support == [3.1, 4.2]
    assert losses[0][(0.01, "sgd", 2)] == 2.0 and losses[0][(1.0, "sgd", 1)] == 9.0
    assert losses[0][(1.0, "sgd", 2)] == 9.0 + DIVERGED_MARGIN  # episode 0's worst finite value is 9.0
    assert losses[1][(1.0, "sgd", 1)] == losses[1][(1.0, "sgd", 2)] == 4.0 + DIVERGED_MARGIN
    assert info["curves"][(1.0, "sgd")][1] == [4.0, 5.0, 5.0]
    with pytest.raises(DataError, match="not finite under any setting"):
        adapt_grid(lambda lr, o, s: [[float("nan")]] * (s + 1), [1.0], grid)
