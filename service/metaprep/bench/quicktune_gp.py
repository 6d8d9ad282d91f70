"""The ``quicktune_gp`` baseline of the ``config_transfer`` benchmark (Quick-Tune, Arango et al., ICLR 2024).

:class:`DeepKernelGP` is Quick-Tune's performance predictor — an MLP feature extractor over
[x, m, budget] plus a 1-D convolutional encoder of the padded partial curve, an RBF ScaleKernel GP
with constant mean and Gaussian likelihood on the learned features (Wilson et al., 2016; DyHPO,
Wistuba et al., 2022), meta-trained by maximising the exact marginal likelihood on batches of 32 runs
drawn from one training dataset at a time (Arango et al., Alg. 1). The GP layer is GPyTorch's
(``ExactGP``, ``ExactMarginalLogLikelihood``; Gardner et al., 2018), as in Quick-Tune's and DyHPO's
code, with Cholesky kept for every size used here (``EXACT_UP_TO``). Targets are the best-so-far performance at a
random budget b, globally standardised (the paper divides accuracy by 100). Because the benchmark
is zero-shot, the GP is conditioned on a context of training runs at the full budget and
candidates are ranked by the posterior mean.

Saved as ``dkgp.safetensors`` (weights and context) plus ``dkgp.json`` (encoder, length, statistics);
nothing pickled. The service's own recommender is :mod:`metaprep.transfer.surrogate`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gpytorch
import numpy as np
import torch
from torch import nn

from metaprep.errors import ModelLoadError
from metaprep.transfer.features import FeatureEncoder
from metaprep.transfer.metadataset import Pool
from metaprep.transfer.surrogate import load_encoder, load_json, load_tensors, save_tensors, single_thread

FORMAT_VERSION = 2  # 2: the GP layer is GPyTorch's (parameter names changed)
# exact GP algebra (Cholesky) up to this many points: GPyTorch switches to conjugate gradients and Lanczos
# variance estimates beyond 800 by default, and the zero-shot context holds up to 2,048 runs
EXACT_UP_TO = 10_000


class _CurveEncoder(nn.Module):
    """Quick-Tune/DyHPO's 1-D conv encoder of the padded partial learning curve."""

    def __init__(self, length: int, out: int = 16):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * (length // 2), out)

    def forward(self, curve: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(curve.unsqueeze(1)))
        h = torch.max_pool1d(self.conv2(h), 2).flatten(1)
        return torch.relu(self.fc(torch.relu(h)))


class _FeatureExtractor(nn.Module):
    def __init__(self, inputs: int, length: int, hidden: int = 64, out: int = 32):
        super().__init__()
        self.curve = _CurveEncoder(length)
        self.mlp = nn.Sequential(nn.Linear(inputs + 1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden + 16, out)

    def forward(self, x: torch.Tensor, budget: torch.Tensor, curve: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.mlp(torch.cat([x, budget[:, None]], 1)), self.curve(curve)], 1))


class _ExactGP(gpytorch.models.ExactGP):
    """Constant mean and RBF ScaleKernel over the extracted features (DyHPO's and Quick-Tune's GP layer)."""

    def __init__(self, likelihood: gpytorch.likelihoods.GaussianLikelihood):
        super().__init__(None, None, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

    def forward(self, z: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))


class DeepKernelGP(nn.Module):
    """Quick-Tune's deep-kernel GP: GPyTorch's exact GP on learned features (see module doc)."""

    def __init__(self, encoder: FeatureEncoder, length: int, stats: dict):
        super().__init__()
        self.encoder = encoder
        self.length = length  # curves are padded/cut to this many steps (Quick-Tune: max budget 50)
        self.stats = stats  # {"mean", "std"} of targets, "horizon": max budget in steps
        self.features = _FeatureExtractor(encoder.width, length)
        self.gp = _ExactGP(gpytorch.likelihoods.GaussianLikelihood())
        self.context: dict[str, torch.Tensor] = {}

    def _inputs(self, x: np.ndarray, budgets: np.ndarray, curves: list) -> tuple[torch.Tensor, ...]:
        pad = np.zeros((len(curves), self.length), dtype=np.float32)
        for i, c in enumerate(curves):
            c = list(c)[-self.length:]
            if c:
                pad[i, : len(c)] = (np.asarray(c) - self.stats["mean"]) / self.stats["std"]
        b = np.log1p(budgets) / math.log1p(self.stats["horizon"])
        return torch.from_numpy(x).float(), torch.from_numpy(b).float(), torch.from_numpy(pad)

    @classmethod
    def fit(cls, pools: list[Pool], *, seed: int = 0, iterations: int = 300, batch: int = 32, lr: float = 1e-3,
            max_length: int = 50, context: int = 2048) -> DeepKernelGP:
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        encoder = FeatureEncoder().fit([c for p in pools for c in p.configs], [p.meta_features for p in pools])
        # a run without a learning curve (a meta-dataset of final scores only) is a one-step curve of its
        # performance: the statistics, the horizon and the meta-training below all see the same curves
        curves = [[c if c else (float(v),) for c, v in zip(p.curves, p.performance, strict=True)] for p in pools]
        values = np.concatenate([np.asarray(c, dtype=float) for runs in curves for c in runs])
        horizon = max(len(c) for runs in curves for c in runs)
        gp = cls(encoder, min(max_length, horizon) + (min(max_length, horizon) % 2),
                 {"mean": float(values.mean()), "std": float(values.std()) or 1.0, "horizon": horizon})
        xs = [encoder.transform(p.configs, p.meta_features) for p in pools]
        with single_thread():
            gp._meta_train(xs, curves, rng, iterations=iterations, batch=batch, lr=lr)
        # zero-shot context: training runs at the full budget (their performance), empty curve
        all_x = np.concatenate(xs)
        all_y = np.concatenate([p.performance for p in pools])
        pick = rng.permutation(len(all_x))[:context]
        gp.set_context(all_x[pick], all_y[pick])
        return gp

    def _meta_train(self, xs: list[np.ndarray], curves: list[list], rng: np.random.Generator,
                    *, iterations: int, batch: int, lr: float) -> None:
        """Quick-Tune Alg. 1: exact-GP marginal likelihood on batches drawn from one dataset at a time."""
        gp, horizon = self, self.stats["horizon"]
        self.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(self.gp.likelihood, self.gp)
        opt = torch.optim.Adam(gp.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations, eta_min=1e-7)
        for _ in range(iterations):
            d = int(rng.integers(len(xs)))
            idx = rng.integers(0, len(xs[d]), size=batch)
            budgets, prefixes, targets = [], [], []
            for i in idx:
                curve = curves[d][i]
                b = int(rng.integers(1, horizon + 1))  # a stopped run keeps its best value beyond its end
                seen = curve[: min(b, len(curve))]
                targets.append(max(seen))
                prefixes.append(seen[: int(rng.integers(0, len(seen)))])  # empty prefixes: zero-shot queries
                budgets.append(b)
            x, bt, ct = gp._inputs(xs[d][idx], np.array(budgets, dtype=float), prefixes)
            y = (torch.tensor(targets, dtype=torch.float32) - gp.stats["mean"]) / gp.stats["std"]
            z = gp.features(x, bt, ct)
            self.gp.set_train_data(z, y, strict=False)
            with gpytorch.settings.max_cholesky_size(EXACT_UP_TO):
                loss = -mll(self.gp(z), y)  # the exact marginal log-likelihood per point
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if self.gp.train_inputs is not None:  # keep no autograd graph past training
            self.gp.set_train_data(self.gp.train_inputs[0].detach(), self.gp.train_targets, strict=False)

    @torch.no_grad()
    def set_context(self, x: np.ndarray, y: np.ndarray) -> None:
        self.context = {"x": torch.from_numpy(x).float(),
                        "y": (torch.from_numpy(y).float() - self.stats["mean"]) / self.stats["std"]}

    @torch.no_grad()
    def predict(self, configs: list[dict], meta: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and std of the latent function (performance units; no observation noise) at the full
        budget with no observed curve. The benchmark ranks by the mean."""
        with single_thread():
            return self._predict(configs, meta)

    def _predict(self, configs: list[dict], meta: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        self.eval()
        full = np.full(len(self.context["x"]), float(self.stats["horizon"]))
        zc = self.features(*self._inputs(self.context["x"].numpy(), full, [()] * len(full)))
        xq = self.encoder.transform(configs, meta)
        zq = self.features(*self._inputs(xq, np.full(len(xq), float(self.stats["horizon"])), [()] * len(xq)))
        self.gp.set_train_data(zc, self.context["y"], strict=False)
        with gpytorch.settings.max_cholesky_size(EXACT_UP_TO):
            posterior = self.gp(zq)  # the latent function's posterior (no observation noise)
            mean, var = posterior.mean, posterior.variance.clamp_min(1e-9)
        return (mean * self.stats["std"] + self.stats["mean"]).numpy(), (var.sqrt() * self.stats["std"]).numpy()

    def save(self, dirpath: str | Path) -> Path:
        dirpath = Path(dirpath)
        dirpath.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in self.state_dict().items()}
        tensors.update({f"context.{k}": v for k, v in self.context.items()})
        save_tensors(dirpath, tensors, "dkgp.safetensors")
        spec = {"kind": "deep_kernel_gp", "format_version": FORMAT_VERSION, "length": self.length,
                "stats": self.stats, "encoder": self.encoder.to_dict()}
        (dirpath / "dkgp.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        return dirpath

    @classmethod
    def load(cls, dirpath: str | Path) -> DeepKernelGP:
        dirpath = Path(dirpath)
        spec = load_json(dirpath / "dkgp.json")
        if spec.get("kind") != "deep_kernel_gp":
            raise ModelLoadError(f"{dirpath / 'dkgp.json'}: not a deep-kernel GP (kind={spec.get('kind')!r})")
        if spec.get("format_version") != FORMAT_VERSION:
            raise ModelLoadError(f"{dirpath / 'dkgp.json'}: format_version {spec.get('format_version')!r}, this "
                                 f"version reads {FORMAT_VERSION} (GPyTorch since 0.12.0); refit the GP")
        gp = cls(load_encoder(spec, dirpath / "dkgp.json"), spec["length"], spec["stats"])
        tensors = load_tensors(dirpath / "dkgp.safetensors")
        gp.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        gp.context = {k[len("context."):]: v for k, v in tensors.items() if k.startswith("context.")}
        return gp
