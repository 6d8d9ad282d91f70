"""Which weights a run registers: the best meta-val evaluation (``checkpoint.select=best``) or the last step.

Meta-val is evaluated on the same episodes on every worker, so every rank takes the same decision; under
ZeRO-3 the parameters are gathered for the copy (a collective every rank enters). Rank 0 keeps the copy
in memory; a resumed run selects among the evaluations after the resume (the copy is not checkpointed).
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
