"""Bad-input corpus, part 2 (issue 22, class 6 "Tracebacks"): ``jobs.recommend`` meta-features, candidates,
saved surrogates and Quick-Tune folders, ``--register`` names; ``jobs.compare`` result records; the
``config_transfer`` benchmark on a meta-dataset without curves and its MLflow metric names; tracking URIs in a
recipe and in ``MLFLOW_TRACKING_URI``.

Every case exits 2 with ONE line ``error: ...`` naming the file/line/key and what is valid, no traceback, and
leaves nothing behind: no MLflow run or registered model, no output file, no folder created.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from jobs._cli import run_main
from tests.test_bad_inputs import TINY, _file, _jsonl

QT_META = {"num_samples": 100, "num_classes": 2, "resolution": 32, "num_channels": 3}
META = json.dumps(QT_META)
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """A private SQLite tracking store and state folder (as in test_bad_inputs), run from ``tmp_path`` so
    a store's default artifact folder ./mlruns would show up there."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("METAPREP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------------------------------------ builders

def _quicktune(tmp: Path, name: str = "qt", **files: str | bytes) -> str:
    """A two-dataset Quick-Tune folder (table.csv, perf.json, cost.json, descriptors.json); ``files`` replace
    a file's content (``perf_json=...``)."""
    folder = tmp / name
    folder.mkdir(exist_ok=True)
    runs = {"A": {"1": [1, 2], "2": [3, 4]}, "B": {"1": [5, 6], "2": [1, 2]}}
    content: dict[str, str | bytes] = {
        "table.csv": "id,lr,cat:opt:adam,cat:opt:sgd\n1,0.1,1,0\n2,0.01,0,1\n",
        "perf.json": json.dumps({**runs, "info": {"metric": "top-1 %"}}),
        "cost.json": json.dumps(runs),
        "descriptors.json": json.dumps({"A": [100, 2, 32, 3], "B": [200, 3, 32, 3]}),
    }
    content.update({key.replace("_", "."): value for key, value in files.items()})
    for filename, text in content.items():
        (folder / filename).write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(folder)


def _saved_surrogate(tmp: Path) -> Path:
    """A tiny fitted surrogate folder (surrogate.json, perf/cost.safetensors, candidates.json): 2 steps."""
    from metaprep.transfer.metadataset import load_metadataset
    from metaprep.transfer.recommender import Recommender

    train = load_metadataset(_quicktune(tmp, "qt-train"))
    return Recommender.fit(train, steps=2, cost_steps=2, members=2, hidden=8).save(tmp / "surrogate")


def _surrogate(tmp: Path, filename: str, edit: Callable[[dict], object] | bytes) -> str:
    """A saved surrogate with ``filename`` replaced by bytes, or its JSON changed by ``edit``."""
    folder = _saved_surrogate(tmp)
    if isinstance(edit, bytes):
        (folder / filename).write_bytes(edit)
    else:
        spec = json.loads((folder / filename).read_text())
        edit(spec)
        (folder / filename).write_text(json.dumps(spec))
    return str(folder)


def _recommend(*args: str, meta: str = META) -> list[str]:
    return ["--meta-features", meta, "--fit-steps", "2", *args]


def _inputs(t: Path, *args: str, meta: str = META) -> list[str]:
    """Arguments checked before any surrogate is looked for (``--surrogate-dir`` names no folder)."""
    return _recommend("--surrogate-dir", str(t / "none"), *args, meta=meta)


def _result(tmp: Path, edit: Callable[[dict], object] = lambda r: None, name: str = "a.json") -> str:
    """A minimal LM-suite result file (2 methods x 2 seeds, 2 tasks, 2 adaptation steps), changed by ``edit``."""
    runs = [{"method": m, "fold": "f", "seed": s, "tasks": ["t1", "t2"], "curve": [[2.0, 3.0], [1.0 + s, 2.0]]}
            for m in ("mltd", "multitask") for s in (0, 1)]
    report = {"suite": "persona", "protocol": {"meta_steps": 10, "seeds": 2}, "runs": runs}
    edit(report)
    path = tmp / name
    path.write_text(json.dumps(report))  # json writes float('nan') as NaN, as jobs.benchmark would
    return str(path)


def _drop_all(key: str) -> Callable[[dict], None]:
    return lambda report: [run.pop(key) for run in report["runs"]]


def _set_first_mltd_loss(value: float) -> Callable[[dict], None]:
    return lambda report: report["runs"][0]["curve"][1].__setitem__(0, value)


def _without_curves(tmp: Path, name: str, datasets: range) -> str:
    """A generic JSONL meta-dataset of final scores only (no learning curves)."""
    return _jsonl(tmp / name, [{"dataset": f"d{d}", "config.lr": lr, "config.opt": opt, "meta.size": 100 * (d + 1),
                                "performance": (d + 1) * lr * 100 + (opt == "adam")}
                               for d in datasets for lr in (0.001, 0.01, 0.1) for opt in ("adam", "sgd")])


# (job, argv builder, substring expected in the one-line error)
CASES = [
    # jobs.recommend: --meta-features (inline or a file)
    ("recommend", lambda t: _inputs(t, meta=_file(t / "mf.json", b'{"a": \xff}')),
     "mf.json:1: undecodable bytes at column 7 (UTF-8 expected)"),
    ("recommend", lambda t: _inputs(t, meta=_file(t / "mf.json", b'{"a": ')),
     "mf.json:1: malformed JSON (Expecting value at column 7)"),
    ("recommend", lambda t: _inputs(t, meta='{"a": "x"}'),
     "--meta-features: 'a' is 'x'; meta-features must be finite numbers"),
    ("recommend", lambda t: _inputs(t, meta='{"a": [1]}'),
     "--meta-features: 'a' is [1]; meta-features must be finite numbers"),
    ("recommend", lambda t: _inputs(t, meta='{"a": null}'),
     "--meta-features: 'a' is None; meta-features must be finite numbers"),
    ("recommend", lambda t: _inputs(t, meta='{"a": 1' + "0" * 400 + "}"),
     "--meta-features: 'a' is 1000"),
    ("recommend", lambda t: _inputs(t, meta=DEEP), "--meta-features: JSON nested too deeply"),
    ("recommend", lambda t: _inputs(t, meta="[" + "1" * 5000 + "]"),
     "--meta-features: invalid JSON value (Exceeds the limit (4300 digits)"),
    ("recommend", lambda t: _inputs(t, meta=_file(t / "mf.json", DEEP.encode())),
     "mf.json: JSON nested too deeply"),
    # --candidates
    ("recommend", lambda t: _inputs(t, "--candidates",
                                       _jsonl(t / "c.jsonl", [{"lr": 0.1}, b'{"lr": "\xff"}'])),
     "c.jsonl:2: undecodable bytes"),
    ("recommend", lambda t: _inputs(t, "--candidates", _file(t / "c.json", b"\xff\xfe")),
     "c.json:1: undecodable bytes at column 1"),
    ("recommend", lambda t: _inputs(t, "--candidates", _file(t / "c.json", b'[{"lr": 1')),
     "c.json:1: malformed JSON (Expecting ',' delimiter at column 10)"),
    # a saved surrogate (--surrogate-dir): its JSON files and weights
    ("recommend", lambda t: _recommend("--surrogate-dir", _surrogate(t, "surrogate.json", b"\xff\xfe")),
     "surrogate.json:1: undecodable bytes at column 1"),
    ("recommend", lambda t: _recommend("--surrogate-dir", _surrogate(t, "surrogate.json", b'{"kind": ')),
     "surrogate.json:1: malformed JSON (Expecting value at column 10)"),
    ("recommend", lambda t: _recommend("--surrogate-dir", _surrogate(t, "surrogate.json", b"[1]")),
     "surrogate.json: must be a JSON object"),
    ("recommend", lambda t: _recommend("--surrogate-dir", _surrogate(t, "surrogate.json",
                                                                     lambda s: s.update(members="8"))),
     "surrogate.json: 'members' must be an integer in [1, 1024], got '8'"),
    ("recommend", lambda t: _recommend("--surrogate-dir", _surrogate(t, "surrogate.json", lambda s: s.update(
        encoder={"config": {"columns": [{"name": "lr", "kind": "num", "mean": "x"}]}, "meta": {"columns": []}}))),
     "surrogate.json: 'encoder' 'config': column 'lr': 'mean' must be a finite number"),
    ("recommend", lambda t: _recommend("--surrogate-dir",
                                       _surrogate(t, "surrogate.json", lambda s: s.update(hidden=4))),
     "perf.safetensors: weights do not match the spec next to it"),
    ("recommend", lambda t: _recommend("--surrogate-dir", _surrogate(t, "candidates.json", b'[{"lr": \xff}]')),
     "candidates.json:1: undecodable bytes at column 9"),
    ("recommend", lambda t: _recommend("--surrogate-dir", _surrogate(t, "candidates.json", b"[1, 2]")),
     "candidates.json: must be a JSON list of configuration objects"),
    # a Quick-Tune folder (--train-meta) with wrong types in its files
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t, perf_json="[1, 2]")),
     "perf.json: must be a JSON object {dataset: {config_id: [per-epoch values]}}, got list"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t, perf_json='{"A": [1, 2]}')),
     "perf.json: 'A' must be an object {config_id: [per-epoch values]}"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t, perf_json=b'{"A": \xff}')),
     "perf.json:1: undecodable bytes at column 7"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t, cost_json="[1]")),
     "cost.json: must be a JSON object {dataset: {config_id: [per-epoch seconds]}}, got list"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t, cost_json='{"A": [1]}')),
     "cost.json: 'A' must be an object {config_id: [per-epoch seconds]}"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t, cost_json='{"A": {"1": ["a", 2]}}')),
     "cost.json: A/1: costs must be a list of non-negative numbers of seconds, got ['a', 2]"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t, cost_json='{"A": {"1": 5}}')),
     "cost.json: A/1: costs must be a list of non-negative numbers of seconds, got 5"),
    ("recommend", lambda t: _recommend("--train-meta",
                                       _quicktune(t, descriptors_json='{"A": "abcd", "B": [1, 2, 3, 4]}')),
     "descriptors.json: dataset 'A' needs [num_samples, num_classes, resolution, num_channels] (numbers), got 'abcd'"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t, descriptors_json='{"A": ["a", 2, 3, 4], "B": 5}')),
     "descriptors.json: dataset 'A' needs [num_samples, num_classes, resolution, num_channels] (numbers)"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t, descriptors_json='{"A": [1, 2, 3, 4], "B": 5}')),
     "descriptors.json: dataset 'B' needs [num_samples, num_classes, resolution, num_channels] (numbers), got 5"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t, table_csv="id,cat:opt\n1,1\n")),
     "table.csv:1: column 'cat:opt': one-hot columns are named cat:NAME:VALUE"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t, table_csv=b"id,lr\n1,\xff\n")),
     "table.csv:2: undecodable bytes at column 3 (UTF-8 expected)"),
    ("recommend", lambda t: _recommend("--train-meta", f"mlflow:sqlite:///{t}/nodir/x.db"),
     "sqlite:///{t}/nodir/x.db: no MLflow database at {t}/nodir/x.db"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t), "--summary-out", f"{t}/qt/table.csv/s.json"),
     "s.json: cannot write --summary-out: {t}/qt/table.csv is a file, not a folder"),
    # --register NAME: refused before any fit, run or artifact
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t), "--register", "bad/name"),
     "--register 'bad/name': not a valid registered model name; use 1-250 letters, digits, '.', '_' or '-'"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t), "--register", ""),
     "--register '': not a valid registered model name"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t), "--register", "it's"),
     "--register \"it's\": not a valid registered model name"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t), "--register", ".."),
     "--register '..': not a valid registered model name"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t), "--register", "a:b"),
     "--register 'a:b': not a valid registered model name"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t), "--register", "name@alias"),
     "--register 'name@alias': not a valid registered model name"),
    # jobs.compare: result records without a field, NaN in a curve
    ("compare", lambda t: [_result(t, _drop_all("curve")) + ":mltd", _result(t, name="b.json") + ":multitask"],
     "a.json: runs[0] (method 'mltd'): missing field 'curve'"),
    ("compare", lambda t: [_result(t, _drop_all("tasks")) + ":mltd", _result(t, name="b.json") + ":multitask"],
     "a.json: runs[0] (method 'mltd'): missing field 'tasks'"),
    ("compare", lambda t: [_result(t, lambda r: r["runs"][1].pop("method")) + ":mltd",
                           _result(t, name="b.json") + ":multitask"], "a.json: runs[1]: missing field 'method'"),
    ("compare", lambda t: [_result(t, _set_first_mltd_loss(float("nan"))) + ":mltd",
                           _result(t, name="b.json") + ":multitask"],
     "a.json: runs[0] (method 'mltd'): curve[1][0] is nan; query losses must be finite numbers"),
    ("compare", lambda t: [_result(t, name="b.json") + ":mltd",
                           _result(t, _set_first_mltd_loss(float("inf"))) + ":mltd"],
     "a.json: runs[0] (method 'mltd'): curve[1][0] is inf"),
    ("compare", lambda t: [_result(t, lambda r: r["runs"][0]["curve"].append([1.0])) + ":mltd",
                           _result(t, name="b.json") + ":multitask"],
     "a.json: runs[0] (method 'mltd'): curve[2] must be a list of 2 query losses (one per task)"),
    ("compare", lambda t: [_result(t, lambda r: r["protocol"].pop("meta_steps")) + ":mltd",
                           _result(t, name="b.json") + ":multitask"],
     "a.json: 'protocol' must be an object with an integer 'meta_steps'"),
    ("compare", lambda t: [_result(t, lambda r: r.update(runs=5)) + ":mltd", _result(t, name="b.json") + ":multitask"],
     "a.json: 'runs' must be a non-empty list of run records"),
    ("compare", lambda t: [_file(t / "a.json", b'{"runs": "\xff"}') + ":mltd",
                           _result(t, name="b.json") + ":multitask"],
     "a.json:1: undecodable bytes at column 11"),
    # recipes: tracking URI, experiment, tiny model shape, seed
    ("meta_train", lambda t: ["--config", TINY, "--set", "tracking.uri=ftp://host/x"],
     "--set tracking.uri=ftp://host/x: tracking.uri: unknown scheme 'ftp:' in 'ftp://host/x'; a tracking URI is "
     "http://HOST:PORT, https://HOST[:PORT] or sqlite:///PATH.db"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "tracking.uri=./mlruns"],
     "tracking.uri: './mlruns' has no scheme"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "tracking.uri=http://"],
     "tracking.uri: 'http://' has no host"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "tracking.uri=sqlite://"],
     "tracking.uri: 'sqlite://' names no database file; use sqlite:///relative/path.db"),
    ("meta_train", lambda t: ["--config", TINY, "--set", f"tracking.uri=sqlite:///{t}/nodir/sub/m.db"],
     "tracking.uri: folder {t}/nodir/sub of 'sqlite:///{t}/nodir/sub/m.db' does not exist; create it first"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "tracking.uri=sqlite:////proc/m.db"],
     "tracking.uri: cannot write the database of 'sqlite:////proc/m.db' in /proc"),
    ("meta_train", lambda t: ["--config", TINY, "--set", f"tracking.uri=sqlite:///{t}"], "is not a database file"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "tracking.experiment="],
     "tracking.experiment: must be a non-empty MLflow experiment name, got ''"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "tracking.experiment=' '"],
     "tracking.experiment: must be a non-empty MLflow experiment name, got ' '"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "model.tiny.heads=0"],
     "model.tiny.heads: must be >= 1, got 0"),
    ("meta_train", lambda t: ["--config", TINY, "--set", "model.tiny.heads=3"],
     "model.tiny.heads: must divide model.tiny.dim (64), got 3"),
    ("meta_train", lambda t: ["--config", TINY, "--set", f"seed={2**64 + 1}"],
     f"seed: must be an integer in [0, 2**63 - 1], got {2**64 + 1}"),
]


def _expect_one_line(env: Path, capsys, job: str, argv: list[str], expected: str) -> str:
    """Run ``job`` with ``argv`` through run_main: exit 2, one ``error:`` line containing ``expected``."""
    main = importlib.import_module(f"jobs.{job}").main
    with pytest.raises(SystemExit) as code:
        run_main(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2, err[-3:]
    assert not any("Traceback" in line for line in err), "\n".join(err)
    assert [line for line in err if line.startswith("error: ")] == err[-1:], err[-3:]
    assert expected.replace("{t}", str(env)) in err[-1], err[-1]
    return err[-1]


def _assert_nothing_written(env: Path) -> None:
    """No MLflow run, registered model or artifact folder; no output file; no folder made for a store."""
    db = env / "mlflow.db"
    if db.exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        assert client.search_registered_models() == []
        ids = [e.experiment_id for e in client.search_experiments()]
        assert not ids or client.search_runs(ids) == []
    assert not (env / "mlruns").exists()
    assert not (env / "state" / "ray_results").exists()
    assert not list(env.glob("out.*")) and not (env / "summary.json").exists()
    assert not (env / "nodir").exists()


@pytest.mark.parametrize("job, argv, expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_and_writes_nothing(env, capsys, job, argv, expected) -> None:
    _expect_one_line(env, capsys, job, argv(env), expected)
    _assert_nothing_written(env)


# (job, argv builder, MLFLOW_TRACKING_URI, substring expected in the one-line error): the store named by the
# environment is checked before any fit, run or training, in seconds, and no folder is created for it
ENV_CASES = [
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t), "--register", "good-name"),
     "sqlite:///{t}/nodir/m.db", "MLFLOW_TRACKING_URI: folder {t}/nodir of 'sqlite:///{t}/nodir/m.db' does not exist"),
    ("recommend", lambda t: _recommend("--train-meta", _quicktune(t), "--register", "good-name"),
     "ftp://host/x", "MLFLOW_TRACKING_URI: unknown scheme 'ftp:' in 'ftp://host/x'"),
    ("meta_train", lambda t: ["--config", TINY], "sqlite:///{t}/nodir/sub/m.db",
     "MLFLOW_TRACKING_URI: folder {t}/nodir/sub of 'sqlite:///{t}/nodir/sub/m.db' does not exist"),
    ("meta_train", lambda t: ["--config", TINY], "sqlite:////proc/m.db",
     "MLFLOW_TRACKING_URI: cannot write the database of 'sqlite:////proc/m.db' in /proc"),
    ("meta_train", lambda t: ["--config", TINY], "ftp://host/x", "MLFLOW_TRACKING_URI: unknown scheme 'ftp:'"),
    ("benchmark", lambda t: ["--suite", "config_transfer", "--train-meta", _without_curves(t, "m.jsonl", range(3)),
                             "--quick", "--seeds", "1", "--out", str(t / "out.json")],
     "sqlite:///{t}/nodir/m.db", "MLFLOW_TRACKING_URI: folder {t}/nodir of"),
]


@pytest.mark.parametrize("job, argv, uri, expected", ENV_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(ENV_CASES)])
def test_bad_tracking_store_in_environment_fails_fast(env, capsys, monkeypatch, job, argv, uri, expected) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.replace("{t}", str(env)))
    start = time.monotonic()
    _expect_one_line(env, capsys, job, argv(env), expected)
    assert time.monotonic() - start < 30  # MLflow itself retries an unwritable sqlite store for ~110 s
    _assert_nothing_written(env)


def test_config_transfer_without_curves_logs_test_meta_metrics(env, capsys) -> None:
    """A generic meta-dataset of final scores only (no curves) benchmarks, and with --test-meta its
    ``train->test`` setting reaches MLflow as a valid metric name."""
    from mlflow.tracking import MlflowClient

    from jobs.benchmark import main

    train, test = _without_curves(env, "train.jsonl", range(3)), _without_curves(env, "test.jsonl", range(3, 5))
    with pytest.raises(SystemExit) as code:
        run_main(main, ["--suite", "config_transfer", "--train-meta", train, "--test-meta", test, "--quick",
                        "--seeds", "1", "--out", str(env / "res.json")])
    assert code.value.code == 0, capsys.readouterr().err[-2000:]
    report = json.loads((env / "res.json").read_text())
    assert report["datasets"] == ["d3", "d4"] and {r["n"] for r in report["results"]} == {2}
    client = MlflowClient(tracking_uri=f"sqlite:///{env / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("metaprep-benchmarks").experiment_id])
    assert "quicktune_gp/normalized_regret_at_1/meta_datasettrain.jsonl_to_test.jsonl_protocoltrain_to_test" \
        in run.data.metrics


@pytest.mark.parametrize("name, expected", [
    ("a.jsonl->b.jsonl", "a.jsonl_to_b.jsonl"), ("normalized_regret@5", "normalized_regret_at_5"),
    ("x,y=1 (é)", "x_y_1 ___"), ("/a//./b/../c/", "a/_/b/__/c"), ("", "_"), ("..", "__"), ("a/" + "b" * 300, None),
])
def test_metric_names_are_what_mlflow_accepts(name: str, expected: str | None) -> None:
    from mlflow.utils.validation import _validate_metric_name

    from metaprep.registry.tracking import METRIC_NAME_MAX, metric_name

    out = metric_name(name)
    _validate_metric_name(out)  # raises MlflowException for a name MLflow refuses
    assert out == expected if expected is not None else len(out) <= METRIC_NAME_MAX


def test_compare_accepts_a_valid_minimal_result(tmp_path, capsys) -> None:
    """The record checks refuse only what :func:`compare` cannot read: the minimal file of the cases compares."""
    from jobs.compare import main

    with pytest.raises(SystemExit) as code:
        run_main(main, [_result(tmp_path) + ":mltd", _result(tmp_path, name="b.json") + ":multitask"])
    assert code.value.code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["n"] == 4
