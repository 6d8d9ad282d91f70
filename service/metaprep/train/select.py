"""Which weights a run registers: the best meta-val evaluation (``checkpoint.select=best``) or the last step;
and when a run stops before ``meta.meta_steps``: ``meta.early_stopping_patience`` evaluations without improvement.

Meta-val is evaluated on the same episodes on every worker, so every rank takes the same decision; under
ZeRO-3 the parameters are gathered for the copy (a collective every rank enters). Rank 0 keeps the copy
in memory; a resumed run selects among the evaluations after the resume (the copy is not checkpointed).
Early stopping needs no state of its own: it is replayed from the checkpointed meta-val curve.
"""

from __future__ import annotations

import contextlib
import math

import torch

from metaprep.train.zero3 import zero3_gathered


class BestWeights:
    def __init__(self, enabled: bool, zero3: bool, rank: int) -> None:
        self.enabled, self.zero3, self.rank = enabled, zero3, rank
        self.step: int | None = None
        self.val: float | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def offer(self, module: torch.nn.Module, step: int, val: float) -> None:
        """After an evaluation (on every rank): keep the weights if ``val`` is the best so far."""
        if not self.enabled or not math.isfinite(val) or (self.val is not None and val >= self.val):
            return
        with zero3_gathered(module) if self.zero3 else contextlib.nullcontext():
            if self.rank == 0:
                self.state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        self.step, self.val = step, val

    def restore(self, module: torch.nn.Module, last_step: int) -> dict:
        """Load the kept weights into ``module`` (rank 0, inside the export's gathered context) unless the
        last step is the best; returns the choice for the run's summary."""
        if self.state is None or self.step == last_step:
            return {"selected_step": last_step, "select": "last" if not self.enabled else "best"}
        module.load_state_dict(self.state)
        return {"selected_step": self.step, "selected_meta_val_loss": self.val, "select": "best"}


class EarlyStopping:
    """Stop after ``patience`` evaluations in a row that do not lower the best meta-val loss by more than
    ``min_delta`` (a non-finite loss never improves); ``patience`` 0 never stops."""

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.stale = 0  # evaluations since the best one

    def update(self, step: int, val: float) -> bool:
        """Record the evaluation at ``step``; whether the run should stop now."""
        if math.isfinite(val) and (self.best is None or val < self.best - self.min_delta):
            self.best, self.best_step, self.stale = val, step, 0
        else:
            self.stale += 1
        return 0 < self.patience <= self.stale

    def reason(self, step: int, total: int) -> str:
        best = f"{self.best:.4f} (meta-step {self.best_step})" if self.best is not None else "none (non-finite)"
        return (f"[meta-train] stopping early at meta-step {step}/{total}: {self.stale} meta-val evaluations "
                f"without improving on the best {best} by more than {self.min_delta:g} "
                f"(meta.early_stopping_patience={self.patience})")
