"""Every shipped recipe loads; bad configs fail with file:line, key and what is valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metaprep.config import MetaTrainConfig, load_config
from metaprep.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
BENCH_RECIPES = sorted((ROOT / "jobs" / "configs" / "bench").glob("*.yaml"))


def _strip_sweep(path: Path, tmp_path: Path) -> Path:
    data = yaml.safe_load(path.read_text())
    data.pop("sweep", None)
    out = tmp_path / path.name
    out.write_text(yaml.safe_dump(data))
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_loads(path: Path, tmp_path: Path) -> None:
    cfg = load_config(MetaTrainConfig, _strip_sweep(path, tmp_path))
    assert cfg.algorithm and cfg.registry.name


@pytest.mark.parametrize("path", BENCH_RECIPES, ids=[p.name for p in BENCH_RECIPES])
def test_every_bench_recipe_loads(path: Path) -> None:
    """Each benchmark protocol recipe, with and without its large_model and quick sections."""
    from metaprep.bench.protocol import ENCODER_RECIPE, SUITE_RECIPES, load_protocol

    assert {*SUITE_RECIPES.values(), ENCODER_RECIPE, "throughput.yaml"} <= {p.name for p in BENCH_RECIPES}
    if path.name == "throughput.yaml":  # the throughput plan (tests/test_throughput.py pins its contents)
        import argparse

        from metaprep.bench.throughput.plan import make_plan

        for quick in (False, True):
            assert make_plan(argparse.Namespace(quick=quick, model_path="tiny"), path).models
        return
    for large_model in (False, True):
        for quick in (False, True):
            proto = load_protocol(path, large_model=large_model, quick=quick)
            assert "finetune" in proto.methods and (proto.seeds == 1) is quick


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, overrides, expected", [
    ("meta:\n  inner_lrr: 0.1\n", [], "r.yaml:2: unknown key 'meta.inner_lrr'"),
    ("meta:\n  inner_lr: fast\n", [], "r.yaml:2: meta.inner_lr: expected float"),
    ("meta:\n  inner_lr: [1\n", [], "malformed YAML"),
    ("algorithm: sgd\n", [], "algorithm: 'sgd' is not valid; choose one of"),
    ("", ["meta.inner_lr=0"], "meta.inner_lr: must be a finite number > 0"),
    ("", ["meta.outer_lr=-1"], "meta.outer_lr: must be a finite number > 0"),
    ("", ["reparam.rank=0"], "reparam.rank: must be >= 1"),
    ("", ["meta.inner_steps=0"], "meta.inner_steps: must be >= 1"),
    ("", ["distributed.num_workers=0"], "distributed.num_workers: must be >= 1"),
    ("", ["distributed.zero_stage=4"], "distributed.zero_stage: 4 is not valid; choose one of 1, 2, 3"),
    ("", ["reparam.kind=dora"], "reparam.kind: 'dora' is not valid"),
    ("", ["algorithm=mltd", "reparam.kind=lora"], "needs a TARP kind"),
    ("", ["registry.name=a/b"], "registry.name"),
    ("", ["bad"], "expected key=value"),
])
def test_bad_config_is_one_clear_line(tmp_path, text, overrides, expected) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(MetaTrainConfig, _write(tmp_path, text), overrides)
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_set_overrides_parse_yaml_scalars(tmp_path) -> None:
    cfg = load_config(MetaTrainConfig, _write(tmp_path, "meta:\n  inner_lr: 0.1\n"),
                      ["meta.inner_lr=5e-2", "meta.freeze_base=true", "reparam.targets=[q_proj]"])
    assert cfg.meta.inner_lr == 0.05 and cfg.meta.freeze_base is True and cfg.reparam.targets == ["q_proj"]


def test_second_order_through_adam_is_flagged() -> None:
    tiny = ROOT / "jobs/configs/tiny.yaml"
    flagged = load_config(MetaTrainConfig, tiny, ["algorithm=maml", "meta.inner_optimizer=adam"])
    assert flagged.second_order and "prefer sgd for second order" in flagged.advisories()[0]
    for overrides in (["algorithm=maml"], ["algorithm=fomaml", "meta.inner_optimizer=adam"]):
        assert load_config(MetaTrainConfig, tiny, overrides).advisories() == []


@pytest.mark.parametrize("text, overrides, expected", [
    # the recipe sets meta.inner_lr on line 2; the flag overrides it: the error names the flag
    ("meta:\n  inner_lr: 0.1\n", ["meta.inner_lr=abc"], "--set meta.inner_lr=abc: meta.inner_lr: expected float"),
    ("meta:\n  inner_lr: 0.1\n", ["meta.inner_lr=0"], "--set meta.inner_lr=0: meta.inner_lr: must be a finite"),
    ("meta:\n  inner_lr: 0.1\n", ["meta.foo=1"], "--set meta.foo=1: unknown key 'meta.foo'"),
    ("reparam:\n  rank: 4\n", ["reparam.targets=[q_proj, [1]]"], "--set reparam.targets=[q_proj, [1]]: "),
    # a value the recipe sets is blamed on its line, also when the check runs after parsing
    ("meta:\n  inner_steps: 0\n", [], "r.yaml:2: meta.inner_steps: must be >= 1"),
])
def test_errors_name_where_the_key_was_set(tmp_path, text, overrides, expected) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(MetaTrainConfig, _write(tmp_path, text), overrides)
    message = str(err.value)
    assert (message.startswith(expected) or message.endswith(expected + ", got 0")) and "\n" not in message, message
