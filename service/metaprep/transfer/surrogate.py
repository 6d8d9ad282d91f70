"""Performance and cost surrogates over (configuration, meta-features[, partial learning curve]).

**Performance surrogate** (:class:`TransferSurrogate`, the recommender's model). Strangmann et al.
(2024, §3) learn p(performance | configuration x, meta-features m) from a meta-dataset and pick
configurations for a new dataset by transfer alone; Quick-Tune (Arango et al., ICLR 2024, Eq. 2-3)
models the same quantity with a deep-kernel GP. Here the predictor is a deep ensemble of M MLPs
``f_j(x, m, c)`` (Lakshminarayanan et al., 2017) with

- target ``y~ = (y - min_d y) / (max_d y - min_d y)``: performance min-max normalised inside each
  training dataset d, i.e. exactly ``1 - normalised regret`` of the benchmark, so datasets measured
  in different units (perplexity, accuracy) share one scale and the loss is aligned with the metric;
- every training dataset weighted equally (pool sizes differ by 10x), and each member trained on a
  Bayesian bootstrap of the *datasets* (Dirichlet(1) weights; Rubin, 1981): a member is one
  plausible response surface of "a new dataset", so the spread over members is the transfer
  uncertainty ``sigma(x) = std_j f_j(x)`` and the members act as scenarios for portfolio selection;
- grey-box input ``c``: features of an optional partial learning curve (observed fraction, last and
  best value, slope; zeros and a 0 flag when no curve is known). Every training run is seen once
  without a curve and once with a random prefix of its curve, so the zero-shot prediction used for
  transfer keeps its full training signal while partial curves can refine it (Quick-Tune, §4.2).

**Cost surrogate**: the same ensemble regressing ``log(cost seconds)`` (standardised), trained
only when the meta-dataset records costs (Quick-Tune's cost predictor ``ĉ(x, m)``, Eq. 5).

Both save as ``safetensors`` (weights) plus JSON (encoder, sizes, statistics); nothing pickled. The
Quick-Tune deep-kernel GP, a baseline of the ``config_transfer`` benchmark, is
:mod:`metaprep.bench.quicktune_gp`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from metaprep.errors import DataError, ModelLoadError
from metaprep.jsonio import is_finite_number, read_json
from metaprep.transfer.features import FeatureEncoder
from metaprep.transfer.metadataset import Pool

FORMAT_VERSION = 1
MAX_MEMBERS = 1024  # a saved spec sizes the ensembles before any weight is read: bound what it may ask for
MAX_HIDDEN = 16_384
CURVE_FEATURES = 5  # [has curve, observed fraction, last, best, last - first]


def minmax(values: np.ndarray) -> np.ndarray:
    """Per-dataset min-max normalisation (a constant pool maps to 0.5)."""
    lo, hi = float(np.min(values)), float(np.max(values))
    return np.full_like(values, 0.5, dtype=float) if hi - lo <= 0 else (values - lo) / (hi - lo)


def curve_features(curves: list[tuple[float, ...] | list[float] | None], stats: dict) -> np.ndarray:
    """Grey-box features of partial curves; an empty/None curve encodes as zeros."""
    out = np.zeros((len(curves), CURVE_FEATURES), dtype=np.float32)
    mu, sd, horizon = stats["mean"], stats["std"], stats["horizon"]
    for i, c in enumerate(curves):
        if not c:
            continue
        out[i] = [1.0, math.log1p(len(c)) / math.log1p(horizon), (c[-1] - mu) / sd, (max(c) - mu) / sd,
                  (c[-1] - c[0]) / sd]
    return out


class EnsembleMLP(nn.Module):
    """M independent MLPs evaluated with one batched matmul per layer: ``forward(x) -> (M, N)``."""

    def __init__(self, members: int, inputs: int, hidden: int, layers: int = 2):
        super().__init__()
        sizes = [inputs] + [hidden] * layers + [1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in pairwise(sizes):
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(members, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(members, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, inputs), shared by all members -> (M, N)."""
        w0 = self.weights[0]
        m, fan_in, fan_out = w0.shape
        # first layer as one (N, in) x (in, M*H) GEMM: cheaper than M matmuls of a broadcast input
        h = (x @ w0.permute(1, 0, 2).reshape(fan_in, m * fan_out)).reshape(len(x), m, fan_out).transpose(0, 1)
        h = h + self.biases[0]
        for w, b in zip(self.weights[1:], self.biases[1:], strict=True):
            h = torch.baddbmm(b, torch.nn.functional.silu(h), w)
        return h.squeeze(-1)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the setting.

    These models are small (batches of 32-128 rows, widths of 64): a second thread gains little
    when the machine is idle and, measured on a shared 2-core box, makes a step up to 40x slower
    when it is oversubscribed (OpenMP threads spinning against other processes).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_ensemble(model: EnsembleMLP, x: np.ndarray, y: np.ndarray, w: np.ndarray, *, steps: int,
                    batch: int, lr: float, weight_decay: float, gen: torch.Generator) -> None:
    """Weighted MSE, AdamW with a cosine schedule. ``w``: (M, N) per-member row weights."""
    xt, yt, wt = torch.from_numpy(x).float(), torch.from_numpy(y).float(), torch.from_numpy(w).float()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    n = len(xt)
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch, n),), generator=gen)
        pred = model(xt[idx])
        weights = wt[:, idx]
        loss = (weights * (pred - yt[idx]) ** 2).sum() / weights.sum().clamp_min(1e-8)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def save_tensors(dirpath: Path, tensors: dict[str, torch.Tensor], filename: str) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(dirpath / filename))


def load_json(path: Path) -> dict:
    """The JSON object of a saved model's spec file, or a one-line :class:`ModelLoadError` naming ``path:line``."""
    if not path.exists():
        raise ModelLoadError(f"{path}: missing (a saved surrogate folder has surrogate.json and "
                             "*.safetensors)")
    spec = read_json(path, "model spec", ModelLoadError)
    if not isinstance(spec, dict):
        raise ModelLoadError(f"{path}: must be a JSON object (as written by save()), got {type(spec).__name__}")
    return spec



def check_spec(spec: dict, path: Path) -> None:
    """The fields of a surrogate spec that size the ensembles and scale their inputs, each of the right type."""
    for key, cap in (("members", MAX_MEMBERS), ("hidden", MAX_HIDDEN)):
        value = spec.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cap:
            raise ModelLoadError(f"{path}: {key!r} must be an integer in [1, {cap}], got {repr(value)[:40]}")
    names = spec.get("meta_features")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ModelLoadError(f"{path}: 'meta_features' must be a list of meta-feature names")
    for key, fields in (("curve_stats", ("mean", "std", "horizon")), ("cost_stats", ("mean", "std"))):
        stats = spec.get(key)
        if key == "cost_stats" and stats is None:
            continue
        if not isinstance(stats, dict) or not all(is_finite_number(stats.get(f)) for f in fields):
            raise ModelLoadError(f"{path}: {key!r} must be an object of finite numbers {', '.join(fields)}")
    if not isinstance(spec.get("performance_desc", ""), str):
        raise ModelLoadError(f"{path}: 'performance_desc' must be a string")


def load_encoder(spec: dict, path: Path) -> FeatureEncoder:
    """The fitted encoder stored in ``spec['encoder']``, or a one-line :class:`ModelLoadError`."""
    try:
        return FeatureEncoder.from_dict(spec.get("encoder"))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: 'encoder' {exc}; re-save the model") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing weights file") from None
    except Exception as exc:  # safetensors raises its own error types on corrupt headers
        raise ModelLoadError(f"{path}: unreadable safetensors file ({exc})") from None


def load_weights(module: nn.Module, path: Path) -> None:
    """Load ``path`` into ``module``; weights of another shape than the spec describes: one-line error."""
    try:
        module.load_state_dict(load_tensors(path))
    except RuntimeError as exc:  # missing/unexpected keys, size mismatch
        raise ModelLoadError(f"{path}: weights do not match the spec next to it "
                             f"({str(exc).splitlines()[-1].strip()[:200]})") from None


class TransferSurrogate:
    """Performance ensemble (normalised performance, with uncertainty) plus optional cost ensemble."""

    def __init__(self, encoder: FeatureEncoder, *, members: int = 8, hidden: int = 64,
                 curve_stats: dict | None = None, cost_stats: dict | None = None,
                 meta_features: list[str] | None = None, performance_desc: str = ""):
        self.encoder = encoder
        self.members = members
        self.hidden = hidden
        self.curve_stats = curve_stats or {"mean": 0.0, "std": 1.0, "horizon": 1}
        self.cost_stats = cost_stats
        self.meta_features = meta_features if meta_features is not None else encoder.meta.names
        self.performance_desc = performance_desc
        width = encoder.width + CURVE_FEATURES
        self.perf = EnsembleMLP(members, width, hidden)
        self.cost = EnsembleMLP(members, encoder.width, hidden) if cost_stats else None

    # ----------------------------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, pools: list[Pool], *, seed: int = 0, members: int = 8, hidden: int = 64, steps: int = 1500,
            batch: int = 128, lr: float = 2e-3, weight_decay: float = 1e-4, cost_steps: int = 1000,
            performance_desc: str = "") -> TransferSurrogate:
        pools = [p for p in pools if len(p.configs) >= 1]
        if not pools:
            raise DataError("cannot fit a surrogate: the training meta-dataset has no runs")
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        encoder = FeatureEncoder().fit([c for p in pools for c in p.configs], [p.meta_features for p in pools])
        values = np.concatenate([np.asarray(c, dtype=float) for p in pools for c in p.curves if c] or [np.zeros(1)])
        curve_stats = {"mean": float(values.mean()), "std": float(values.std()) or 1.0,
                       "horizon": max([len(c) for p in pools for c in p.curves] + [1])}
        costs = [p.cost for p in pools]
        has_cost = cost_steps > 0 and any(np.isfinite(c).any() for c in costs)
        cost_stats = None
        if has_cost:
            log_cost = np.log(np.concatenate(costs)[np.isfinite(np.concatenate(costs))].clip(1e-3))
            cost_stats = {"mean": float(log_cost.mean()), "std": float(log_cost.std()) or 1.0}
        model = cls(encoder, members=members, hidden=hidden, curve_stats=curve_stats, cost_stats=cost_stats,
                    meta_features=encoder.meta.names, performance_desc=performance_desc)

        # Bayesian bootstrap over datasets, equal total weight per dataset (module docstring)
        dirichlet = rng.dirichlet(np.ones(len(pools)), size=members) * len(pools)  # (M, D)
        xs, ys, ws, xc, yc, wc = [], [], [], [], [], []
        for d, pool in enumerate(pools):
            base = encoder.transform(pool.configs, pool.meta_features)
            y = minmax(pool.performance)
            prefixes = [tuple(c[: rng.integers(1, len(c))]) if len(c) > 1 else () for c in pool.curves]
            keep = np.array([len(p) > 0 for p in prefixes])
            xs += [np.concatenate([base, curve_features([None] * len(base), curve_stats)], 1),
                   np.concatenate([base[keep], curve_features([p for p in prefixes if p], curve_stats)], 1)]
            ys += [y, y[keep]]
            n_rows = len(base) + int(keep.sum())
            ws.append(np.repeat(dirichlet[:, d:d + 1] / n_rows, n_rows, axis=1))
            finite = np.isfinite(pool.cost)
            if cost_stats and finite.any():
                xc.append(base[finite])
                yc.append((np.log(pool.cost[finite].clip(1e-3)) - cost_stats["mean"]) / cost_stats["std"])
                wc.append(np.full((members, int(finite.sum())), 1.0 / finite.sum()))
        with single_thread():
            _train_ensemble(model.perf, np.concatenate(xs), np.concatenate(ys), np.concatenate(ws, 1),
                            steps=steps, batch=batch, lr=lr, weight_decay=weight_decay, gen=gen)
            if model.cost is not None:
                _train_ensemble(model.cost, np.concatenate(xc), np.concatenate(yc), np.concatenate(wc, 1),
                                steps=cost_steps, batch=batch, lr=lr, weight_decay=weight_decay, gen=gen)
        return model

    # -------------------------------------------------------------------------------- prediction
    def check_meta(self, meta: dict[str, float]) -> None:
        unknown = sorted(set(meta) - set(self.meta_features))
        missing = sorted(set(self.meta_features) - set(meta))
        if unknown or missing:
            parts = ([f"unknown {unknown}"] if unknown else []) + ([f"missing {missing}"] if missing else [])
            raise DataError(f"meta-features: {'; '.join(parts)}; the surrogate expects exactly "
                            f"{self.meta_features}")

    @torch.no_grad()
    def predict_members(self, configs: list[dict], meta: dict[str, float],
                        curves: list[tuple[float, ...] | None] | None = None) -> np.ndarray:
        """(M, N) normalised performance predicted by each ensemble member."""
        self.check_meta(meta)
        x = self.encoder.transform(configs, meta)
        c = curve_features(curves if curves is not None else [None] * len(configs), self.curve_stats)
        return self.perf(torch.from_numpy(np.concatenate([x, c], 1))).numpy()

    def predict(self, configs: list[dict], meta: dict[str, float],
                curves: list[tuple[float, ...] | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation over members of the normalised performance (higher is better)."""
        members = self.predict_members(configs, meta, curves)
        return members.mean(0), members.std(0)

    @torch.no_grad()
    def predict_cost(self, configs: list[dict], meta: dict[str, float]) -> np.ndarray | None:
        """Predicted seconds per configuration (geometric mean over members), or None without costs."""
        if self.cost is None or self.cost_stats is None:
            return None
        self.check_meta(meta)
        z = self.cost(torch.from_numpy(self.encoder.transform(configs, meta))).numpy().mean(0)
        return np.exp(z * self.cost_stats["std"] + self.cost_stats["mean"])

    # --------------------------------------------------------------------------------- save/load
    def save(self, dirpath: str | Path) -> Path:
        dirpath = Path(dirpath)
        dirpath.mkdir(parents=True, exist_ok=True)
        save_tensors(dirpath, dict(self.perf.state_dict()), "perf.safetensors")
        if self.cost is not None:
            save_tensors(dirpath, dict(self.cost.state_dict()), "cost.safetensors")
        spec = {"kind": "transfer_surrogate", "format_version": FORMAT_VERSION, "members": self.members,
                "hidden": self.hidden, "curve_stats": self.curve_stats, "cost_stats": self.cost_stats,
                "meta_features": self.meta_features, "performance_desc": self.performance_desc,
                "encoder": self.encoder.to_dict()}
        (dirpath / "surrogate.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        return dirpath

    @classmethod
    def load(cls, dirpath: str | Path) -> TransferSurrogate:
        dirpath = Path(dirpath)
        spec = load_json(dirpath / "surrogate.json")
        if spec.get("kind") != "transfer_surrogate" or spec.get("format_version") != FORMAT_VERSION:
            raise ModelLoadError(f"{dirpath / 'surrogate.json'}: not a transfer surrogate of format "
                                 f"{FORMAT_VERSION} (kind={spec.get('kind')!r})")
        check_spec(spec, dirpath / "surrogate.json")
        model = cls(load_encoder(spec, dirpath / "surrogate.json"), members=spec["members"], hidden=spec["hidden"],
                    curve_stats=spec["curve_stats"], cost_stats=spec.get("cost_stats"),
                    meta_features=spec["meta_features"], performance_desc=spec.get("performance_desc", ""))
        load_weights(model.perf, dirpath / "perf.safetensors")
        if model.cost is not None:
            load_weights(model.cost, dirpath / "cost.safetensors")
        return model
