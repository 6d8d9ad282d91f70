"""The sweep's summary plot: trials over the two swept learning rates, coloured by meta-val loss."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from metaprep.tune.space import METRIC, SweepSpec

if TYPE_CHECKING:
    from metaprep.tune.sweep import TrialOutcome


def plot_sweep(trials: list[TrialOutcome], spec: SweepSpec, path: Path) -> Path | None:
    """Scatter of the two swept learning rates (or the first two numeric keys), coloured by meta-val loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [k for k, p in spec.space.items() if p.numeric]
    axes = [k for k in ("meta.inner_lr", "meta.outer_lr") if k in spec.space] or numeric[:2]
    axes += [k for k in numeric if k not in axes][: 2 - len(axes)]
    if not axes or not trials:
        return None
    xk = axes[0]
    yk = axes[1] if len(axes) > 1 else None

    def coord(t: TrialOutcome, k: str | None, i: int) -> float:
        return float(t.params.get(k, math.nan)) if k else float(i)

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    scored = [(i, t) for i, t in enumerate(trials) if t.metric is not None and t.status in ("completed",
                                                                                           "early_stopped")]
    sc = None
    if scored:
        values = [t.metric for _, t in scored]
        for status, marker in (("completed", "o"), ("early_stopped", "s")):
            pts = [(i, t) for i, t in scored if t.status == status]
            if pts:
                sc = ax.scatter([coord(t, xk, i) for i, t in pts], [coord(t, yk, i) for i, t in pts],
                                c=[t.metric for _, t in pts], cmap="viridis_r", vmin=min(values), vmax=max(values),
                                marker=marker, s=70, edgecolors="k", linewidths=0.5,
                                label="completed" if status == "completed" else "stopped early (ASHA)")
    for status, marker, color in (("diverged", "x", "red"), ("failed", "X", "grey")):
        pts = [(i, t) for i, t in enumerate(trials) if t.status == status]
        if pts:
            ax.scatter([coord(t, xk, i) for i, t in pts], [coord(t, yk, i) for i, t in pts], marker=marker,
                       c=color, s=70, label=status)
    best = [t for _, t in scored if t.status == "completed"]
    if best:
        b = min(best, key=lambda t: t.metric)
        ax.scatter([coord(b, xk, trials.index(b))], [coord(b, yk, trials.index(b))], marker="*", s=320,
                   facecolors="none", edgecolors="crimson", linewidths=1.5, label="best")
    if sc is not None:
        fig.colorbar(sc, ax=ax, label=f"{METRIC} (lower is better)")
    ax.set_xlabel(xk)
    ax.set_ylabel(yk or "trial")
    if spec.space[xk].numeric and all(float(v) > 0 for v in spec.space[xk].probe_values()):
        ax.set_xscale("log")
    if yk and spec.space[yk].numeric and all(float(v) > 0 for v in spec.space[yk].probe_values()):
        ax.set_yscale("log")
    ax.set_title(f"sweep: {len(trials)} trials")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
