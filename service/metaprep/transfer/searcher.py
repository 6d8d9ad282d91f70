"""A Ray Tune searcher that proposes the recommender's portfolio first, then samples the space.

Warm-starting a search with transferred configurations is the zero-shot half of Strangmann et al.
(2024) and of Quick-Tune's initial design (Arango et al., ICLR 2024): the first ``len(portfolio)``
trials evaluate the recommended configurations in rank order; after that the searcher falls back
to random sampling of the Tune ``space`` (``tune.uniform``, ``tune.loguniform``, ``tune.choice``,
``tune.randint``, ... and constants, nested dicts allowed), or reports ``FINISHED`` when no space
was given.

Keys of a portfolio configuration overwrite the sampled values: a top-level key, or a
``"a/b"`` path for a nested space (Tune's flattened-key convention). Keys the space lacks are
passed through unless ``only_space_keys=True``.

Usage (``jobs.sweep`` builds it from ``sweep.portfolio`` / ``sweep.recommender``, see
:mod:`metaprep.tune.space`)::

    recs = Recommender.load(dir).rank(meta_features, k=5)
    searcher = PortfolioSearcher([r.config for r in recs], space=param_space, metric="loss", mode="min")
    tune.Tuner(trainable, tune_config=tune.TuneConfig(search_alg=searcher, num_samples=20), ...)

State saves as JSON (``save``/``restore``), never pickle.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.search import Searcher
from ray.tune.search.sample import Domain


class PortfolioSearcher(Searcher):
    def __init__(self, portfolio: list[dict], space: dict | None = None, metric: str | None = None,
                 mode: str | None = None, seed: int = 0, only_space_keys: bool = False):
        super().__init__(metric=metric, mode=mode)
        self.portfolio = [dict(c) for c in portfolio]
        self.space = space
        self.seed = seed
        self.only_space_keys = only_space_keys
        self._rng = np.random.default_rng(seed)
        self._next = 0  # index of the next portfolio configuration to propose
        self._sampled = 0
        self.suggested: dict[str, dict] = {}
        self.completed: dict[str, float | None] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        if self.space is not None and config:
            return False  # a space was given at construction; Tune's param_space must not replace it
        if config:
            self.space = config
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        return True

    def suggest(self, trial_id: str) -> dict | None:
        if self._next < len(self.portfolio):
            config = self._sample() if self.space else {}
            for key, value in self.portfolio[self._next].items():
                _assign(config, key, value, self.only_space_keys and self.space is not None)
            self._next += 1
        elif self.space:
            config = self._sample()
            self._sampled += 1
        else:
            return Searcher.FINISHED
        self.suggested[trial_id] = config
        return copy.deepcopy(config)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        value = None if error or not result or self.metric not in result else float(result[self.metric])
        self.completed[trial_id] = value

    @property
    def portfolio_exhausted(self) -> bool:
        return self._next >= len(self.portfolio)

    def _sample(self) -> dict:
        def resolve(node: Any) -> Any:
            if isinstance(node, Domain):
                return to_python(node.sample(random_state=self._rng))
            if isinstance(node, dict):
                if "grid_search" in node:
                    raise ValueError("PortfolioSearcher does not support tune.grid_search in the space")
                return {k: resolve(v) for k, v in node.items()}
            return copy.deepcopy(node)

        return resolve(self.space)

    # ------------------------------------------------------------------------------------- state
    def get_state(self) -> dict:
        return {"portfolio": self.portfolio, "next": self._next, "sampled": self._sampled, "seed": self.seed,
                "suggested": self.suggested, "completed": self.completed, "metric": self._metric,
                "mode": self._mode}

    def set_state(self, state: dict) -> None:
        self.portfolio = state["portfolio"]
        self._next = state["next"]
        self._sampled = state["sampled"]
        self.seed = state["seed"]
        self.suggested = state["suggested"]
        self.completed = state["completed"]
        self._metric, self._mode = state["metric"], state["mode"]
        # continue the random stream deterministically after a restore
        self._rng = np.random.default_rng([self.seed, self._sampled])

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.get_state(), default=str))

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(json.loads(Path(checkpoint_path).read_text()))


def to_python(value: Any) -> Any:
    """numpy scalars -> Python scalars (JSON-able, and what a trainable expects)."""
    return value.item() if isinstance(value, np.generic) else value


def _assign(config: dict, key: str, value: Any, only_existing: bool) -> None:
    path = key.split("/")
    node = config
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            if only_existing:
                return
            node[part] = {}
        node = node[part]
    if only_existing and path[-1] not in node:
        return
    # meta-datasets store every number as float; keep an integer hyperparameter an int
    if isinstance(value, float) and value.is_integer() and isinstance(node.get(path[-1]), int):
        value = int(value)
    node[path[-1]] = value
