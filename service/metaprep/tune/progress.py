"""Sweep progress as plain lines, one event per line (readable in ``ray job logs`` and in files).

:class:`SweepProgress` is a Ray Tune callback on the driver: a line at every trial's end (completed,
diverged, stopped early by ASHA, failed) and otherwise at most every :data:`HEARTBEAT_S` seconds::

    metaprep: trials 3/6 done (2 completed, 1 stopped early, 0 diverged, 0 failed), 2 running,
    1 pending; best meta_val_loss 2.314 (trial 3f2a1_00001, meta-step 20)

(one line in the log; wrapped here).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from metaprep.tune.space import METRIC

HEARTBEAT_S = 30.0  # between lines while no trial ends: often enough to see it alive, rarely enough to read
ENDS = ("completed", "stopped early", "diverged", "failed")


def trial_end(result: dict | None, errored: bool) -> str:
    """How a trial ended, in the words of the progress line (the driver's status, as in the summary)."""
    if errored:
        return "failed"
    status = (result or {}).get("status")
    if status in ("completed", "diverged"):
        return status
    return "stopped early"  # the scheduler stopped it before its final report


def progress_line(total: int, ended: dict[str, str], running: int, best: tuple[float, str, Any] | None) -> str:
    """The line: trials ended of ``total`` by how, running, pending, and the best meta-val loss so far."""
    counts = {e: sum(v == e for v in ended.values()) for e in ENDS}
    pending = max(0, total - len(ended) - running)
    line = (f"metaprep: trials {len(ended)}/{total} done ("
            + ", ".join(f"{n} {e}" for e, n in counts.items()) + f"), {running} running, {pending} pending")
    if best is None:
        return line + f"; no {METRIC} reported yet"
    value, trial_id, step = best
    return line + f"; best {METRIC} {value:.4g} (trial {trial_id}, meta-step {step})"


class SweepProgress(Callback):
    """Print :func:`progress_line` when a trial ends and at most every ``heartbeat_s`` otherwise.

    The best so far is the lowest finite meta-val loss any trial has reported (an intermediate
    meta-validation or its final one), with the meta-step it was measured at."""

    def __init__(self, total: int, log: Callable[[str], None] = print, heartbeat_s: float = HEARTBEAT_S,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.log, self.heartbeat_s, self.clock = total, log, heartbeat_s, clock
        self.ended: dict[str, str] = {}
        self.running: set[str] = set()
        self.best: tuple[float, str, Any] | None = None
        self.last_line = clock()

    def _say(self) -> None:
        self.log(progress_line(self.total, self.ended, len(self.running - set(self.ended)), self.best))
        self.last_line = self.clock()

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.running.add(trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self.running.add(trial.trial_id)
        value = result.get(METRIC)
        if isinstance(value, (int, float)) and math.isfinite(value) and (self.best is None or value < self.best[0]):
            self.best = (float(value), trial.trial_id, result.get("meta_step"))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.ended[trial.trial_id] = trial_end(trial.last_result, errored=False)
        self._say()

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.ended[trial.trial_id] = trial_end(trial.last_result, errored=True)
        self._say()

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self.clock() - self.last_line >= self.heartbeat_s:
            self._say()
