"""jobs.recommend as a practitioner reads it (issue 20, item 2): scope, --finetune-only, --list-meta-features,
the predicted metric in its own units with a band, costs (or why none), the nearest training datasets.

Small meta-datasets written in tmp_path (NMTLC-format and generic JSONL), surrogates fitted for 50 steps, every
job run in-process through ``run_main`` (one-line errors, exit codes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jobs import recommend
from jobs._cli import run_main

# dataset -> (dataset_size, max_len, perplexity of its best-possible scratch run)
NMTLC_DATASETS = {"a-en": (1000, 30, 40.0), "b-en": (4000, 50, 20.0), "c-en": (16000, 80, 10.0),
                  "d-en": (64000, 120, 5.0)}
SCRATCH_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
FINETUNES = [(base, lr, r) for base in ("bloomz", "xglm") for lr in (1e-4, 1e-3) for r in (2, 16)]
FIT = ("--fit-steps", "50")


def _ppl(base_ppl: float, basemodel: str, lr: float, r: int) -> float:
    """Known structure: lr 3e-4 is best, finetuning beats scratch, rank 16 beats rank 2."""
    return base_ppl * (1 + (math.log10(lr) + 3.5) ** 2) * (1.0 if basemodel == "scratch" else 0.6) \
        * (0.9 if r == 16 else 1.0)


def _nmtlc(tmp: Path, finetune_datasets: tuple[str, ...] = tuple(NMTLC_DATASETS),
           scratch_datasets: tuple[str, ...] = tuple(NMTLC_DATASETS)) -> str:
    """An NMTLC-format JSONL file: every scratch configuration on ``scratch_datasets``, every finetune on
    ``finetune_datasets`` (basemodel "scratch" marks the from-scratch runs, as in the real NMTLC)."""
    lines = []
    for ds, (size, max_len, base_ppl) in NMTLC_DATASETS.items():
        configs = [("scratch", lr, 0) for lr in SCRATCH_LRS] * (ds in scratch_datasets) \
            + FINETUNES * (ds in finetune_datasets)
        for basemodel, lr, r in configs:
            ppl = _ppl(base_ppl, basemodel, lr, r)
            lines.append({"task": "scratch" if basemodel == "scratch" else "finetune", "dataset_name": ds,
                          "src": ds[0], "trg": "en", "basemodel": basemodel,
                          "hyperparams": {"dataset_size": size, "initial_lr": lr, "r": r},
                          "perplexity_curve": [ppl * 1.5, ppl * 1.1, ppl], "perplexity_optimal": ppl,
                          "max_len": max_len})
    path = tmp / "nmtlc.jsonl"
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    return str(path)


def _loss_with_cost(tmp: Path) -> str:
    """A generic JSONL meta-dataset scored by ``loss`` (lower is better) with run costs in seconds."""
    lines = []
    for d, m in enumerate((0.2, 0.4, 0.6, 0.8)):
        for lr in (1e-4, 1e-3, 1e-2):
            for opt in ("adam", "sgd"):
                lines.append({"dataset": f"ds{d}", "config": {"lr": lr, "opt": opt}, "meta": {"m": m},
                              "loss": 2.0 + (math.log10(lr) + 4 - 2.5 * m) ** 2 + (opt == "sgd"),
                              "cost": 10.0 * lr * 1e3})
    path = tmp / "runs.jsonl"
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    return str(path)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        run_main(recommend.main, list(argv))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def _summary(capsys, *argv: str) -> dict:
    code, out, err = _run(capsys, *argv, *FIT, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def _meta(ds: str) -> str:
    size, max_len, _ = NMTLC_DATASETS[ds]
    return json.dumps({"dataset_size": size, "max_len": max_len})


# ---------------------------------------------------------------------------------------------------- scope
def test_scope_returns_only_matching_configs(tmp_path, capsys):
    summary = _summary(capsys, "--train-meta", _nmtlc(tmp_path), "--meta-features", _meta("b-en"),
                       "--scope", "basemodel=bloomz", "--scope", "r=16", "--top-k", "10")
    assert summary["n_candidates"] == 2 and summary["n_candidates_before_scope"] == 4 + len(FINETUNES)
    assert summary["scope"] == {"basemodel": ["bloomz"], "r": ["16"]}
    assert len(summary["portfolio"]) == 2
    assert all(p["config"]["basemodel"] == "bloomz" and p["config"]["r"] == 16 for p in summary["portfolio"])
    both = _summary(capsys, "--train-meta", _nmtlc(tmp_path), "--meta-features", _meta("b-en"),
                    "--scope", "basemodel=BLOOMZ,xglm", "--top-k", "20")  # text matches case-insensitively
    assert {p["config"]["basemodel"] for p in both["portfolio"]} == {"bloomz", "xglm"}
    assert len(both["portfolio"]) == len(FINETUNES)


@pytest.mark.parametrize("args, message", [
    (["--scope", "lora=8"], "--scope lora=...: unknown configuration field 'lora'; fields: basemodel, initial_lr, r"),
    (["--scope", "basemodel=gpt2"], "--scope basemodel=gpt2: no candidate has basemodel 'gpt2'; its values: "
                                    "bloomz, scratch, xglm"),
    (["--scope", "r=3"], "--scope r=3: no candidate has r '3'; its values: 0, 2, 16"),
    (["--scope", "basemodel"], "--scope 'basemodel': expected KEY=VALUE[,VALUE...]"),
    (["--scope", "basemodel=bloomz,"], "--scope 'basemodel=bloomz,': expected KEY=VALUE[,VALUE...]"),
    (["--scope", "basemodel=scratch", "--scope", "r=16"],
     "--scope basemodel=scratch --scope r=16: no candidate configuration matches all of them"),
    (["--scope", "basemodel=scratch", "--finetune-only"],
     "--scope basemodel=scratch --finetune-only: no candidate configuration matches all of them"),
])
def test_bad_scope_is_one_line_error(tmp_path, capsys, args, message):
    code, out, err = _run(capsys, "--train-meta", _nmtlc(tmp_path), "--meta-features", _meta("b-en"), *FIT, *args)
    lines = err.strip().splitlines()
    assert code == 2 and not out
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


# ------------------------------------------------------------------------------------------- finetune-only
def test_finetune_only_drops_scratch(tmp_path, capsys):
    summary = _summary(capsys, "--train-meta", _nmtlc(tmp_path), "--meta-features", _meta("c-en"),
                       "--finetune-only", "--top-k", "20")
    assert summary["finetune_only"] is True and summary["n_candidates"] == len(FINETUNES)
    assert {p["config"]["basemodel"] for p in summary["portfolio"]} == {"bloomz", "xglm"}
    everything = _summary(capsys, "--train-meta", _nmtlc(tmp_path), "--meta-features", _meta("c-en"), "--top-k", "20")
    assert "scratch" in {p["config"]["basemodel"] for p in everything["portfolio"]}


def test_finetune_only_without_a_base_model_field_is_one_line_error(tmp_path, capsys):
    code, _, err = _run(capsys, "--train-meta", _loss_with_cost(tmp_path), "--meta-features", '{"m": 0.5}', *FIT,
                        "--finetune-only")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: --finetune-only: no configuration field names a base model (basemodel, "
                          "base_model, model)") and "fields: lr, opt" in err


def test_finetune_kinds_apart_from_scratch_are_noted_and_mapped_on_their_own_datasets(tmp_path, capsys):
    """Finetunes only ran on c-en/d-en, scratch only on a-en/b-en (as in the real NMTLC): the summary says the two
    were never compared, and a finetuning pick for an a-en-like dataset is mapped through c-en/d-en."""
    train = _nmtlc(tmp_path, finetune_datasets=("c-en", "d-en"), scratch_datasets=("a-en", "b-en"))
    mixed = _summary(capsys, "--train-meta", train, "--meta-features", _meta("a-en"))
    assert any("basemodel: bloomz, xglm | scratch never share a training dataset" in n for n in mixed["notes"])
    finetunes = _summary(capsys, "--train-meta", train, "--meta-features", _meta("a-en"), "--finetune-only")
    assert not any("never share" in n for n in finetunes["notes"])
    for pick in finetunes["portfolio"]:
        assert [n["dataset"] for n in pick["nearest_datasets"]] == ["c-en", "d-en"]  # nearest first


# ------------------------------------------------------------------------------------- --list-meta-features
def test_list_meta_features(tmp_path, capsys):
    train = _nmtlc(tmp_path)
    code, out, _ = _run(capsys, "--train-meta", train, "--list-meta-features", "--format", "json")
    assert code == 0
    listing = json.loads(out)
    assert listing["meta_features"] == {"dataset_size": {"min": 1000.0, "max": 64000.0},
                                        "max_len": {"min": 30.0, "max": 120.0}}
    assert listing["config_fields"]["basemodel"] == {"values": ["bloomz", "scratch", "xglm"]}
    assert listing["config_fields"]["r"] == {"values": [0.0, 2.0, 16.0]}
    assert listing["n_datasets"] == 4 and listing["base_field"] == "basemodel" and listing["has_cost"] is False
    assert listing["metric"]["name"] == "perplexity"

    code, text, _ = _run(capsys, "--train-meta", train, "--list-meta-features", "--format", "table")
    assert code == 0
    rows = {line.split()[0]: " ".join(line.split()[1:]) for line in text.splitlines() if line.startswith("  ")}
    assert rows["dataset_size"] == "1000 .. 64000" and rows["max_len"] == "30 .. 120"
    assert rows["basemodel"] == "bloomz, scratch, xglm (--finetune-only drops 'scratch')"
    assert rows["initial_lr"] == "0.0001, 0.0003, 0.001, 0.003" and rows["r"] == "0, 2, 16"
    assert "costs: none in this meta-dataset" in text
    assert """--meta-features '{"dataset_size": 1000, "max_len": 30}'""" in text

    # a saved surrogate lists the same, from its evidence.json
    _summary(capsys, "--train-meta", train, "--meta-features", _meta("a-en"), "--surrogate-dir", str(tmp_path / "s"))
    code, out, _ = _run(capsys, "--surrogate-dir", str(tmp_path / "s"), "--list-meta-features", "--format", "json")
    assert code == 0 and json.loads(out)["meta_features"] == listing["meta_features"]


# ------------------------------------------------------------------------------------------ units, band, cost
def test_predicted_metric_is_in_the_metrics_units(tmp_path, capsys):
    summary = _summary(capsys, "--train-meta", _nmtlc(tmp_path), "--meta-features", _meta("b-en"), "--top-k", "4")
    assert summary["metric"]["name"] == "perplexity" and summary["metric"]["higher_is_better"] is False
    for pick in summary["portfolio"]:
        lo = min(n["observed_range"]["best"] for n in pick["nearest_datasets"])
        hi = max(n["observed_range"]["worst"] for n in pick["nearest_datasets"])
        low, high = pick["predicted_metric_band"]
        assert lo - 1e-6 <= low <= pick["predicted_metric"] <= high <= hi + 1e-6
        assert pick["predicted_metric"] > 2.0  # perplexities, not a normalised score in [0, 1]
    assert {"predicted_metric", "predicted_metric_band", "predicted_normalised", "predicted_cost_s",
            "score"} <= set(summary["scales"])
    assert "lower is better" in summary["scales"]["predicted_metric"]
    assert "used only to order the picks" in summary["scales"]["score"]


def test_loss_metric_units_and_cost(tmp_path, capsys):
    train = _loss_with_cost(tmp_path)
    summary = _summary(capsys, "--train-meta", train, "--meta-features", '{"m": 0.5}', "--top-k", "3")
    assert summary["metric"]["name"] == "loss" and summary["metric"]["higher_is_better"] is False
    for pick in summary["portfolio"]:
        assert 2.0 - 1e-6 <= pick["predicted_metric"] <= 2.0 + 4 ** 2 + 1  # the losses written above
        assert 0.1 * 0.5 < pick["predicted_cost_s"] < 100.0 * 2  # seconds: observed costs are 1, 10 and 100
        assert all(n["observed_cost_s"] in (1.0, 10.0, 100.0) for n in pick["nearest_datasets"])
    assert "seconds" in summary["scales"]["predicted_cost_s"]
    code, table, _ = _run(capsys, "--train-meta", train, "--meta-features", '{"m": 0.5}', *FIT, "--format", "table")
    assert code == 0 and "cost: seconds for the whole run" in table and "no costs" not in table


def test_missing_costs_are_explained(tmp_path, capsys):
    train = _nmtlc(tmp_path)
    summary = _summary(capsys, "--train-meta", train, "--meta-features", _meta("b-en"))
    assert all(p["predicted_cost_s"] is None for p in summary["portfolio"])
    assert summary["scales"]["predicted_cost_s"] == "null: no costs in this meta-dataset (nmtlc.jsonl records no " \
                                                    "run times)"
    code, table, _ = _run(capsys, "--train-meta", train, "--meta-features", _meta("b-en"), *FIT, "--format", "table")
    assert code == 0 and "cost: no costs in this meta-dataset (nmtlc.jsonl records no run times)." in table


# ------------------------------------------------------------------------------------------ nearest datasets
def test_nearest_datasets_are_listed_with_observed_metric(tmp_path, capsys):
    summary = _summary(capsys, "--train-meta", _nmtlc(tmp_path), "--meta-features", _meta("c-en"), "--top-k", "3")
    assert set(summary["training_datasets"]) >= {"c-en"}
    assert summary["training_datasets"]["c-en"] == {"dataset_size": 16000.0, "max_len": 80.0}
    for pick in summary["portfolio"]:
        near = pick["nearest_datasets"]
        assert len(near) == 3 and near[0]["dataset"] == "c-en" and near[0]["distance"] == pytest.approx(0, abs=1e-6)
        assert [n["distance"] for n in near] == sorted(n["distance"] for n in near)
        c = pick["config"]
        assert near[0]["observed_metric"] == pytest.approx(_ppl(10.0, c["basemodel"], c["initial_lr"], c["r"]),
                                                           rel=1e-5)


# -------------------------------------------------------------------------------------------- output formats
def test_table_and_json_formats(tmp_path, capsys):
    train = _nmtlc(tmp_path)
    code, table, _ = _run(capsys, "--train-meta", train, "--meta-features", _meta("b-en"), *FIT, "--format", "table",
                          "--top-k", "2", "--summary-out", str(tmp_path / "summary.json"))
    assert code == 0 and not table.lstrip().startswith("{")
    assert "rank" in table and "perplexity" in table and "+-1 sd band" in table and "near b-en (distance 0.00)" in table
    assert "score: ranking score" in table
    assert json.loads((tmp_path / "summary.json").read_text())["top_k"] == 2  # the JSON still goes to the file
    code, out, _ = _run(capsys, "--train-meta", train, "--meta-features", _meta("b-en"), *FIT, "--top-k", "2")
    assert code == 0 and len(json.loads(out)["portfolio"]) == 2  # auto: stdout is not a terminal -> JSON


def test_saved_surrogate_keeps_the_units(tmp_path, capsys):
    train, saved = _nmtlc(tmp_path), str(tmp_path / "s")
    fitted = _summary(capsys, "--train-meta", train, "--meta-features", _meta("b-en"), "--surrogate-dir", saved)
    loaded = _summary(capsys, "--surrogate-dir", saved, "--meta-features", _meta("b-en"))
    assert [p["predicted_metric"] for p in loaded["portfolio"]] == \
        pytest.approx([p["predicted_metric"] for p in fitted["portfolio"]])
    (tmp_path / "s" / "evidence.json").unlink()  # a surrogate saved before evidence.json (and guard.json) existed
    (tmp_path / "s" / "guard.json").unlink(missing_ok=True)
    old = _summary(capsys, "--surrogate-dir", saved, "--meta-features", _meta("b-en"))
    assert "predicted_metric" not in old["portfolio"][0] and any("evidence.json" in n for n in old["notes"])
