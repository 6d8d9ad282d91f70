"""Champion promotion in plain words: the rule, strict-JSON comparison tags, and ``jobs.promote`` (list, compare,
move) against a real MLflow registry in a SQLite file. One test scores real tiny prepared models (--config)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from metaprep.registry.promotion import RULE, apply_comparison, comparison, decide, tag_json, verdict
from tests.test_sweep_recipe import QUICK

KEY = "meta_val_loss.valset-0123456789ab"


def strict_json(text: str):
    """``json.loads`` that refuses NaN / Infinity (Python's json accepts them; every other parser does not)."""
    def refuse(const: str):
        raise ValueError(f"{const} in JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def registry(tmp_path):
    """A real MLflow tracking + registry store in SQLite, artifacts under tmp_path."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("promote", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, exp


def _version(registry, tmp_path, name: str, score: float | None = None, key: str = KEY) -> str:
    """One prepared model: NAME-base and NAME-controller versions of one run, with alias candidate."""
    from mlflow.exceptions import MlflowException

    _, client, exp = registry
    run_id = client.create_run(exp).info.run_id
    version = None
    for kind in ("base", "controller"):
        try:
            client.create_registered_model(f"{name}-{kind}")
        except MlflowException:
            pass
        folder = tmp_path / run_id / kind
        folder.mkdir(parents=True)
        tags = {f"score.{key}": f"{score:.6g}"} if score is not None else {}
        mv = client.create_model_version(f"{name}-{kind}", source=str(folder), run_id=run_id, tags=tags)
        client.set_registered_model_alias(f"{name}-{kind}", "candidate", mv.version)
        version = mv.version
    return str(version)


def _promote(capsys, *argv: str):
    """Run jobs.promote as the CLI does: (exit code, stdout, stderr)."""
    from jobs._cli import run_main
    from jobs.promote import main

    with pytest.raises(SystemExit) as info:
        run_main(main, list(argv))
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


# --------------------------------------------------------------------------- the rule (fast)

@pytest.mark.parametrize("candidate,champion_version,champion,wins", [
    (2.31, None, None, True),  # the first version becomes champion
    (2.31, "2", 2.40, True),
    (2.40, "2", 2.40, False),  # a tie keeps the champion
    (2.45, "2", 2.40, False),
    (2.45, "2", math.nan, True),  # a champion whose score is not finite is replaced
    (math.nan, None, None, False),  # a candidate without a finite score never wins
    (math.inf, "2", 2.40, False),
])
def test_champion_rule(candidate, champion_version, champion, wins):
    assert decide(candidate, champion_version, champion)[0] is wins


def test_verdict_says_what_moved_and_why():
    assert verdict(comparison(KEY, "3", 2.31, "2", 2.40)) == \
        "promoted v3 to champion: meta-val 2.31 < champion v2 2.4 on the same episodes"
    assert verdict(comparison(KEY, "3", 2.45, "2", 2.40)) == \
        "kept champion v2: meta-val 2.45 >= champion v2 2.4 on the same episodes"
    assert verdict(comparison(KEY, "1", 2.31, None, None)).startswith("first version: v1 is champion")
    kept = comparison(KEY, "3", 2.31, "2", None, error="OSError: gone")
    assert not kept["promoted"] and verdict(kept) == "kept champion v2: champion v2 could not be evaluated " \
                                                     "(OSError: gone)"
    assert verdict(comparison(KEY, "3", 2.31, "2", 2.40), applied=False).startswith("v3 wins and would take")


@pytest.mark.parametrize("candidate,champion_version,champion,error", [
    (2.31, "2", math.nan, None),  # the champion's evaluation diverged
    (math.inf, "2", 2.4, None),
    (2.31, None, None, None),  # no champion yet
    (2.31, "2", None, "RuntimeError: bad weights"),
])
def test_comparison_tag_is_strict_json(registry, tmp_path, candidate, champion_version, champion, error):
    """Issue 19: champion_comparison held NaN (invalid JSON); now null, and why_null says why."""
    uri, client, _ = registry
    version = _version(registry, tmp_path, "strict")
    record = comparison(KEY, version, candidate, champion_version, champion, error=error)
    apply_comparison(client, "strict", {"base": version, "controller": version}, record)
    for kind in ("base", "controller"):
        tag = strict_json(client.get_model_version(f"strict-{kind}", version).tags["champion_comparison"])
        assert tag["rule"] == RULE and tag["reason"]
        for role in ("candidate", "champion"):
            if tag[role] is None:
                assert tag["why_null"][role]
    assert strict_json(tag_json({"a": [math.nan, -math.inf, 1.0]})) == {"a": [None, None, 1.0]}


# --------------------------------------------------------------------------- jobs.promote (fast, SQLite registry)

def test_list_states_rule_aliases_and_scores(registry, tmp_path, capsys):
    uri, client, _ = registry
    v1 = _version(registry, tmp_path, "listed", 2.40)
    for kind in ("base", "controller"):
        client.set_registered_model_alias(f"listed-{kind}", "champion", v1)
    v2 = _version(registry, tmp_path, "listed", 2.31)
    code, out, _ = _promote(capsys, "--name", "listed", "--tracking-uri", uri)
    assert code == 0
    assert f"champion rule: {RULE}" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  v")]
    assert rows[0][:2] == [f"v{v2}", "candidate"] and rows[1][:2] == [f"v{v1}", "champion"]
    assert f"score {KEY}=2.31" in out and f"score {KEY}=2.4" in out

    summary = tmp_path / "list.json"
    code, out, _ = _promote(capsys, "--name", "listed", "--tracking-uri", uri, "--format", "json",
                            "--summary-out", str(summary))
    data = strict_json(out)
    assert code == 0 and strict_json(summary.read_text()) == data
    assert [(v["version"], v["aliases"], v["scores"]) for v in data["versions"]] == [
        (v2, ["candidate"], {KEY: 2.31}), (v1, ["champion"], {KEY: 2.40})]


def test_compare_with_recorded_scores_moves_nothing(registry, tmp_path, capsys):
    uri, client, _ = registry
    v1 = _version(registry, tmp_path, "cmp", 2.40)
    for kind in ("base", "controller"):
        client.set_registered_model_alias(f"cmp-{kind}", "champion", v1)
    v2 = _version(registry, tmp_path, "cmp", 2.31)
    code, out, _ = _promote(capsys, "--name", "cmp", "--tracking-uri", uri, "--compare")  # default: candidate
    assert code == 0
    assert f"v{v2} vs champion v{v1} on meta-val episodes {KEY} (recorded scores)" in out
    assert f"verdict: v{v2} wins and would take champion: meta-val 2.31 < champion v{v1} 2.4" in out
    assert str(client.get_model_version_by_alias("cmp-base", "champion").version) == v1


def test_to_moves_champion_only_if_it_wins_unless_forced(registry, tmp_path, capsys):
    uri, client, _ = registry
    v1 = _version(registry, tmp_path, "mv", 2.40)
    code, out, _ = _promote(capsys, "--name", "mv", "--tracking-uri", uri, "--to", v1)  # no champion yet
    assert code == 0 and f"first version: v{v1} is champion" in out
    v2 = _version(registry, tmp_path, "mv", 2.31)
    v3 = _version(registry, tmp_path, "mv", 2.50)

    code, _, err = _promote(capsys, "--name", "mv", "--tracking-uri", uri, "--to", f"v{v3}")
    assert code == 2 and err.count("\n") == 1 and "champion not moved" in err and "--force" in err
    assert str(client.get_model_version_by_alias("mv-controller", "champion").version) == v1

    code, out, _ = _promote(capsys, "--name", "mv", "--tracking-uri", uri, "--to", v2, "--format", "json")
    record = strict_json(out)["comparison"]
    assert code == 0 and record["moved"] and record["champion_version"] == v1 and record["candidate"] == 2.31
    for kind in ("base", "controller"):
        assert str(client.get_model_version_by_alias(f"mv-{kind}", "champion").version) == v2
        tag = strict_json(client.get_model_version(f"mv-{kind}", v2).tags["champion_comparison"])
        assert tag["promoted"] and tag["champion"] == 2.40

    code, out, _ = _promote(capsys, "--name", "mv", "--tracking-uri", uri, "--to", v3, "--force")
    assert code == 0 and f"moved champion to v{v3} by --force although it does not win" in out
    assert strict_json(client.get_model_version("mv-base", v3).tags["champion_comparison"])["forced"]
    assert str(client.get_model_version_by_alias("mv-base", "champion").version) == v3


@pytest.mark.parametrize("argv,message", [
    (["--name", "bad/name"], "--name 'bad/name': not a valid registered model name"),
    (["--name", "nobody"], "--name nobody: no registered model nobody-base or nobody-controller; prepared models "
                           "here: known"),
    (["--name", "known", "--compare", "9"], "version '9': known-base has no such version or alias; versions: 2, 1"),
    (["--name", "known", "--to", "champion2"], "version 'champion2': known-base has no such version or alias"),
    (["--name", "known", "--compare", "1"], "--compare: v1 and champion v2 have no score on the same meta-val "
                                            "episodes; pass --config RECIPE"),
])
def test_bad_names_and_versions_are_one_line_errors(registry, tmp_path, capsys, argv, message):
    uri, client, _ = registry
    _version(registry, tmp_path, "known", 2.4, key="meta_val_loss.valset-aaaaaaaaaaaa")
    v2 = _version(registry, tmp_path, "known", 2.3, key="meta_val_loss.valset-bbbbbbbbbbbb")
    for kind in ("base", "controller"):
        client.set_registered_model_alias(f"known-{kind}", "champion", v2)
    code, out, err = _promote(capsys, *argv, "--tracking-uri", uri)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_compare_scores_unscored_versions_with_the_recipe(registry, tmp_path, capsys):
    """--config: versions without a score on its episodes are scored (real tiny prepared models), recorded, and
    the next comparison reuses the recorded scores."""
    import mlflow

    from metaprep.config import MetaTrainConfig, from_dict
    from metaprep.registry.artifacts import export_prepared
    from metaprep.registry.promotion import val_set_key
    from metaprep.registry.register import register_prepared
    from metaprep.train.local import meta_train_local
    from metaprep.train.loop import load_split

    uri, client, exp = registry
    recipe = {**QUICK, "registry": {"name": "scored"}, "tracking": {"uri": uri}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    mlflow.set_tracking_uri(uri)
    versions = []
    for inner_lr, steps in ((1e-4, 1), (0.3, 2)):
        cfg = from_dict(MetaTrainConfig, {**recipe, "meta": {**QUICK["meta"], "inner_lr": inner_lr,
                                                             "meta_steps": steps}}).validate()
        result = meta_train_local(cfg)
        export = tmp_path / f"export-{steps}"
        export_prepared(result.model, result.loaded, cfg, export)
        run_id = client.create_run(exp).info.run_id
        versions.append(register_prepared(uri, run_id, export, cfg, result.final, "test", "{}")["base_version"])
    weak, strong = versions
    for kind in ("base", "controller"):
        client.set_registered_model_alias(f"scored-{kind}", "champion", weak)
    capsys.readouterr()  # meta-training's own progress lines

    code, out, _ = _promote(capsys, "--name", "scored", "--compare", "--config", str(path), "--format", "json")
    record = strict_json(out)["comparison"]
    assert code == 0 and record["source"] == "scored"
    assert record["candidate_version"] == strong and record["champion_version"] == weak
    base = from_dict(MetaTrainConfig, recipe).validate()
    assert record["metric"] == val_set_key(base, load_split(base))
    assert record["candidate"] < record["champion"] and record["wins"]
    for version in (weak, strong):  # recorded on both models, for the next comparison
        for kind in ("base", "controller"):
            assert f"score.{record['metric']}" in client.get_model_version(f"scored-{kind}", version).tags

    code, out, _ = _promote(capsys, "--name", "scored", "--tracking-uri", uri, "--compare", "--format", "json")
    again = strict_json(out)["comparison"]
    assert code == 0 and again["source"] == "recorded" and again["wins"]
    assert again["candidate"] == pytest.approx(record["candidate"], rel=1e-5)
