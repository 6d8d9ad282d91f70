"""Zero-shot configuration recommender: rank candidates for a new dataset, return a top-k portfolio.

Transfer only, as Strangmann et al. (2024) recommend (their finding: switching task-specific
Bayesian optimisation off generalises better): the surrogate of :mod:`metaprep.transfer.surrogate`
is fitted on the meta-dataset once, the new dataset contributes only its meta-features m.

Ranking. Candidate x scores ``mu(x) = mean_j f_j(x, m)``, the ensemble's predicted normalised
performance (1 = as good as the best configuration of a training dataset, 0 = the worst).

Portfolio (best-of-k). The top-k by ``mu`` tends to be k near-copies of one configuration. Reading
the M ensemble members as M plausible response surfaces of the new dataset (each was trained on a
Bayesian bootstrap of the training datasets), the portfolio greedily maximises the expected best
of the set, ``S_{i+1} = S_i ∪ argmax_x  mean_j max(max_{s∈S_i} f_j(s), f_j(x))`` (a submodular
objective, so greedy is within 1 - 1/e of the optimum; Nemhauser et al., 1978). The first pick is
``argmax mu``; later picks hedge where the members disagree.

First pick. Where the surrogate's own held-out picks lost to the best default on the training datasets
most like the new one, the best default (:mod:`metaprep.transfer.defaults`) is the first pick instead
and the portfolio continues from it (:mod:`metaprep.transfer.guard`; ``guard_folds=0`` turns it off).

Cost-aware ranking follows Quick-Tune's cost-aware acquisition, gain divided by cost (Arango et al.,
ICLR 2024, Eq. 5; their tool divides by ``(ĉ / max ĉ)^α``), with the cost measured on a log scale:
the marginal gain above is divided by ``1 + w * (ln ĉ(x) - min ln ĉ) / (max ln ĉ - min ln ĉ)``
over the candidates, ``w`` = ``cost_weight`` (0 ignores cost; 1 = the most expensive candidate must
promise twice the gain of the cheapest). Why not the plain ratio: run costs span five orders of
magnitude in Quick-Tune's meta-dataset (runs that crash after 1 s next to 15-hour runs), and
``gain / (ĉ / max ĉ)`` then ranks the configurations that crash fastest first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from metaprep.errors import ConfigError, ModelLoadError
from metaprep.jsonio import read_json
from metaprep.transfer.defaults import best_default_order
from metaprep.transfer.evidence import EVIDENCE_FILE, TrainingEvidence, load_evidence
from metaprep.transfer.guard import GUARD_FILE, GUARD_FOLDS, DefaultGuard, GuardDecision
from metaprep.transfer.metadataset import GENERIC_METRIC, MetaDataset, Pool
from metaprep.transfer.surrogate import TransferSurrogate


@dataclass
class Recommendation:
    rank: int
    config: dict
    predicted_performance: float  # normalised: 1 = best of a training dataset's pool, 0 = worst
    predicted_std: float
    predicted_cost_s: float | None
    score: float  # the greedy portfolio gain (cost-adjusted when cost-aware)
    picked_by: str = "surrogate"  # or "best_default": the guard's first pick (module docstring)

    def to_dict(self) -> dict:
        return asdict(self)


def cost_divisor(cost: np.ndarray, weight: float) -> np.ndarray:
    """``1 + weight * `` min-max normalised log cost (module docstring)."""
    log_cost = np.log(np.clip(cost, 1e-9, None))
    span = float(log_cost.max() - log_cost.min())
    return 1.0 + weight * ((log_cost - log_cost.min()) / span if span > 0 else np.zeros_like(log_cost))


def greedy_portfolio(members: np.ndarray, k: int, cost: np.ndarray | None = None,
                     cost_weight: float = 1.0, first: int | None = None) -> tuple[list[int], list[float]]:
    """Indices of k candidates maximising ``mean_j max_{s in S} members[j, s]`` greedily.

    ``members``: (M, N) predictions per ensemble member. With ``cost``, each step maximises the
    marginal gain divided by :func:`cost_divisor`. ``first``: the first pick, fixed (its score is the
    same first-step score it would have had).
    """
    m, n = members.shape
    k = min(k, n)
    divisor = np.ones(n) if cost is None else cost_divisor(cost, cost_weight)
    best = np.full(m, -np.inf)
    chosen: list[int] = []
    gains: list[float] = []
    available = np.ones(n, dtype=bool)
    for _ in range(k):
        if not chosen:
            gain = members.mean(0)
            if cost is not None:  # gains must be positive to be divided by a cost
                gain = gain - min(0.0, float(gain.min())) + 1e-6
        else:
            gain = np.maximum(members, best[:, None]).mean(0) - best.mean()
        score = np.where(available, gain / divisor, -np.inf)
        i = int(np.argmax(score)) if chosen or first is None else first
        chosen.append(i)
        gains.append(float(score[i]))
        available[i] = False
        best = np.maximum(best, members[:, i])
    return chosen, gains


class Recommender:
    """A fitted :class:`TransferSurrogate`, the default candidate pool (the meta-dataset's configs) and the
    training evidence that puts its predictions in the metric's units (None for a surrogate saved without)."""

    def __init__(self, surrogate: TransferSurrogate, candidates: list[dict] | None = None,
                 evidence: TrainingEvidence | None = None, guard: DefaultGuard | None = None):
        self.surrogate = surrogate
        self.candidates = candidates or []
        self.evidence = evidence
        self.guard = guard if evidence is not None else None  # the default's pick needs the training pools

    @classmethod
    def fit(cls, train: MetaDataset | list[Pool], *, seed: int = 0, guard_folds: int = GUARD_FOLDS,
            **surrogate_kwargs) -> Recommender:
        """Fit the surrogate on ``train`` and, unless ``guard_folds`` is 0, the guard of its first pick by
        ``guard_folds``-fold cross-validation over the training datasets (``guard_folds`` more fits)."""
        pools = list(train.pools().values()) if isinstance(train, MetaDataset) else list(train)
        desc = train.performance_desc if isinstance(train, MetaDataset) else ""

        def fit_fold(subset: list[Pool]) -> TransferSurrogate:  # the guard compares performance only: no cost model
            return TransferSurrogate.fit(subset, seed=seed, performance_desc=desc, **{**surrogate_kwargs,
                                                                                      "cost_steps": 0})

        surrogate = TransferSurrogate.fit(pools, seed=seed, performance_desc=desc, **surrogate_kwargs)
        metric = train.metric if isinstance(train, MetaDataset) else GENERIC_METRIC
        evidence = TrainingEvidence.from_pools(pools, metric)
        guard = DefaultGuard.fit(pools, fit_fold, surrogate.encoder.meta, folds=guard_folds, seed=seed)
        return cls(surrogate, evidence.configs, evidence, guard)

    def first_pick(self, meta: dict[str, float], candidates: list[dict]) -> tuple[int | None, GuardDecision | None]:
        """The guard's first pick among ``candidates``: the best default's index where it replaces the surrogate's
        own first pick (None otherwise), and the guard's decision (None without a guard)."""
        if self.guard is None or self.evidence is None:
            return None, None
        decision = self.guard.decide(meta, self.surrogate.encoder.meta)
        if decision.pick != "best_default":
            return None, decision
        default = int(best_default_order(self.evidence.pools(), candidates)[0])
        own = int(np.argmax(self.surrogate.predict_members(candidates, meta).mean(0)))
        decision.same_as_surrogate = default == own
        return (None if decision.same_as_surrogate else default), decision

    def rank(self, meta: dict[str, float], candidates: list[dict] | None = None, *, k: int | None = None,
             cost_aware: bool = False, cost_weight: float = 1.0, guarded: bool = True) -> list[Recommendation]:
        """The top-k portfolio (all candidates ordered when ``k`` is None) for meta-features ``meta``;
        ``guarded=False`` ignores the guard (the surrogate's portfolio alone), as cost-aware ranking does (the
        guard's evidence compares performance only)."""
        return self.rank_checked(meta, candidates, k=k, cost_aware=cost_aware, cost_weight=cost_weight,
                                 guarded=guarded)[0]

    def rank_checked(self, meta: dict[str, float], candidates: list[dict] | None = None, *, k: int | None = None,
                     cost_aware: bool = False, cost_weight: float = 1.0,
                     guarded: bool = True) -> tuple[list[Recommendation], GuardDecision | None]:
        """:meth:`rank` and the guard's decision behind its first pick (None when unguarded, cost-aware or
        fitted without a guard), from one evaluation of the guard."""
        candidates = candidates if candidates is not None else self.candidates
        if not candidates:
            raise ConfigError("no candidate configurations to rank (pass candidates or fit on a meta-dataset)")
        if k is not None and k < 1:
            raise ConfigError(f"top-k must be >= 1, got {k}")
        cost = self.surrogate.predict_cost(candidates, meta)
        if cost_aware and cost is None:
            raise ConfigError("cost-aware ranking needs a meta-dataset with costs (this one records none)")
        members = self.surrogate.predict_members(candidates, meta)
        first, decision = self.first_pick(meta, candidates) if guarded and not cost_aware else (None, None)
        order, gains = greedy_portfolio(members, k or len(candidates), cost if cost_aware else None,
                                        cost_weight, first=first)
        mean, std = members.mean(0), members.std(0)
        picks = [Recommendation(rank=r + 1, config=candidates[i], predicted_performance=float(mean[i]),
                                predicted_std=float(std[i]),
                                predicted_cost_s=None if cost is None else float(cost[i]), score=g,
                                picked_by="best_default" if r == 0 and first is not None else "surrogate")
                 for r, (i, g) in enumerate(zip(order, gains, strict=True))]
        return picks, decision

    def save(self, dirpath: str | Path) -> Path:
        import json

        dirpath = self.surrogate.save(dirpath)
        (dirpath / "candidates.json").write_text(json.dumps(self.candidates, sort_keys=True) + "\n")
        if self.evidence is not None:
            (dirpath / EVIDENCE_FILE).write_text(json.dumps(self.evidence.to_dict(), sort_keys=True) + "\n")
        if self.guard is not None:
            (dirpath / GUARD_FILE).write_text(json.dumps(self.guard.to_dict(), sort_keys=True) + "\n")
        else:  # a folder saved again without a guard must not keep an earlier fit's
            (dirpath / GUARD_FILE).unlink(missing_ok=True)
        return dirpath

    @classmethod
    def load(cls, dirpath: str | Path) -> Recommender:
        dirpath = Path(dirpath)
        surrogate = TransferSurrogate.load(dirpath)
        path = dirpath / "candidates.json"
        candidates = load_candidates(path) if path.exists() else []
        evidence = load_evidence(dirpath / EVIDENCE_FILE, candidates) if (dirpath / EVIDENCE_FILE).exists() else None
        guard_path = dirpath / GUARD_FILE
        guard = DefaultGuard.load(guard_path, surrogate.meta_features) if guard_path.exists() else None
        if guard is not None and evidence is None:
            raise ModelLoadError(f"{guard_path}: a guard needs the training evidence it was fitted with "
                                 f"({dirpath / EVIDENCE_FILE} is missing); re-save the recommender")
        return cls(surrogate, candidates, evidence, guard)


def load_candidates(path: Path) -> list[dict]:
    """The saved candidate pool: a JSON list of configuration objects, else a one-line ``ModelLoadError``."""
    candidates = read_json(path, "candidate configurations", ModelLoadError)
    if not isinstance(candidates, list) or not all(isinstance(c, dict) and c for c in candidates):
        raise ModelLoadError(f"{path}: must be a JSON list of configuration objects (as written by "
                             "Recommender.save)")
    return candidates
