"""What ``jobs.recommend`` runs: fit (or load) the surrogates, rank the in-scope configurations for a new
dataset and explain every pick in the metric's own units (:mod:`metaprep.transfer.evidence`); list what a
meta-dataset expects; optionally register the surrogate. Errors name the ``jobs.recommend`` flag at fault."""

from __future__ import annotations

import tempfile
from pathlib import Path

from metaprep.errors import ConfigError, DataError
from metaprep.transfer.evidence import Neighbour, TrainingEvidence
from metaprep.transfer.guard import GUARD_FOLDS
from metaprep.transfer.metadataset import Metric
from metaprep.transfer.scope import apply_scope, base_field, field_values, value_summary

SCORE = ("ranking score, no units, used only to order the picks: the gain of the greedy best-of-k portfolio. "
         "Rank 1: its predicted_normalised. Rank i > 1: how much adding it raises the expected best "
         "predicted_normalised of the picks above it, averaged over the ensemble members (each member one "
         "plausible response surface of the new dataset). A small score means the pick mostly hedges the picks "
         "above (it wins where members disagree), not that it is poor: compare predicted_metric")
COST_AWARE = " Cost-aware: each gain is divided by 1 + {w} x the candidate's min-max normalised log predicted cost."
DISTANCE = ("Euclidean distance between meta-features in the surrogate's encoding (log where a feature spans a "
            "factor of 20 or more, then standardised over the training datasets): 1 = one standard deviation "
            "of one meta-feature")


def check_meta_names(meta: dict[str, float], expected: list[str], source: str) -> None:
    """``meta`` names exactly the meta-features ``expected``, else a one-line error pointing at the listing."""
    unknown = sorted(set(meta) - set(expected))
    missing = sorted(set(expected) - set(meta))
    if unknown or missing:
        what = "; ".join(([f"unknown {unknown}"] if unknown else []) + ([f"missing {missing}"] if missing else []))
        raise ConfigError(f"--meta-features: {what}; {source} has {expected} (ranges: --list-meta-features)")


def recommend_configurations(meta: dict[str, float], candidates: list[dict] | None, *, train_meta: str | None,
                             surrogate_dir: str | None, top_k: int = 5, cost_aware: bool = False,
                             cost_weight: float = 1.0, fit_steps: int = 1500, seed: int = 0,
                             register: str | None = None, tracking_uri: str | None = None,
                             scope: dict[str, list[str]] | None = None, finetune_only: bool = False,
                             guard_folds: int | None = None) -> dict:
    """The ranked portfolio for a dataset with meta-features ``meta`` (the summary of ``jobs.recommend``).

    The surrogate is fitted on the meta-dataset ``train_meta`` (and saved to ``surrogate_dir`` when
    given), else loaded from ``surrogate_dir``; ``candidates`` default to every configuration of the
    meta-dataset, narrowed by ``scope`` / ``finetune_only`` (:mod:`metaprep.transfer.scope`);
    ``register``: also log and register the surrogate as that MLflow model name; ``guard_folds``: folds of the
    first pick's guard (:mod:`metaprep.transfer.guard`; default ``GUARD_FOLDS``, 0 = always the surrogate's).
    """
    from metaprep.transfer.metadataset import distinct_configs, load_metadataset
    from metaprep.transfer.recommender import Recommender

    if register and not tracking_uri:
        raise ConfigError("--register needs MLFLOW_TRACKING_URI (e.g. sqlite:///mlflow.db or http://host:5000)")
    if train_meta:
        train = load_metadataset(train_meta)
        check_meta_names(meta, train.meta_feature_names, train.name)
        if cost_aware and not train.has_cost:
            raise ConfigError(f"--cost-aware: {train.name} records no run costs; drop --cost-aware or use a "
                              "meta-dataset with costs")
        pool = candidates if candidates is not None else distinct_configs(list(train.pools().values()))
        scoped, notes = apply_scope(pool, scope or {}, finetune_only)  # before the fit: a typo fails in seconds
        recommender = Recommender.fit(train, seed=seed, steps=fit_steps, cost_steps=fit_steps if train.has_cost else 0,
                                      guard_folds=GUARD_FOLDS if guard_folds is None else guard_folds)
        if surrogate_dir:
            recommender.save(surrogate_dir)
        source = train.name
    else:
        recommender = Recommender.load(surrogate_dir)
        recommender.surrogate.check_meta(meta)
        pool = candidates if candidates is not None else recommender.candidates
        scoped, notes = apply_scope(pool, scope or {}, finetune_only) if pool else (pool, [])
        source = str(surrogate_dir)
    try:
        picks, decision = recommender.rank_checked(meta, scoped, k=top_k, cost_aware=cost_aware,
                                                   cost_weight=cost_weight)
    except DataError as exc:
        raise ConfigError(f"--meta-features: {exc}") from None
    has_cost = recommender.surrogate.cost is not None
    portfolio = [{"rank": r.rank, "config": _plain(r.config), "predicted_normalised": r.predicted_performance,
                  "predicted_normalised_std": r.predicted_std, "predicted_cost_s": r.predicted_cost_s,
                  "score": r.score, "picked_by": r.picked_by} for r in picks]
    if cost_aware and recommender.guard is not None:
        notes.append("--cost-aware: the first pick is not checked against the best default (the guard's held-out "
                     "evidence compares performance, not performance per cost)")
    evidence = recommender.evidence
    cited: dict[str, dict[str, float]] = {}
    if evidence is None:
        notes.append(f"{source} was saved without training evidence (evidence.json): predictions stay on the "
                     "normalised scale; re-fit with --train-meta ... --surrogate-dir to get them in the metric's units")
    else:
        notes += _range_notes(meta, evidence.meta_ranges())
        disjoint = evidence.disjoint_values(scoped)
        notes += [f"{name}: {' | '.join(', '.join(g) for g in groups)} never share a training dataset, so the "
                  f"surrogate never compared them and scores across these groups are not comparable; narrow with "
                  f"--scope {name}=..." + (" or --finetune-only" if name == base_field(scoped) else "")
                  for name, groups in disjoint.items()]
        members = recommender.surrogate.predict_members([r.config for r in picks], meta)
        for i, (r, entry) in enumerate(zip(picks, portfolio, strict=True)):
            neighbours = evidence.nearest(meta, recommender.surrogate.encoder.meta, _peers(r.config, scoped, disjoint))
            value, low, high = evidence.in_metric_units(members[:, i:i + 1], neighbours)
            entry["predicted_metric"] = float(value[0])
            entry["predicted_metric_band"] = [float(low[0]), float(high[0])]
            entry["nearest_datasets"] = [_neighbour(evidence, n, r.config) for n in neighbours]
            cited.update({n.dataset.name: n.dataset.meta_features for n in neighbours})
    summary = {
        "portfolio": portfolio, "meta_features": meta, "top_k": top_k, "cost_aware": cost_aware,
        "scope": scope or {}, "finetune_only": finetune_only, "n_candidates": len(scoped),
        "n_candidates_before_scope": len(pool), "train_meta": train_meta, "surrogate_dir": surrogate_dir,
        "source": source, "metric": evidence.metric.to_dict() if evidence else None,
        "training_datasets": dict(sorted(cited.items())),
        "first_pick": None if decision is None else {
            "picked_by": decision.pick, "reason": decision.reason(), "delta_regret": decision.delta,
            "held_out_neighbours": decision.neighbours, "self_check": decision.check},
        "scales": _scales(evidence.metric if evidence else None, has_cost, source, cost_aware, cost_weight),
        "notes": notes,
    }
    if register:
        from metaprep.transfer.registry import register_surrogate

        with tempfile.TemporaryDirectory() as tmp:
            folder = surrogate_dir or recommender.save(Path(tmp) / "surrogate")
            summary["registered"] = register_surrogate(folder, register, tracking_uri)
    return summary


def list_meta_features(train_meta: str | None, surrogate_dir: str | None) -> dict:
    """What ``--meta-features`` must name (with each one's range over the training datasets), the configuration
    fields ``--scope`` can restrict (with their values), the metric and whether costs are recorded."""
    from metaprep.transfer.metadataset import load_metadataset
    from metaprep.transfer.recommender import Recommender

    if train_meta:
        train = load_metadataset(train_meta)
        evidence = TrainingEvidence.from_pools(list(train.pools().values()), train.metric)
        source, names, has_cost, configs = train.name, train.meta_feature_names, train.has_cost, evidence.configs
    else:
        recommender = Recommender.load(surrogate_dir)
        evidence, configs = recommender.evidence, recommender.candidates
        source, names, has_cost = str(surrogate_dir), recommender.surrogate.meta_features, \
            recommender.surrogate.cost is not None
    ranges = evidence.meta_ranges() if evidence else {}
    first = evidence.datasets[0] if evidence else None
    return {
        "source": source, "n_datasets": len(evidence.datasets) if evidence else None,
        "meta_features": {n: ({"min": ranges[n][0], "max": ranges[n][1]} if n in ranges else None) for n in names},
        "example": {"dataset": first.name, "meta_features": first.meta_features} if first else None,
        "config_fields": {k: value_summary(v) for k, v in field_values(configs).items()},
        "base_field": base_field(configs), "metric": evidence.metric.to_dict() if evidence else None,
        "has_cost": has_cost,
    }


def _peers(config: dict, scoped: list[dict], disjoint: dict[str, list[list[str]]]) -> list[dict]:
    """The in-scope candidates of ``config``'s own group in every field whose groups never share a dataset (a
    finetuning pick is mapped through datasets that ran finetunes)."""
    def group(name: str, c: dict) -> int | None:
        return next((i for i, g in enumerate(disjoint[name]) if c.get(name) in g), None)

    return [c for c in scoped if all(group(name, c) == group(name, config) for name in disjoint)]


def _neighbour(evidence: TrainingEvidence, neighbour: Neighbour, config: dict) -> dict:
    """One nearest training dataset of a pick: its distance, what it observed for the pick, its range."""
    d, metric = neighbour.dataset, evidence.metric
    out = {"dataset": d.name, "distance": neighbour.distance, "observed_metric": evidence.observed(d, config),
           "observed_range": {"worst": metric.value(d.worst), "best": metric.value(d.best)}}
    if d.cost:
        i = evidence.index(config)
        out["observed_cost_s"] = d.cost.get(i) if i is not None else None
    return out


def _range_notes(meta: dict[str, float], ranges: dict[str, tuple[float, float]]) -> list[str]:
    return [f"{name}={value:g} lies outside the training datasets' range {ranges[name][0]:g} .. {ranges[name][1]:g}: "
            "the prediction extrapolates" for name, value in meta.items()
            if name in ranges and not ranges[name][0] <= value <= ranges[name][1]]


def _scales(metric: Metric | None, has_cost: bool, source: str, cost_aware: bool, cost_weight: float) -> dict[str, str]:
    """What every number of the summary means (the ``scales`` object)."""
    m = metric.name if metric else "metric"
    unitless = "null: the saved surrogate has no training evidence to map predictions to the metric's units"
    return {
        "predicted_metric": (f"{m}: {metric.meaning}. The surrogate's normalised prediction placed in the observed "
                             f"{m} range (worst .. best) of the nearest training datasets, averaged over ensemble "
                             "members x those datasets") if metric else unitless,
        "predicted_metric_band": (f"[low, high] {m}, the prediction +-1 standard deviation over ensemble members x "
                                  "nearest datasets (the members' disagreement plus how far best and worst runs "
                                  "differ between similar datasets)") if metric else unitless,
        "predicted_normalised": ("the surrogate's output, mean over ensemble members: 1 = as good as the best "
                                 "configuration of a training dataset, 0 = the worst; outside [0, 1] = extrapolation "
                                 "(clipped to [0, 1] before predicted_metric)"),
        "predicted_normalised_std": "standard deviation over the ensemble members, on the normalised scale",
        "predicted_cost_s": ("seconds for the whole run, geometric mean over the cost ensemble" if has_cost else
                             f"null: no costs in this meta-dataset ({source} records no run times)"),
        "score": SCORE + "." + (COST_AWARE.format(w=f"{cost_weight:g}") if cost_aware else ""),
        "picked_by": ("'best_default' on rank 1 when the guard put the configuration best on average over the training "
                      "datasets first, because the surrogate's own held-out first picks lost to it on the training "
                      "datasets most like this one (first_pick says by how much); 'surrogate' otherwise"),
        "first_pick.self_check": ("mean normalised regret@1 over the training datasets, each held out in turn, of "
                                  "always the surrogate's first pick, always the best default, and the guard deciding "
                                  "each from the other held-out datasets; active: the guard is used (it beat always "
                                  "the surrogate)"),
        "first_pick.delta_regret": ("similarity-weighted mean over held-out training datasets of (normalised regret@1 "
                                    "of the surrogate's first pick - that of the best default); > 0: the default "
                                    "first. Normalised regret: 0 = the dataset's best run, 1 = its worst"),
        "nearest_datasets.distance": DISTANCE,
        "nearest_datasets.observed_metric": (f"{m} that dataset observed for this exact configuration (repeated "
                                             "runs averaged); null when it never ran it"),
        "nearest_datasets.observed_range": f"the worst and best {m} among all of that dataset's runs",
    }


def _plain(config: dict) -> dict:
    """Integral floats back to ints (meta-datasets store every number as float)."""
    return {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in config.items()}
