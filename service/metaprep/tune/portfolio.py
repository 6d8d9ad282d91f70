"""The sweep's initial points: rank the transfer recommender's portfolio before Tune starts.

A ``sweep.recommender`` block (:mod:`metaprep.tune.space`) is only validated while the recipe is
parsed; :func:`resolve_initial_points` loads its surrogate (a folder, or a ``models:/`` URI downloaded
from MLflow), checks it against the block and ranks the candidates. The sweep driver calls it before
any MLflow run or trial exists, so a mismatch still fails first, with the recipe's ``file:line``.
"""

from __future__ import annotations

import dataclasses

from metaprep.errors import ConfigError, ModelLoadError, RegistryError
from metaprep.tune.space import ParamSpec, RecommenderSpec, SweepSpec, Where


def resolve_initial_points(spec: SweepSpec, tracking_uri: str | None = None) -> SweepSpec:
    """``spec`` with the recommender's picks (:attr:`~metaprep.tune.space.SweepSpec.recommended`) appended to
    its portfolio, in rank order (a point already listed is not repeated); ``spec`` itself when it has no
    ``recommender`` block. ``tracking_uri``: where a ``models:/`` surrogate is downloaded from."""
    if spec.recommender is None:
        return spec
    recommended = recommend(spec.recommender, spec.space, spec.seed, spec.where, tracking_uri)
    portfolio = list(spec.portfolio)
    portfolio += [r["params"] for r in recommended if r["params"] not in portfolio]
    return dataclasses.replace(spec, recommended=recommended, portfolio=portfolio)


def recommend(rec: RecommenderSpec, space: dict[str, ParamSpec], seed: int, where: Where,
              tracking_uri: str | None = None) -> list[dict]:
    """The recommender's top-k among ``rec.candidates`` seeded samples of ``space``, in rank order
    (fewer when the samples hold fewer distinct configurations).

    Each sample of the ``params`` keys becomes a surrogate configuration (keys renamed, ``fixed``
    added) and :meth:`~metaprep.transfer.recommender.Recommender.rank` picks the best-of-k portfolio
    for ``rec.meta_features`` by transfer alone (Strangmann et al., 2024; cost-aware as in Quick-Tune,
    Arango et al., ICLR 2024). Returns each Recommendation's fields plus ``params`` (the swept keys).
    """
    import numpy as np

    from metaprep.transfer.metadataset import config_key
    from metaprep.transfer.registry import load_recommender
    from metaprep.transfer.searcher import to_python

    key = "sweep.recommender"
    try:
        recommender = load_recommender(rec.surrogate, tracking_uri)
    except (ModelLoadError, RegistryError) as exc:
        raise ConfigError(f"{where(f'{key}.surrogate')}: {exc}") from None
    names = recommender.surrogate.encoder.config.names
    for k, name in rec.params.items():
        if name not in names:
            raise ConfigError(f"{where(f'{key}.params.{k}')}: {name!r} is not a configuration name of the "
                              f"surrogate; its names: {', '.join(names)}")
    for name in rec.fixed:
        if name not in names:
            raise ConfigError(f"{where(f'{key}.fixed.{name}')}: {name!r} is not a configuration name of the "
                              f"surrogate; its names: {', '.join(names)}")
        if name in rec.params.values():
            raise ConfigError(f"{where(f'{key}.fixed.{name}')}: {name!r} is already mapped from a swept key "
                              f"under params; hold it fixed or sweep it, not both")
    unset = [n for n in names if n not in rec.params.values() and n not in rec.fixed]
    if unset:
        raise ConfigError(f"{where(f'{key}.params')}: the surrogate's configuration names {', '.join(unset)} are "
                          f"neither mapped from a swept key under params nor held under fixed")
    expected = recommender.surrogate.meta_features
    if set(rec.meta_features) != set(expected):
        unknown = sorted(set(rec.meta_features) - set(expected))
        missing = sorted(set(expected) - set(rec.meta_features))
        what = "; ".join(([f"unknown {unknown}"] if unknown else []) + ([f"missing {missing}"] if missing else []))
        raise ConfigError(f"{where(f'{key}.meta_features')}: {what}; the surrogate expects exactly "
                          f"{', '.join(expected)}")

    rng = np.random.default_rng([seed, 1])  # a stream apart from the searcher's own fallback samples
    domains = {k: space[k].to_tune() for k in rec.params}
    points: dict[str, dict] = {}  # surrogate configuration -> its swept point, duplicates dropped
    configs = []
    for _ in range(rec.candidates):
        point = {k: to_python(d.sample(random_state=rng)) for k, d in domains.items()}
        config = {**rec.fixed, **{rec.params[k]: v for k, v in point.items()}}
        if points.setdefault(config_key(config), point) is point:
            configs.append(config)
    try:
        picks = recommender.rank(rec.meta_features, configs, k=rec.top_k, cost_aware=rec.cost_aware)
    except ConfigError as exc:  # cost-aware ranking with a surrogate fitted without costs
        raise ConfigError(f"{where(f'{key}.cost_aware')}: {exc}") from None
    return [{**r.to_dict(), "params": points[config_key(r.config)]} for r in picks]
