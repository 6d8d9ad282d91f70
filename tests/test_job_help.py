"""``--help`` of every job in jobs/ shows the default of every option that has one."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted(p.stem for p in (ROOT / "jobs").glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("job", JOBS)
def test_help_shows_every_default(job: str) -> None:
    parser = importlib.import_module(f"jobs.{job}").build_parser()
    text = " ".join(parser.format_help().split())  # argparse wraps long lines
    defaults = [a for a in parser._actions
                if a.option_strings and a.default not in (None, argparse.SUPPRESS) and a.help != argparse.SUPPRESS]
    for action in defaults:
        assert f"(default: {action.default})" in text, (job, action.dest)


def test_help_of_a_job_run_as_a_module_prints_defaults_and_does_nothing_else() -> None:
    readme = (ROOT / "README.md").read_text()
    for job, needle in (("benchmark", "(default: False)"), ("readme_results", "usage: python -m jobs.readme_results")):
        proc = subprocess.run([sys.executable, "-m", f"jobs.{job}", "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and needle in " ".join(proc.stdout.split()), proc.stderr[-2000:]
    assert (ROOT / "README.md").read_text() == readme  # --help never regenerates the README


def test_help_config_lists_every_config_key_with_type_and_default() -> None:
    from metaprep.config import MetaTrainConfig, flatten, to_dict

    proc = subprocess.run([sys.executable, "-m", "jobs.meta_train", "--help-config"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for key, value in flatten(to_dict(MetaTrainConfig())).items():
        assert f"  {key} (" in proc.stdout and f"default {value!r})" in proc.stdout, key
    assert "one of: finetune, fomaml" in proc.stdout  # valid values come from the registries


def test_config_md_lists_every_key_and_is_current() -> None:
    """CONFIG.md is generated from the config dataclasses (python -m jobs.readme_results): every key is in it."""
    from jobs.readme_results import CONFIG, config_md
    from metaprep.config import MetaTrainConfig, flatten, to_dict

    text = CONFIG.read_text()
    assert text == config_md(), "CONFIG.md is stale: run PYTHONPATH=service python -m jobs.readme_results"
    missing = [k for k in flatten(to_dict(MetaTrainConfig())) if f"| `{k}` |" not in text]
    assert not missing, missing
