"""The ``sweep:`` section of a recipe: search space, searcher, ASHA and concurrency, validated.

A sweep recipe is an ordinary meta-training recipe plus a top-level ``sweep:`` mapping (the rest of
the file is the base configuration every trial starts from)::

    sweep:
      space:                                  # dotted recipe keys -> one distribution each
        meta.inner_lr: {loguniform: [0.03, 1.0]}
        meta.outer_lr: {loguniform: [3.0e-4, 3.0e-2]}
        meta.inner_steps: {choice: [1, 2, 3]}
        reparam.rank: {choice: [2, 4, 8]}
      num_samples: 6                          # trials in total (initial points included)
      searcher: random                        # random | optuna (if installed) | transfer
      seed: 0                                 # of the searcher's random stream
      max_concurrent: 0                       # 0 = as many as the cluster's CPUs (or GPUs) fit
      initial:                                # optional: configurations evaluated first
        - {meta.inner_lr: 0.3, meta.outer_lr: 0.003}
      portfolio: [...]                        # searcher transfer: ranked configurations to try first
      recommender: {...}                      # searcher transfer: the recommender's portfolio (below)
      asha: {enabled: true, grace_period: 10, reduction_factor: 2}

Nested keys (``meta: {inner_lr: {loguniform: ...}}``) are the same as dotted ones, so
``--set 'sweep.space.meta.inner_lr={loguniform: [0.01, 0.1]}'`` works. Numbers YAML reads as strings
(``1e-3``: no dot) are taken as numbers for float keys and float distributions.

Distributions: ``loguniform: [lo, hi]`` and ``uniform: [lo, hi]`` (float keys), ``randint: [lo, hi]``
and ``lograndint: [lo, hi]`` (integer keys, both ends inclusive), ``choice: [v1, v2, ...]`` (any key).
The metric is always ``meta_val_loss`` (mean meta-validation query loss after adaptation, lower is
better); ASHA's time axis is the meta-step, so rungs fall at ``grace_period · reduction_factor^k``
meta-steps, ``max_t`` being ``meta.meta_steps``.

Keys that would make trials incomparable or change their resources cannot be swept: the task data
and split (``tasks.*``, ``seed``: the meta-validation tasks must be the same for every trial),
``meta.meta_steps`` / ``meta.eval_every`` / ``meta.eval_tasks`` (ASHA's time axis and the metric's
definition), and ``distributed.*``, ``checkpoint.*``, ``registry.*``, ``tracking.*``.

Searcher ``transfer`` proposes a portfolio of configurations first, in order, then samples the space
at random (:class:`~metaprep.transfer.searcher.PortfolioSearcher`; the zero-shot warm start of
Strangmann et al., 2024, and Quick-Tune's initial design, Arango et al., ICLR 2024). The portfolio is
the explicit ``portfolio:`` list, then the top-k of the transfer recommender when a ``recommender:``
block is given (either one, or both; a recommended point already listed is not repeated)::

    recommender:
      surrogate: .state/surrogate             # a folder saved by `jobs.recommend --surrogate-dir`, or
                                              # models:/NAME/VERSION | models:/NAME@alias (`--register`)
      meta_features: {num_samples: 5000}      # exactly the surrogate's meta-feature names
      params: {meta.inner_lr: lr}             # swept key -> the surrogate's configuration name
      fixed: {rank: 8}                        # surrogate configuration values held fixed
      candidates: 64                          # points sampled from the space (seeded by sweep.seed)
      top_k: 4                                # of them, the recommender's portfolio
      cost_aware: false                       # Quick-Tune's cost-aware ranking (needs a cost surrogate)

Parsing (:mod:`metaprep.tune.recipe`) only validates the section. The surrogate is loaded (a folder
relative to the working directory; a ``models:/`` URI downloaded from ``tracking.uri`` /
``MLFLOW_TRACKING_URI``) and the portfolio ranked when the sweep starts, before any trial runs
(:func:`metaprep.tune.portfolio.resolve_initial_points`). Every configuration name of the surrogate
must be mapped under ``params`` or held under ``fixed`` (else it would be imputed silently).

Every error, of parsing or of ranking, is a :class:`~metaprep.errors.ConfigError` naming
``file:line`` and the ``sweep.`` key.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from metaprep.config import MetaTrainConfig, from_dict
from metaprep.registry.promotion import METRIC

MODE = "min"
SEARCHERS = ("random", "optuna", "transfer")
KINDS = ("loguniform", "uniform", "randint", "lograndint", "choice")
SWEEP_KEYS = ("space", "num_samples", "searcher", "seed", "max_concurrent", "initial", "portfolio", "recommender",
              "asha", "metric")
RECOMMENDER_KEYS = ("surrogate", "meta_features", "params", "fixed", "candidates", "top_k", "cost_aware")
ASHA_KEYS = ("enabled", "grace_period", "reduction_factor")
FORBIDDEN_PREFIXES = ("tasks.", "distributed.", "checkpoint.", "registry.", "tracking.")
FORBIDDEN_KEYS = ("seed", "meta.meta_steps", "meta.eval_every", "meta.eval_tasks")

# Used when a recipe has no ``sweep:`` section (e.g. jobs/configs/tiny.yaml): the method's stated pain point.
DEFAULT_SWEEP: dict[str, Any] = {
    "space": {
        "meta.inner_lr": {"loguniform": [0.03, 1.0]},
        "meta.outer_lr": {"loguniform": [3e-4, 3e-2]},
        "meta.inner_steps": {"choice": [1, 2, 3]},
    },
}


class Where:
    """``file:line: sweep.key`` prefixes for error messages (``lines``: dotted key -> line in ``source``)."""

    def __init__(self, source: str = "<recipe>", lines: dict[str, int] | None = None):
        self.source, self.lines = source, lines or {}

    def __call__(self, dotted: str) -> str:
        line = self.lines.get(dotted)
        return f"{self.source}:{line}: {dotted}" if line else f"{self.source}: {dotted}"


@dataclass
class ParamSpec:
    """One swept key and its distribution."""

    key: str
    kind: str
    args: list

    def to_tune(self):
        """The Ray Tune domain for this distribution."""
        from ray import tune

        a = self.args
        if self.kind == "loguniform":
            return tune.loguniform(a[0], a[1])
        if self.kind == "uniform":
            return tune.uniform(a[0], a[1])
        if self.kind == "randint":
            return tune.randint(a[0], a[1] + 1)  # Tune's upper bound is exclusive; the YAML's is inclusive
        if self.kind == "lograndint":
            return tune.lograndint(a[0], a[1] + 1)
        return tune.choice(list(a))

    def probe_values(self) -> list:
        """Values that every draw lies between (or is one of): checked against the recipe's validation."""
        return list(self.args) if self.kind == "choice" else [self.args[0], self.args[1]]

    @property
    def numeric(self) -> bool:
        return self.kind != "choice" or all(is_number(v) for v in self.args)

    @property
    def log_scale(self) -> bool:
        return self.kind in ("loguniform", "lograndint")

    def to_dict(self) -> dict:
        return {self.kind: list(self.args)}


@dataclass
class AshaSpec:
    enabled: bool = True
    grace_period: int | None = None  # None: meta.eval_every (the first evaluation)
    reduction_factor: float = 2.0
    off_reason: str | None = None  # why ASHA is off, in words the sweep prints (None while it is on)


@dataclass
class RecommenderSpec:
    """A validated ``sweep.recommender`` block (module docstring)."""

    surrogate: str
    meta_features: dict[str, float]
    params: dict[str, str]  # swept key -> surrogate configuration name
    fixed: dict[str, Any] = field(default_factory=dict)
    candidates: int = 64
    top_k: int = 4
    cost_aware: bool = False


@dataclass
class SweepSpec:
    """A validated ``sweep:`` section."""

    space: dict[str, ParamSpec]
    num_samples: int = 6
    searcher: str = "random"
    seed: int = 0
    max_concurrent: int = 0
    initial: list[dict] = field(default_factory=list)
    portfolio: list[dict] = field(default_factory=list)
    asha: AshaSpec = field(default_factory=AshaSpec)
    metric: str = METRIC
    mode: str = MODE
    recommender: RecommenderSpec | None = None
    # the recommender's picks in rank order: Recommendation fields plus ``params`` (the swept keys), filled in
    # with the portfolio by metaprep.tune.portfolio.resolve_initial_points
    recommended: list[dict] = field(default_factory=list)
    where: Where = field(default_factory=Where, repr=False, compare=False)  # where the section was written

    def tune_space(self) -> dict:
        return {key: p.to_tune() for key, p in self.space.items()}

    def to_dict(self) -> dict:
        return {"space": {k: p.to_dict() for k, p in self.space.items()}, "num_samples": self.num_samples,
                "searcher": self.searcher, "seed": self.seed, "max_concurrent": self.max_concurrent,
                "initial": self.initial, "portfolio": self.portfolio, "asha": dataclasses.asdict(self.asha),
                "metric": self.metric, "mode": self.mode,
                "recommender": dataclasses.asdict(self.recommender) if self.recommender else None}


def apply_params(base: dict, params: dict[str, Any]) -> dict:
    """A deep copy of the nested recipe ``base`` with dotted ``params`` set."""
    data = copy.deepcopy(base)
    for dotted, value in params.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def trial_config(base: dict, params: dict[str, Any], source: str = "<sweep>") -> MetaTrainConfig:
    """The validated configuration of one trial: ``base`` with the sampled ``params``.

    Checkpoints are taken at every meta-validation: that is how the meta-val loss reaches ASHA
    during training (:mod:`metaprep.tune.trial` reads it from each checkpoint's trainer state).
    """
    cfg = from_dict(MetaTrainConfig, apply_params(base, params), source).validate()
    cfg.checkpoint.every = cfg.meta.eval_every
    return cfg


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
