"""Recommend finetuning configurations for a new dataset by transfer from a meta-dataset.

    python -m jobs.recommend --train-meta PATH --meta-features JSON_or_FILE [--candidates FILE]
        [--scope KEY=VALUE[,VALUE...]]... [--finetune-only] [--top-k K] [--cost-aware [--cost-weight W]]
        [--surrogate-dir DIR] [--register NAME] [--summary-out FILE] [--format auto|table|json]
        [--fit-steps N] [--guard-folds K] [--seed S]
    python -m jobs.recommend --train-meta PATH --list-meta-features

``--train-meta`` is any supported meta-dataset (NMTLC .jsonl, Quick-Tune folder, generic .csv /
.jsonl, ``mlflow:<tracking-uri>`` for the service's adapt runs; see metaprep.transfer.metadataset).
The surrogate is fitted on it (and saved to ``--surrogate-dir`` when given); without
``--train-meta`` a surrogate previously saved in ``--surrogate-dir`` is loaded. ``--meta-features``
is a JSON object (inline or a file) with exactly the meta-dataset's meta-feature names.
``--candidates`` is a JSON list of configurations or a JSONL file of them (default: every
configuration of the meta-dataset); ``--scope KEY=VALUE[,VALUE...]`` (repeatable, all must hold) keeps
those whose field KEY has one of the values, ``--finetune-only`` drops from-scratch ones
(metaprep.transfer.scope). ``--list-meta-features`` prints the meta-feature names with their ranges
and the configuration fields with their values, then exits.

The first pick is the surrogate's, or the configuration best on average over the training datasets where
the surrogate's own held-out first picks lost to that default on the training datasets most like the new
one (metaprep.transfer.guard: ``--guard-folds`` K-fold cross-validation, K more fits; 0 turns it off).

Output: every pick with its predicted metric in the metric's own units and a +-1 sd band, its
predicted cost (or why there is none), its ranking score and the nearest training datasets behind it
(metaprep.transfer.evidence). ``--format table`` prints a table for people, ``json`` the summary for
programs (every number's scale under ``scales``); ``auto`` (default): table on a terminal, JSON when
stdout is a pipe or file. ``--summary-out`` always gets the JSON. ``--register NAME`` also logs and
registers the surrogate in MLflow (``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jobs._cli import job_parser, run_main, write_summary
from metaprep.errors import ConfigError
from metaprep.jsonio import check_writable, is_finite_number, parse_json, read_json, read_jsonl
from metaprep.transfer.scope import parse_scope


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("python -m jobs.recommend", __doc__.splitlines()[0])
    p.add_argument("--train-meta", default=None, help="meta-dataset to fit the surrogate on")
    p.add_argument("--meta-features", default=None,
                   help="JSON object (inline or a file) of meta-features (names: --list-meta-features)")
    p.add_argument("--list-meta-features", action="store_true",
                   help="print the meta-features (with ranges) and configuration fields (with values), then exit")
    p.add_argument("--candidates", default=None, help="JSON list / JSONL of candidate configurations")
    p.add_argument("--scope", action="append", default=[], metavar="KEY=VALUE[,VALUE...]",
                   help="only candidates whose field KEY has one of the values (repeatable; all must hold)")
    p.add_argument("--finetune-only", action="store_true",
                   help="drop configurations trained from scratch (NMTLC: basemodel=scratch)")
    p.add_argument("--format", choices=("auto", "table", "json"), default="auto",
                   help="table for people, json for programs; auto: table on a terminal, else json")
    p.add_argument("--top-k", type=int, default=5, help="portfolio size")
    p.add_argument("--cost-aware", action="store_true", help="divide gains by 1 + W x normalised log cost")
    p.add_argument("--cost-weight", type=float, default=1.0, help="W of --cost-aware")
    p.add_argument("--surrogate-dir", default=None, help="save the fitted surrogate here (or load from here)")
    p.add_argument("--register", default=None, metavar="NAME", help="register the surrogate in MLflow as NAME")
    p.add_argument("--summary-out", default=None, help="also write the portfolio JSON to this file")
    p.add_argument("--fit-steps", type=int, default=1500, help="surrogate training steps")
    p.add_argument("--guard-folds", type=int, default=None, metavar="K",
                   help="folds of the first pick's guard (default 8; 0 = always the surrogate's first pick)")
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
    return float(value) if is_finite_number(value) else None


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


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _assignments(config: dict, keys: list[str]) -> str:
    return " ".join(f"{k}={config[k]}" for k in keys if k in config)


def render_table(summary: dict) -> str:
    """The summary of :func:`recommend_configurations` as a ranked table with its legend, for people."""
    picks, metric, scales = summary["portfolio"], summary["metric"], summary["scales"]
    scope = [f"{k}={','.join(v)}" for k, v in summary["scope"].items()] + ["finetune only"] * summary["finetune_only"]
    meta = ", ".join(f"{k}={v:g}" for k, v in summary["meta_features"].items())
    lines = [f"Top {len(picks)} of {summary['n_candidates']} candidate configurations"
             + (f" (scope: {'; '.join(scope)})" if scope else "") + f" for {meta}, from {summary['source']}", ""]
    keys = sorted({k for p in picks for k in p["config"]})
    varying = [k for k in keys if len({repr(p["config"].get(k)) for p in picks}) > 1] if len(picks) > 1 else keys
    name = metric["name"] if metric else "normalised"
    rows = [("rank", name, "+-1 sd band", "normalised", "cost (s)", "score", "configuration")]
    for p in picks:
        band = p.get("predicted_metric_band")
        rows.append((str(p["rank"]) + ("*" if p.get("picked_by") == "best_default" else ""),
                     _fmt(p.get("predicted_metric")),
                     f"{_fmt(band[0])} .. {_fmt(band[1])}" if band else "n/a",
                     f"{p['predicted_normalised']:.3f}+-{p['predicted_normalised_std']:.3f}",
                     _seconds(p["predicted_cost_s"]), f"{p['score']:.3g}", _assignments(p["config"], varying)))
    widths = [max(len(r[c]) for r in rows) for c in range(6)]
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(row[:6], widths, strict=True)) + "  " + row[6])
        for nb in picks[n - 1].get("nearest_datasets", []) if n else []:
            seen = "not run there" if nb["observed_metric"] is None else f"observed {_fmt(nb['observed_metric'])}"
            rng = nb["observed_range"]
            lines.append(f"{'':>{widths[0]}}    near {nb['dataset']} (distance {nb['distance']:.2f}): {seen}; "
                         f"its runs {_fmt(rng['worst'])} (worst) .. {_fmt(rng['best'])} (best)")
    shared = [k for k in keys if k not in varying]
    if shared:
        lines += ["", f"shared by every pick: {_assignments(picks[0]['config'], shared)}"]
    lines += ["", f"{scales['predicted_metric']}.", f"+-1 sd band: {scales['predicted_metric_band']}.",
              f"normalised: {scales['predicted_normalised']}; +- {scales['predicted_normalised_std']}.",
              f"cost: {scales['predicted_cost_s'].removeprefix('null: ')}.",
              f"score: {scales['score']}", "near: the training datasets nearest in meta-features that the "
              "prediction is mapped through (distance: 1 = one standard deviation of one meta-feature)."]
    if summary.get("first_pick"):
        star = "*: " if summary["first_pick"]["picked_by"] == "best_default" else ""
        lines.append(f"{star}{summary['first_pick']['reason']}.")
    lines += [f"note: {note}" for note in summary["notes"]]
    return "\n".join(lines)


def render_listing(listing: dict) -> str:
    """The summary of :func:`list_meta_features` as text."""
    from metaprep.transfer.scope import SCRATCH, describe_summary

    n = listing["n_datasets"]
    lines = [f"{listing['source']}" + (f": {n} training datasets" if n else ""),
             "meta-features (give every one to --meta-features, as a JSON object):"]
    width = max((len(k) for k in [*listing["meta_features"], *listing["config_fields"]]), default=0)
    for name, rng in listing["meta_features"].items():
        lines.append(f"  {name:<{width}}  " + (f"{rng['min']:g} .. {rng['max']:g}" if rng else "range unknown"))
    if listing["example"]:
        example = json.dumps({k: int(v) if float(v).is_integer() else v
                              for k, v in listing["example"]["meta_features"].items()})
        lines.append(f"  e.g. --meta-features '{example}'  (training dataset {listing['example']['dataset']})")
    lines.append("configuration fields (restrict with --scope KEY=VALUE[,VALUE...]):")
    for name, summary in listing["config_fields"].items():
        hint = ""
        if name == listing["base_field"]:
            scratch = SCRATCH in [str(v).casefold() for v in summary.get("values", [])]
            hint = f"  (--finetune-only drops {SCRATCH!r})" if scratch else "  (no from-scratch value)"
        lines.append(f"  {name:<{width}}  {describe_summary(summary)}{hint}")
    metric = listing["metric"]
    lines.append(f"metric: {metric['name']}: {metric['meaning']}" if metric else "metric: unknown (no evidence.json)")
    lines.append("costs: recorded (predicted_cost_s, --cost-aware)" if listing["has_cost"] else
                 "costs: none in this meta-dataset (no predicted cost, no --cost-aware)")
    return "\n".join(lines)


def _table_wanted(fmt: str) -> bool:
    return fmt == "table" or (fmt == "auto" and sys.stdout.isatty())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if args.cost_weight < 0:
        raise ConfigError(f"--cost-weight must be >= 0, got {args.cost_weight}")
    if args.fit_steps < 1:
        raise ConfigError(f"--fit-steps must be >= 1, got {args.fit_steps}")
    if args.guard_folds is not None and (args.guard_folds < 0 or args.guard_folds == 1):
        raise ConfigError(f"--guard-folds must be 0 (off) or >= 2, got {args.guard_folds}")
    if args.guard_folds is not None and not args.train_meta:
        raise ConfigError("--guard-folds applies when fitting (--train-meta); a saved surrogate keeps its own guard")
    if not args.train_meta and not args.surrogate_dir:
        raise ConfigError("give --train-meta (fit a surrogate) or --surrogate-dir (load a saved one)")
    if args.list_meta_features:
        from metaprep.transfer.recommend_run import list_meta_features

        listing = list_meta_features(args.train_meta, args.surrogate_dir)
        print(render_listing(listing) if _table_wanted(args.format) else json.dumps(listing, indent=2))
        return 0
    if args.meta_features is None:
        raise ConfigError("--meta-features is required (its names and ranges: --list-meta-features)")
    scope = parse_scope(args.scope)
    if args.summary_out:
        check_writable(Path(args.summary_out), "--summary-out", ConfigError)
    tracking_uri = _registry_uri(args.register) if args.register is not None else None
    meta = _meta_features(args.meta_features)
    candidates = _candidates(args.candidates) if args.candidates else None
    from metaprep.transfer.recommend_run import recommend_configurations  # torch: only once the input is valid

    summary = recommend_configurations(
        meta, candidates, train_meta=args.train_meta, surrogate_dir=args.surrogate_dir, top_k=args.top_k,
        cost_aware=args.cost_aware, cost_weight=args.cost_weight, fit_steps=args.fit_steps, seed=args.seed,
        register=args.register, tracking_uri=tracking_uri, scope=scope, finetune_only=args.finetune_only,
        guard_folds=args.guard_folds)
    write_summary(args.summary_out, summary)
    if _table_wanted(args.format):
        print(render_table(summary))
    else:
        json.dump(summary, sys.stdout, indent=2, sort_keys=True)
        print()
    return 0


if __name__ == "__main__":
    run_main(main)
