"""Recommend finetuning configurations for a new dataset by transfer from a meta-dataset.

    python -m jobs.recommend --train-meta PATH --meta-features JSON_or_FILE [--candidates FILE]
        [--top-k K] [--cost-aware [--cost-weight W]] [--surrogate-dir DIR] [--register NAME]
        [--summary-out FILE] [--fit-steps N] [--seed S]

``--train-meta`` is any supported meta-dataset (NMTLC .jsonl, Quick-Tune folder, generic .csv /
.jsonl, ``mlflow:<tracking-uri>`` for the service's adapt runs; see metaprep.transfer.metadataset).
The surrogate is fitted on it (and saved to ``--surrogate-dir`` when given); without
``--train-meta`` a surrogate previously saved in ``--surrogate-dir`` is loaded. ``--meta-features``
is a JSON object (inline or a file) with exactly the meta-dataset's meta-feature names.
``--candidates`` is a JSON list of configurations or a JSONL file of them (default: every
configuration of the meta-dataset). Prints the ranked portfolio as JSON; ``--register NAME`` also
logs and registers the surrogate in MLflow (``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from jobs._cli import job_parser, run_main, write_summary
from metaprep.errors import ConfigError
from metaprep.jsonio import check_writable, parse_json, read_json, read_jsonl


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("python -m jobs.recommend", __doc__.splitlines()[0])
    p.add_argument("--train-meta", default=None, help="meta-dataset to fit the surrogate on")
    p.add_argument("--meta-features", required=True, help="JSON object (inline or a file) of meta-features")
    p.add_argument("--candidates", default=None, help="JSON list / JSONL of candidate configurations")
    p.add_argument("--top-k", type=int, default=5, help="portfolio size")
    p.add_argument("--cost-aware", action="store_true", help="divide gains by 1 + W x normalised log cost")
    p.add_argument("--cost-weight", type=float, default=1.0, help="W of --cost-aware")
    p.add_argument("--surrogate-dir", default=None, help="save the fitted surrogate here (or load from here)")
    p.add_argument("--register", default=None, metavar="NAME", help="register the surrogate in MLflow as NAME")
    p.add_argument("--summary-out", default=None, help="also write the portfolio JSON to this file")
    p.add_argument("--fit-steps", type=int, default=1500, help="surrogate training steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the surrogate fit")
    return p


def _json_arg(value: str, flag: str) -> object:
    """Inline JSON, or the path of a JSON file (a ``.jsonl`` file: the list of its line objects)."""
    if value.lstrip().startswith(("{", "[")):
        return parse_json(value, flag, ConfigError, inline=True)
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{flag} {value!r}: neither inline JSON nor an existing file")
    if path.suffix == ".jsonl":
        return [obj for _, obj in read_jsonl(path, f"{flag} file")]
    return read_json(path, f"{flag} file")


def _short(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 4000-digit number stays one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _finite_number(value: object) -> float | None:
    """``value`` as a finite float, or None when it is not a JSON number (or too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _meta_features(value: str) -> dict[str, float]:
    meta = _json_arg(value, "--meta-features")
    if not isinstance(meta, dict):
        raise ConfigError('--meta-features must be a JSON object, e.g. {"num_samples": 5000}')
    out = {}
    for name, v in meta.items():
        number = _finite_number(v)
        if number is None:
            raise ConfigError(f"--meta-features: {name!r} is {_short(v)}; meta-features must be finite numbers")
        out[str(name)] = number
    return out


def _candidates(value: str) -> list[dict]:
    cands = _json_arg(value, "--candidates")
    if not isinstance(cands, list) or not cands or not all(isinstance(c, dict) and c for c in cands):
        raise ConfigError("--candidates must be a non-empty JSON list (or JSONL) of configuration objects")
    return cands


def _registry_uri(name: str) -> str:
    """The tracking URI ``--register NAME`` logs to, with NAME and the URI checked before any fit: a name
    MLflow would refuse must not leave a run and its artifacts behind."""
    from metaprep.registry.names import check_model_name
    from metaprep.registry.tracking import reachable_tracking_uri

    check_model_name(name, "--register")
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError("--register needs MLFLOW_TRACKING_URI (e.g. sqlite:///mlflow.db or http://host:5000)")
    return reachable_tracking_uri(None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if args.cost_weight < 0:
        raise ConfigError(f"--cost-weight must be >= 0, got {args.cost_weight}")
    if args.fit_steps < 1:
        raise ConfigError(f"--fit-steps must be >= 1, got {args.fit_steps}")
    if not args.train_meta and not args.surrogate_dir:
        raise ConfigError("give --train-meta (fit a surrogate) or --surrogate-dir (load a saved one)")
    if args.summary_out:
        check_writable(Path(args.summary_out), "--summary-out", ConfigError)
    tracking_uri = _registry_uri(args.register) if args.register is not None else None
    meta = _meta_features(args.meta_features)
    candidates = _candidates(args.candidates) if args.candidates else None
    from metaprep.transfer.recommend_run import recommend_configurations  # torch: only once the input is valid

    summary = recommend_configurations(
        meta, candidates, train_meta=args.train_meta, surrogate_dir=args.surrogate_dir, top_k=args.top_k,
        cost_aware=args.cost_aware, cost_weight=args.cost_weight, fit_steps=args.fit_steps, seed=args.seed,
        register=args.register, tracking_uri=tracking_uri)
    write_summary(args.summary_out, summary)
    json.dump(summary, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    run_main(main)
