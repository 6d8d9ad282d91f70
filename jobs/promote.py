"""List, compare and promote prepared models: ``python -m jobs.promote --name NAME [--compare [V] | --to V]``.

``--name NAME`` lists the versions of ``NAME-base`` / ``NAME-controller`` with their aliases (``champion``,
``candidate``), recorded meta-val scores (tags ``score.<val-set key>``, one key per set of meta-val
episodes) and champion comparisons, and states the champion rule. ``--compare [V]`` (default: the
candidate) compares version V with the champion on the same meta-val episodes: with recorded scores
when both have one for the same episodes, otherwise scored now on the episodes of ``--config RECIPE``
(and recorded). ``--to V`` moves ``champion`` on both registered models to V if it wins (``--force``:
whatever the scores say); a version that does not win leaves the champion where it is and exits 2.
"""

from __future__ import annotations

import argparse
import json

from jobs._cli import job_parser, run_main, write_summary
from metaprep.errors import RegistryError


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("python -m jobs.promote", __doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="registry.name of the prepared model (NAME-base, NAME-controller)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compare", nargs="?", const="candidate", metavar="VERSION",
                      help="compare VERSION (3, v3, candidate or champion; default: candidate) with the champion")
    mode.add_argument("--to", metavar="VERSION", help="move champion to VERSION if it beats the champion")
    p.add_argument("--force", action="store_true", help="with --to: move champion even if VERSION does not win")
    p.add_argument("--config", help="recipe whose meta-val episodes score versions without a recorded score "
                                    "on the same episodes (the recipe they were prepared or swept with)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of --config")
    p.add_argument("--tracking-uri", help="MLflow tracking URI; unset: --config's tracking.uri, else "
                                          "MLFLOW_TRACKING_URI")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output on stdout")
    p.add_argument("--summary-out", help="write the JSON output here too")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.force and not args.to:
        parser.error("--force only applies to --to VERSION")
    from metaprep.registry import promotion
    from metaprep.registry.tracking import reachable_tracking_uri

    cfg = split = None
    if args.config:
        from metaprep.train.loop import load_split
        from metaprep.tune.recipe import load_sweep_recipe

        cfg, _, _ = load_sweep_recipe(args.config, args.overrides)  # a plain or a sweep recipe
        split = load_split(cfg)
    uri = reachable_tracking_uri(args.tracking_uri or (cfg.tracking.uri if cfg else None))
    summary: dict = {"name": args.name, "tracking_uri": uri, "rule": promotion.RULE,
                     "versions": promotion.prepared_versions(uri, args.name), "comparison": None, "verdict": None}
    if args.compare:
        record = promotion.compare_versions(uri, args.name, args.compare, cfg, split)
        summary.update(comparison=record, verdict=promotion.verdict(record, applied=False))
    elif args.to:
        record = promotion.move_champion(uri, args.name, args.to, cfg, split, force=args.force)
        summary.update(comparison=record, verdict=promotion.verdict(record, applied=record["moved"]),
                       moved=record["moved"])
    write_summary(args.summary_out, summary)
    print(json.dumps(summary, indent=1) if args.format == "json" else "\n".join(_text(summary)))
    if args.to and not summary["moved"] and summary["comparison"]["champion_version"] != \
            summary["comparison"]["candidate_version"]:
        raise RegistryError(f"--to {args.to}: champion not moved ({summary['verdict']}); pass --force to move it "
                            f"anyway")
    return 0


def _text(summary: dict) -> list[str]:
    lines = [f"{summary['name']}: {len(summary['versions'])} version(s) of {summary['name']}-base / "
             f"{summary['name']}-controller on {summary['tracking_uri']}",
             f"champion rule: {summary['rule']}"]
    record = summary["comparison"]
    if record is None:
        for v in summary["versions"]:
            scores = " ".join(f"score {k}={s:.4g}" for k, s in sorted(v["scores"].items())) or "no recorded score"
            seen = v["champion_comparison"]
            said = f"  last comparison: {seen['reason']}" if seen and "reason" in seen else ""
            lines.append(f"  v{v['version']:<4} {','.join(v['aliases']) or '-':<20} {scores}{said}")
        return lines
    how = "recorded scores" if record["source"] == "recorded" else "scored now with --config"
    lines.append(f"v{record['candidate_version']} vs champion "
                 f"{'v' + record['champion_version'] if record['champion_version'] else '(none)'} on meta-val "
                 f"episodes {record['metric']} ({how}):")
    for role in ("candidate", "champion"):
        version, value = record[f"{role}_version"], record[role]
        if version is not None:
            shown = f"{value:.4g}" if value is not None else f"- ({record.get('why_null', {}).get(role, '')})"
            lines.append(f"  {role:<9} v{version:<4} meta-val {shown}")
    lines.append(f"verdict: {summary['verdict']}")
    return lines


if __name__ == "__main__":
    run_main(main)
