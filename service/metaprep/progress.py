"""Progress of long jobs as plain lines: the plan, then one line per unit of work with its time and the ETA.

Lines, not bars: each is printed whole and flushed, so it reads the same in a terminal, in
``ray job logs`` and in a redirected file, where a tqdm or rich bar is hundreds of carriage-return
redraws on one line (the libraries' own bars are turned off: :func:`metaprep.runtime.quiet_third_party`).
The ETA is the wall time so far over the units done, times the units left: the mean unit time when
units run one after another, and still right when they run in parallel processes. ::

    [persona] plan: 1 fold x 3 seeds x 4 methods = 12 units
    [persona] fold convai2 seed 0 method finetune (1/12) ...
    [persona] fold convai2 seed 0 method finetune (1/12) done in 41.2s: lr=0.001 query loss 4.409 -> 3.135; ETA 7m33s
    [persona] 12/12 units done in 8m12s
"""

from __future__ import annotations

import math
import threading
import time


def duration(seconds: float) -> str:
    """``4.1s`` under a minute, ``4m05s`` under an hour, else ``1h02m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    return f"{whole // 3600}h{whole // 60 % 60:02d}m" if whole >= 3600 else f"{whole // 60}m{whole % 60:02d}s"


def say(name: str, message: str) -> None:
    """One progress line ``[name] message`` on stdout, flushed."""
    print(f"[{name}] {message}", flush=True)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class Progress:
    """The units of one job (``name``: the line prefix, e.g. the benchmark suite), planned as the product of
    ``factors`` (``(2, "seed")``: 2 seeds) and announced on creation, ``plan`` in place of the factors where
    given. Units may run in threads."""

    def __init__(self, name: str, *factors: tuple[int, str], plan: str | None = None) -> None:
        self.name = name
        self.total = math.prod(n for n, _ in factors)
        self.started = self.finished = 0
        self.t0 = time.perf_counter()
        self._begun: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        listed = plan or " x ".join(_count(n, noun) for n, noun in factors)
        self.say(f"plan: {listed}" + (f" = {_count(self.total, 'unit')}" if plan or len(factors) > 1 else ""))

    def say(self, message: str) -> None:
        say(self.name, message)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def eta(self) -> float | None:
        """Seconds left: wall time per finished unit times the units left (None before the first)."""
        if not self.finished:
            return None
        return self.elapsed() / self.finished * max(self.total - self.finished, 0)

    def start(self, label: str) -> None:
        """``label (k/N) ...``: unit ``label`` begins."""
        with self._lock:
            self.started += 1
            self._begun[label] = (self.started, time.perf_counter())
            self.say(f"{label} ({self.started}/{self.total}) ...")

    def done(self, label: str, note: str = "") -> float:
        """``label (k/N) done in X: note; ETA Y``; returns the unit's seconds (from :meth:`start`, if called)."""
        with self._lock:
            self.finished += 1
            k, t0 = self._begun.pop(label, (self.finished, None))
            seconds = time.perf_counter() - t0 if t0 is not None else None
            took = f" in {duration(seconds)}" if seconds is not None else ""
            eta = self.eta()
            self.say(f"{label} ({k}/{self.total}) done{took}{': ' + note if note else ''}; "
                     f"ETA {duration(eta) if eta is not None else '-'}")
            return seconds or 0.0

    def drop(self, count: int, why: str) -> None:
        """``count`` planned units that will not run (``why``): out of the plan, and of the ETA."""
        with self._lock:
            self.total -= count
            self.say(f"{_count(count, 'unit')} skipped ({why}); {self.total} planned")

    def finish(self) -> None:
        self.say(f"{self.finished}/{_count(self.total, 'unit')} done in {duration(self.elapsed())}")
