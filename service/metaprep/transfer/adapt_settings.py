"""Adaptation settings of a prepared model, learned from that model's own adapt runs (issue 20, item 3).

No configuration-transfer anchor (Quick-Tune, Arango et al. 2024; Strangmann et al. 2024; Ray Tune; Syne Tune)
recommends how to *adapt a meta-learned model*; metaprep has the model's history. Here:

1. **Runs** (:func:`adapt_grid`, :func:`build_runs`): the prepared model adapted to many of its own meta-train and
   meta-val tasks, from each support size of a shots grid, under every (lr, optimizer) of a settings grid, for up
   to the largest step count. Every (task, shots, lr, optimizer, steps) is one adapt run of the contract
   (:mod:`metaprep.registry.adapt_runs`): its "dataset" is (task, shots), its meta-features
   :func:`~metaprep.train.adapt_task.task_meta_features` (size, lengths, support loss, shots).
2. **Surrogate**: the transfer recommender (:class:`~metaprep.transfer.recommender.Recommender`) fitted on those
   runs, as MLflow gives them back.
3. **Which rule to trust** (:func:`cross_validate`): a surrogate can lose to the single best fixed setting when
   the tasks' meta-features say little (Strangmann et al. 2024 report the same for NMTLC-like pools). A K-fold
   cross-validation over the *training tasks* (whole tasks held out, every shots value together) measures the
   mean regret of (a) the surrogate's top pick and (b) the best fixed setting of the other folds; the rule with
   the lower held-out regret is the one :meth:`AdaptSettings.choose` applies. Nothing is chosen on test tasks.

:class:`AdaptSettings` is what ``jobs.learn_settings`` registers (``NAME-base-settings``, tagged with the base's
version) and ``jobs.adapt --settings recommended`` loads: the recommender's files plus ``settings.json`` (grid,
fixed setting, rule, cross-validation). JSON and safetensors only.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from metaprep.errors import ConfigError, DataError, ModelLoadError
from metaprep.jsonio import read_json

if TYPE_CHECKING:
    from metaprep.registry.adapt_runs import AdaptRun
    from metaprep.tasks.base import Episode, Task
    from metaprep.transfer.recommender import Recommender

EXPERIMENT = "metaprep-adapt-transfer"
STEPS = (2, 5, 10, 20)
SHOTS = (4, 8)
OPTIMIZERS = ("adam", "sgd")
LR_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)  # x the recipe's inner lr: the grid reaches past it on both sides
CV_FOLDS = 3
SPEC_FILE = "settings.json"
FORMAT = 1
DIVERGED_MARGIN = 1.0  # nats above an episode's worst finite loss: what a diverged setting counts as
RULES = ("surrogate", "fixed")
MODES = ("given", "recommended")  # jobs.adapt --settings: the user's --lr/--steps, or this model's choice


def setting_key(setting: dict) -> tuple:
    return float(setting["lr"]), str(setting["optimizer"]), int(setting["steps"])


def settings_grid(lrs, optimizers=OPTIMIZERS, steps=STEPS) -> list[dict]:
    """Every (lr, optimizer, steps) combination, lr ascending."""
    return [{"lr": float(lr), "optimizer": opt, "steps": float(s)}
            for lr in sorted({float(v) for v in lrs}) for opt in optimizers for s in sorted(set(steps))]


def adapt_grid(adapt_curve: Callable[[float, str, int], list[list[float]]], support_loss: list[float],
               grid: list[dict]) -> tuple[list[dict[tuple, float]], list[float], dict]:
    """Every episode under every setting of ``grid``; ``adapt_curve(lr, optimizer, steps)`` adapts all episodes
    and returns per step (0 = before) per episode query losses; ``support_loss``: per episode the loss on its
    support examples before adapting (:func:`metaprep.meta.adapt.support_losses_in_chunks`). One adaptation per
    (lr, optimizer) gives every step count. Returns per episode {setting key: query loss}, ``support_loss``, and
    ``{"curves": {(lr, optimizer): per-episode curve}, "seconds": {(lr, optimizer): seconds per episode}}``.

    A diverged value (NaN, inf) counts as the episode's worst finite loss over the grid + :data:`DIVERGED_MARGIN`
    nats: the worst setting, without a huge number that would squash every other setting together in the
    surrogate's per-task min-max scaling."""
    n_episodes = len(support_loss)
    most = max(int(s["steps"]) for s in grid)
    curves: dict[tuple, list[list[float]]] = {}
    seconds: dict[tuple, float] = {}
    for lr, opt in sorted({(s["lr"], s["optimizer"]) for s in grid}):
        t0 = time.perf_counter()
        curves[(lr, opt)] = adapt_curve(lr, opt, most)
        seconds[(lr, opt)] = (time.perf_counter() - t0) / max(1, n_episodes)
    per_episode = {k: [[_or(c[step][i]) for step in range(len(c))] for i in range(n_episodes)]
                   for k, c in curves.items()}
    for i in range(n_episodes):
        finite = [v for k in per_episode for v in per_episode[k][i] if v is not None]
        if not finite:
            raise DataError(f"episode {i}: the query loss is not finite under any setting, even before adapting; "
                            "check the task's examples (and the model's precision)")
        cap = max(finite) + DIVERGED_MARGIN
        for k in per_episode:
            per_episode[k][i] = [cap if v is None else v for v in per_episode[k][i]]
    losses = [{setting_key(s): per_episode[(s["lr"], s["optimizer"])][i][int(s["steps"])] for s in grid}
              for i in range(n_episodes)]
    return losses, list(support_loss), {"seconds": seconds, "curves": per_episode}


def _or(x: float) -> float | None:
    return x if math.isfinite(x) else None


def build_runs(tasks: list[Task], episodes_by_shots: dict[int, list[Episode]], tokenizer, grid: list[dict],
               results: dict[int, tuple], label: str, batch: str) -> list[AdaptRun]:
    """The adapt runs of the training episodes: one per (task, shots, setting). A run's dataset id is
    ``TASK@SHOTS:LABEL:BATCH`` (meta-features are constant per id, so every job's runs of every prepared model
    can share one experiment); ``task_name`` and ``shots`` are kept as params for :func:`cross_validate`, and
    ``batch`` names the job that made them."""
    from metaprep.registry.adapt_runs import AdaptRun
    from metaprep.train.adapt_task import task_meta_features

    by_name = {t.name: t for t in tasks}
    most = max(int(s["steps"]) for s in grid)
    runs = []
    for shots, episodes in episodes_by_shots.items():
        losses, support_loss, info = results[shots]
        for i, ep in enumerate(episodes):
            meta = task_meta_features(by_name[ep.task], shots, tokenizer, support_loss[i])
            for s in grid:
                curve = info["curves"][(s["lr"], s["optimizer"])][i][: int(s["steps"]) + 1]
                runs.append(AdaptRun(
                    task=f"{ep.task}@{shots}:{label}:{batch}", config=dict(s), meta_features=meta,
                    curve=list(curve), final_loss=losses[i][setting_key(s)],
                    cost_s=info["seconds"][(s["lr"], s["optimizer"])] * s["steps"] / most,
                    extra_params={"prepared_model": label, "batch": batch, "task_name": ep.task, "shots": shots}))
    return runs


def _by_dataset(runs: list[AdaptRun]) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for r in runs:
        out.setdefault(r.task, {})[setting_key(r.config)] = r.final_loss
    return out


def best_fixed_setting(runs: list[AdaptRun], grid: list[dict]) -> dict:
    """The one setting with the lowest mean regret (loss - the best loss of that task and shots) over ``runs``."""
    by_dataset = _by_dataset(runs)
    regret = {}
    for s in grid:
        gaps = [d[setting_key(s)] - min(d.values()) for d in by_dataset.values() if setting_key(s) in d]
        regret[setting_key(s)] = sum(gaps) / len(gaps) if gaps else math.inf
    return next(s for s in grid if setting_key(s) == min(regret, key=regret.get))


def fit_recommender(runs_or_metadataset, seed: int, fit_kwargs: dict | None = None) -> Recommender:
    from metaprep.transfer.formats import adapt_runs_metadataset
    from metaprep.transfer.metadataset import MetaDataset
    from metaprep.transfer.recommender import Recommender

    data = (runs_or_metadataset if isinstance(runs_or_metadataset, MetaDataset)
            else adapt_runs_metadataset(runs_or_metadataset, "memory", "memory"))
    # guard_folds=0: the settings model chooses between the surrogate and the best fixed setting by its own
    # cross-validation (cross_validate), over whole tasks; the recommender's per-dataset guard would repeat it
    return Recommender.fit(data, seed=seed, **{"guard_folds": 0, **(fit_kwargs or {})})


def cross_validate(runs: list[AdaptRun], grid: list[dict], *, folds: int = CV_FOLDS, seed: int = 0,
                   fit_kwargs: dict | None = None) -> dict:
    """Held-out regret of the two rules (module docstring, 3): K folds over whole training tasks; per held-out
    (task, shots) the loss of the surrogate's top pick and of the other folds' best fixed setting, minus the
    best loss of the grid on it. Returns the mean regrets, ``n`` (held-out (task, shots) pairs) and ``folds``."""
    names = sorted({str(r.extra_params["task_name"]) for r in runs})
    if len(names) < 2:
        raise DataError(f"cross-validation of the settings rule needs >= 2 training tasks, got {len(names)}")
    random.Random(seed).shuffle(names)
    k = min(folds, len(names))
    regrets: dict[str, list[float]] = {rule: [] for rule in RULES}
    for f in range(k):
        held = set(names[f::k])
        train = [r for r in runs if r.extra_params["task_name"] not in held]
        test = [r for r in runs if r.extra_params["task_name"] in held]
        rec = fit_recommender(train, seed, {**(fit_kwargs or {}), "cost_steps": 0})
        fixed = best_fixed_setting(train, grid)
        meta = {r.task: r.meta_features for r in test}
        for dataset, losses in _by_dataset(test).items():
            pick = rec.rank({k_: float(v) for k_, v in meta[dataset].items()}, grid, k=1)[0].config
            best = min(losses.values())
            regrets["surrogate"].append(losses[setting_key(pick)] - best)
            regrets["fixed"].append(losses[setting_key(fixed)] - best)
    return {**{rule: sum(v) / len(v) for rule, v in regrets.items()}, "n": len(regrets["fixed"]), "folds": k}


@dataclass
class AdaptSettings:
    """How to adapt one prepared model: the surrogate, the grid it ranks, the best fixed setting and the rule
    (``surrogate`` or ``fixed``) its cross-validation chose."""

    recommender: Recommender
    grid: list[dict]
    fixed: dict
    rule: str
    cv: dict
    prepared_model: str
    runs: int
    extra: dict = field(default_factory=dict)

    @classmethod
    def learn(cls, runs: list[AdaptRun], grid: list[dict], prepared_model: str, *, seed: int = 0,
              metadataset=None, fit_kwargs: dict | None = None, folds: int = CV_FOLDS) -> AdaptSettings:
        """Fit the surrogate on ``metadataset`` (``runs`` as MLflow gives them back; default ``runs`` in memory:
        the same rows either way, so the cross-validation describes the surrogate that is kept), the fixed
        setting on ``runs``, and choose the rule by :func:`cross_validate`."""
        cv = cross_validate(runs, grid, folds=folds, seed=seed, fit_kwargs=fit_kwargs)
        recommender = fit_recommender(metadataset if metadataset is not None else runs, seed, fit_kwargs)
        rule = "surrogate" if cv["surrogate"] < cv["fixed"] else "fixed"
        return cls(recommender, grid, best_fixed_setting(runs, grid), rule, cv, prepared_model, len(runs))

    def choose(self, meta: dict[str, float]) -> tuple[dict, str]:
        """The setting for a task with meta-features ``meta``, and why (one sentence a user can read)."""
        self.recommender.surrogate.check_meta(meta)
        top = self.recommender.rank(meta, self.grid, k=1)[0]
        cv = (f"held-out regret over {self.cv['n']} training (task, shots) pairs: surrogate {self.cv['surrogate']:.4f}"
              f" vs best fixed setting {self.cv['fixed']:.4f} nats")
        if self.rule == "surrogate":
            return dict(top.config), (f"the surrogate's top setting for this task's meta-features (predicted "
                                      f"{top.predicted_performance:.3f} of the way from the grid's worst to its best); "
                                      f"surrogate chosen by cross-validation, {cv}")
        return dict(self.fixed), (f"the best fixed setting over the {self.runs} adapt runs (the surrogate would "
                                  f"pick {describe(top.config)}); fixed setting chosen by cross-validation, {cv}")

    def save(self, dirpath: str | Path) -> Path:
        """Write the model to ``dirpath`` (replaced whole: written next to it first, then renamed into place, so a
        crash never leaves a mix of two models)."""
        import json
        import shutil
        import uuid

        dirpath = Path(dirpath)
        staged = dirpath.with_name(f".{dirpath.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.recommender.save(staged)
            spec = {**self.extra, "format": FORMAT, "grid": self.grid, "fixed": self.fixed, "rule": self.rule,
                    "cv": self.cv, "prepared_model": self.prepared_model, "runs": self.runs}
            (staged / SPEC_FILE).write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n")
            if dirpath.exists():
                old = dirpath.with_name(f".{dirpath.name}.{uuid.uuid4().hex[:8]}.old")
                dirpath.rename(old)
                try:
                    staged.rename(dirpath)
                except OSError:
                    old.rename(dirpath)  # the previous model back in place
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                staged.rename(dirpath)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return dirpath

    @classmethod
    def load(cls, dirpath: str | Path) -> AdaptSettings:
        from metaprep.transfer.recommender import Recommender

        dirpath = Path(dirpath)
        path = dirpath / SPEC_FILE
        if not path.is_file():
            raise ModelLoadError(f"{dirpath}: not an adaptation-settings model ({SPEC_FILE} missing); write one "
                                 "with python -m jobs.learn_settings")
        spec = read_json(path, "adaptation settings", ModelLoadError)
        problem = _spec_problem(spec)
        if problem:
            raise ModelLoadError(f"{path}: {problem} (write it again with python -m jobs.learn_settings)")
        extra = {k: v for k, v in spec.items() if k not in SPEC_KEYS and k != "format"}
        return cls(Recommender.load(dirpath), spec["grid"], spec["fixed"], spec["rule"], spec["cv"],
                   spec["prepared_model"], int(spec["runs"]), extra)


SPEC_KEYS = ("grid", "fixed", "rule", "cv", "prepared_model", "runs")


def _is_setting(value: object) -> bool:
    return isinstance(value, dict) and isinstance(value.get("optimizer"), str) and all(
        isinstance(value.get(k), int | float) and value[k] > 0 for k in ("lr", "steps"))


def _spec_problem(spec: object) -> str:
    """What is wrong with a loaded ``settings.json`` ('' when nothing)."""
    if not isinstance(spec, dict):
        return "must be a JSON object"
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        return f"missing keys {missing}"
    if spec.get("format") != FORMAT:
        return f"format {spec.get('format')!r}; this version reads format {FORMAT}"
    if spec["rule"] not in RULES:
        return f"rule {spec['rule']!r}; valid rules {RULES}"
    if not isinstance(spec["grid"], list) or not spec["grid"] or not all(_is_setting(g) for g in spec["grid"]):
        return "grid must be a non-empty list of {lr, optimizer, steps} settings"
    if not _is_setting(spec["fixed"]):
        return "fixed must be a {lr, optimizer, steps} setting"
    if not isinstance(spec["cv"], dict) or not all(isinstance(spec["cv"].get(k), int | float)
                                                   for k in ("surrogate", "fixed", "n")):
        return "cv must hold numbers surrogate, fixed and n"
    if not isinstance(spec["runs"], int) or not isinstance(spec["prepared_model"], str):
        return "runs must be an integer and prepared_model a string"
    return ""


def describe(setting: dict) -> str:
    return f"lr {setting['lr']:g}, {setting['optimizer']}, {int(setting['steps'])} steps"


def parse_floats(text: str, flag: str, integer: bool = False) -> list:
    """``"1e-3,3e-3"`` -> [0.001, 0.003] (each > 0), else a one-line error naming ``flag``."""
    try:
        values = [int(v) if integer else float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated {'integers' if integer else 'numbers'}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"{flag} {text!r}: expected one or more values > 0")
    return values
