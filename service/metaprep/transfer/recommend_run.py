"""What ``jobs.recommend`` runs: fit (or load) the surrogates, rank configurations for a new dataset,
optionally register the surrogate. Errors name the ``jobs.recommend`` flag at fault."""

from __future__ import annotations

import tempfile
from pathlib import Path

from metaprep.errors import ConfigError, DataError

PERFORMANCE_SCALE = "normalised: 1 = best configuration of a training dataset, 0 = worst"


def recommend_configurations(meta: dict[str, float], candidates: list[dict] | None, *, train_meta: str | None,
                             surrogate_dir: str | None, top_k: int = 5, cost_aware: bool = False,
                             cost_weight: float = 1.0, fit_steps: int = 1500, seed: int = 0,
                             register: str | None = None, tracking_uri: str | None = None) -> dict:
    """The ranked portfolio for a dataset with meta-features ``meta`` (the summary of ``jobs.recommend``).

    The surrogate is fitted on the meta-dataset ``train_meta`` (and saved to ``surrogate_dir`` when
    given), else loaded from ``surrogate_dir``; ``candidates`` default to every configuration of the
    meta-dataset; ``register``: also log and register the surrogate as that MLflow model name.
    """
    from metaprep.transfer.metadataset import load_metadataset
    from metaprep.transfer.recommender import Recommender

    if register and not tracking_uri:
        raise ConfigError("--register needs MLFLOW_TRACKING_URI (e.g. sqlite:///mlflow.db or http://host:5000)")
    if train_meta:
        train = load_metadataset(train_meta)
        unknown = sorted(set(meta) - set(train.meta_feature_names))
        missing = sorted(set(train.meta_feature_names) - set(meta))
        if unknown or missing:
            what = "; ".join(([f"unknown {unknown}"] if unknown else []) + ([f"missing {missing}"] if missing else []))
            raise ConfigError(f"--meta-features: {what}; {train.name} has {train.meta_feature_names}")
        if cost_aware and not train.has_cost:
            raise ConfigError(f"--cost-aware: {train.name} records no run costs; drop --cost-aware or use a "
                              "meta-dataset with costs")
        recommender = Recommender.fit(train, seed=seed, steps=fit_steps, cost_steps=fit_steps if train.has_cost else 0)
        if surrogate_dir:
            recommender.save(surrogate_dir)
    else:
        recommender = Recommender.load(surrogate_dir)
        recommender.surrogate.check_meta(meta)
    try:
        picks = recommender.rank(meta, candidates, k=top_k, cost_aware=cost_aware, cost_weight=cost_weight)
    except DataError as exc:
        raise ConfigError(f"--meta-features: {exc}") from None
    summary = {
        "portfolio": [{**r.to_dict(), "config": _plain(r.config)} for r in picks],
        "meta_features": meta, "top_k": top_k, "cost_aware": cost_aware,
        "n_candidates": len(candidates if candidates is not None else recommender.candidates),
        "train_meta": train_meta, "surrogate_dir": surrogate_dir, "predicted_performance": PERFORMANCE_SCALE,
    }
    if register:
        from metaprep.transfer.registry import register_surrogate

        with tempfile.TemporaryDirectory() as tmp:
            folder = surrogate_dir or recommender.save(Path(tmp) / "surrogate")
            summary["registered"] = register_surrogate(folder, register, tracking_uri)
    return summary


def _plain(config: dict) -> dict:
    """Integral floats back to ints (meta-datasets store every number as float)."""
    return {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in config.items()}
