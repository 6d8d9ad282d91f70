"""Meta-LoRA in the linear setting (Block et al., 2024, "Meta-Learning Adaptable Foundation Models").

Model (the paper's linear theory and its synthetic experiment; arXiv:2410.22264, code
``github.com/jacob-block/peft-ml``, ``linear/``). Task ``t`` has the ground truth
``M*_t = A* + U*_t U*_tᵀ`` (``d × d``, a rank-``k`` PSD perturbation of a shared ``A*``)::

    y = M*_t x + ε,    x ~ N(0, I_d),    ε ~ N(0, s² I_d)

and the per-task empirical loss (the normalisation of the released code, ``jacob-block/peft-ml``,
``linear/learners.py``: sum of squares / 2, gradient divided by the sample count, i.e. mean × ½)::

    L_t(M) = 1/(2N) Σ_n ‖M x_n − y_n‖²  =  ½ tr(M Σ_t Mᵀ) − tr(M C_tᵀ) + ½ q_t,
    Σ_t = XᵀX/N,  C_t = YᵀX/N,  q_t = ‖Y‖²/N,          ∇_M L_t = M Σ_t − C_t.

Everything below works on these sufficient statistics ``(Σ_t, C_t, q_t)``: the loss and every
gradient are *exactly* those of the sample sums in the released code, at ``O(d³)`` instead of
``O(d² N)`` per step, and all ``T`` tasks are one batched tensor (one ``matmul`` for all ``U_t``).

* **Standard retraining (SR)** fits one ``A`` to the pooled tasks, ``min_A Σ_t L_t(A)``. Its
  minimiser is the pooled least-squares solution ``Â = C̄ Σ̄⁻¹`` (``Σ̄, C̄`` task means), which
  :func:`standard_retraining` returns in closed form; the released code runs 3000 GD steps at
  lr 0.03 on this strongly convex quadratic, which converge to the same point
  (:func:`standard_retraining_gd`, checked in the tests). (The released SR loop also keeps the
  learner's random initial ``U_c U_cᵀ``, ``‖·‖_F ≈ 0.1``, inside its model and so lands that far
  from the least-squares point — negligible next to SR's error of ≈ 5, and dropped here.)
  Population limit: ``A* + mean_t U*_t U*_tᵀ``, whose error has rank ``kT`` — a rank-``k`` LoRA on
  a new task cannot undo it.
* **Meta-LoRA** (the paper's objective, symmetric adapters as in the theory)::

      min_{A, U_1..U_T}  Σ_t L_t(A + U_t U_tᵀ)

  by the released alternating gradient descent (:func:`train_meta_lora`): per outer step, 10 GD
  steps on every ``U_t`` (``U_t ← U_t − 0.003 ∇_{U_t} L_t``, all tasks at once), then one step
  ``A ← A − 0.03 ∇_A (1/T) Σ_t L_t``; 3000 outer steps, ``A₀ = 0``, ``U_t ~ N(0, 0.1²)``. For
  ``T ≥ 3`` every global minimiser has ``Â = A*``; for ``T = 2`` only
  ``rank(Â − A*) ≤ 2k``.
* **Test task** (both methods, same data and initialisation): a fresh task ``A* + u uᵀ`` with
  ``N' = 100`` samples; a LoRA ``Â + U Vᵀ`` is fitted by GD at lr 0.005 (:func:`finetune_lora`),
  from ``U, V ~ N(0, 0.1²)``, 10000 steps. As in the released code the finetuning LoRA is
  *asymmetric* (``U Vᵀ``; an SR error ``u uᵀ − mean_t U*_t U*_tᵀ`` is indefinite, which no ``U Uᵀ``
  can correct), and its rank is ``3k`` when ``T = 2`` and ``k`` otherwise (the released
  ``mult = 3 if num_tasks == 2``): at ``T = 2`` the SR error has rank ≤ 3 and is fully
  correctable, so the paper's T=2 panel shows no gap.

Data generation (released ``linear/run.py``): ``A* = (G + Gᵀ)/2`` with ``G_ij ~ N(0, 1)``,
``U*_t, u ~ N(0, 1)^{d×k}``, ``x ~ N(0, I)``; with ``d = 10`` a perturbation has ``‖u uᵀ‖_F =
‖u‖² ≈ 10``, which sets the scale of SR's error. The noise standard deviation is ``sigma² = 0.01``
for the released ``sigma = 0.1`` (the code draws ``rng.normal(0, sigma ** 2)``; kept here as
``noise_std = 0.01``). Deviation: the released script draws ``A*, U*, u`` once per process and
shares them across its 5 runs; here every seed draws its own (the T settings of one seed share
``A*``, ``u`` and the first ``T`` of the same ``U*_1..U*_5``, as in the release).

Test-task metric. The released "test task loss" is ``semi_true_loss`` on the ``N'`` finetuning
inputs: ``Σ_{n ≤ N'} ‖(M* − M̂) x_n‖²`` (noise-free targets, no ½, summed, not averaged). Its
expectation over fresh Gaussian inputs is ``N' ‖M* − M̂‖_F²``, the closed-form population value
reported as ``test_loss`` (:func:`population_test_loss`); the released in-sample value is
:func:`insample_test_loss`. Per-sample population risk is ``‖M* − M̂‖_F² + d s²`` (``+ ‖·‖²``
convention, no ½); the noise term is method-independent and left out, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

DTYPE = torch.float64


@dataclass(frozen=True)
class LinearConfig:
    """Hyper-parameters of the released experiment (defaults) — ``quick()`` shrinks it for tests."""

    d: int = 10
    k: int = 1
    n_samples: int = 5000  # N, per training task
    n_test_samples: int = 100  # N', test task
    noise_std: float = 0.01  # sigma**2 with the released sigma = 0.1 (see module docstring)
    init_std: float = 0.1  # U_t, and the test-task U, V
    inner_lr: float = 0.003
    outer_lr: float = 0.03
    inner_steps: int = 10
    outer_steps: int = 3000
    finetune_lr: float = 0.005
    finetune_steps: int = 10000
    finetune_rank: int | None = None  # None: the released rule, 3k when T = 2 else k

    def rank_for(self, num_tasks: int) -> int:
        if self.finetune_rank is not None:
            return self.finetune_rank
        return 3 * self.k if num_tasks == 2 else self.k

    def quick(self) -> LinearConfig:
        """A reduced config (< 1 s per run) that still separates the methods at T = 3."""
        return replace(self, n_samples=1000, outer_steps=600, finetune_steps=3000)


@dataclass(frozen=True)
class Stats:
    """Sufficient statistics of a data set: ``Σ = XᵀX/N``, ``C = YᵀX/N``, ``q = ‖Y‖²/N``, ``n = N``.

    ``sigma``/``cross`` are ``(..., d, d)``, ``q`` is ``(...)``; a leading dim indexes tasks.
    """

    sigma: Tensor
    cross: Tensor
    q: Tensor
    n: int


@dataclass(frozen=True)
class Problem:
    """Ground truth of one draw: ``A*`` (d, d), ``U*`` (T_max, d, k), test-task ``u`` (d, k)."""

    a_star: Tensor
    u_star: Tensor
    u_test: Tensor

    def task_matrices(self, num_tasks: int) -> Tensor:
        """``A* + U*_t U*_tᵀ`` for the first ``num_tasks`` tasks, (T, d, d)."""
        u = self.u_star[:num_tasks]
        return self.a_star + u @ u.mT

    def test_matrix(self) -> Tensor:
        return self.a_star + self.u_test @ self.u_test.mT


def make_problem(gen: torch.Generator, d: int, k: int, max_tasks: int) -> Problem:
    """``A* = (G + Gᵀ)/2``, ``G_ij ~ N(0,1)``; ``U*_t, u ~ N(0,1)`` (the released generation)."""
    g = torch.randn(d, d, generator=gen, dtype=DTYPE)
    return Problem(a_star=(g + g.T) / 2,
                   u_star=torch.randn(max_tasks, d, k, generator=gen, dtype=DTYPE),
                   u_test=torch.randn(d, k, generator=gen, dtype=DTYPE))


def sample_stats(gen: torch.Generator, m_star: Tensor, n: int, noise_std: float) -> Stats:
    """Draw ``n`` samples ``y = M* x + ε`` per task (``m_star`` is (..., d, d)) and reduce them."""
    d = m_star.shape[-1]
    x = torch.randn(*m_star.shape[:-2], n, d, generator=gen, dtype=DTYPE)
    y = x @ m_star.mT + noise_std * torch.randn(x.shape, generator=gen, dtype=DTYPE)
    return Stats(sigma=x.mT @ x / n, cross=y.mT @ x / n, q=(y * y).sum((-2, -1)) / n, n=n)


def task_loss(m: Tensor, stats: Stats) -> Tensor:
    """``L(M) = 1/(2N) Σ_n ‖M x_n − y_n‖²`` per task, from the sufficient statistics."""
    quad = (m @ stats.sigma * m).sum((-2, -1))
    lin = (m * stats.cross).sum((-2, -1))
    return 0.5 * quad - lin + 0.5 * stats.q


def task_grad(m: Tensor, stats: Stats) -> Tensor:
    """``∇_M L(M) = M Σ − C`` per task (Σ is symmetric)."""
    return m @ stats.sigma - stats.cross


# ---------------------------------------------------------------------------- meta-LoRA objective

def meta_lora_loss(a: Tensor, u: Tensor, stats: Stats) -> Tensor:
    """``(1/T) Σ_t L_t(A + U_t U_tᵀ)`` (the Meta-LoRA objective up to the 1/T); ``u`` is (T, d, k)."""
    return task_loss(a + u @ u.mT, stats).mean()


def meta_lora_grads(a: Tensor, u: Tensor, stats: Stats) -> tuple[Tensor, Tensor]:
    """``(∇_A (1/T)Σ_t L_t, [∇_{U_t} L_t]_t)`` — the two gradients the alternating GD uses.

    With ``G_t = ∇_M L_t(A + U_t U_tᵀ)``: ``∇_A = mean_t G_t`` and ``∇_{U_t} L_t = (G_t + G_tᵀ) U_t``.
    """
    g = task_grad(a + u @ u.mT, stats)
    return g.mean(0), (g + g.mT) @ u


def train_meta_lora(stats: Stats, cfg: LinearConfig, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Alternating GD of the released code: ``inner_steps`` on all ``U_t``, then one on ``A``.

    Returns ``(Â, U)``; ``A₀ = 0``, ``U_t ~ N(0, init_std²)``.
    """
    num_tasks, d = stats.sigma.shape[0], stats.sigma.shape[-1]
    a = torch.zeros(d, d, dtype=DTYPE)
    u = cfg.init_std * torch.randn(num_tasks, d, cfg.k, generator=gen, dtype=DTYPE)
    sigma, cross = stats.sigma, stats.cross
    for _ in range(cfg.outer_steps):
        b = a @ sigma - cross  # G_t = A Σ_t − C_t + U_t (U_tᵀ Σ_t): the A part is fixed while U moves
        for _ in range(cfg.inner_steps):
            g = torch.baddbmm(b, u, u.mT @ sigma)
            u = torch.baddbmm(u, g + g.mT, u, alpha=-cfg.inner_lr)
        g = torch.baddbmm(b, u, u.mT @ sigma)
        a = a - cfg.outer_lr * g.mean(0)
    return a, u


# --------------------------------------------------------------------------- standard retraining

def pooled(stats: Stats) -> Stats:
    """Statistics of the pooled tasks (equal sample counts: the task means)."""
    return Stats(sigma=stats.sigma.mean(0), cross=stats.cross.mean(0), q=stats.q.mean(0),
                 n=stats.n * stats.sigma.shape[0])


def standard_retraining(stats: Stats) -> Tensor:
    """Closed-form SR: ``argmin_A Σ_t L_t(A) = C̄ Σ̄⁻¹`` (pooled least squares)."""
    p = pooled(stats)
    return torch.linalg.solve(p.sigma, p.cross.mT).mT  # Σ̄ symmetric: (Σ̄⁻¹ C̄ᵀ)ᵀ = C̄ Σ̄⁻¹


def standard_retraining_gd(stats: Stats, lr: float = 0.03, steps: int = 3000) -> Tensor:
    """SR as the released code runs it: GD on ``(1/T) Σ_t L_t(A)`` from ``A = 0``."""
    p = pooled(stats)
    a = torch.zeros_like(p.sigma)
    for _ in range(steps):
        a = a - lr * task_grad(a, p)
    return a


# ------------------------------------------------------------------------------ test-task LoRA

def lora_loss(a: Tensor, u: Tensor, v: Tensor, stats: Stats) -> Tensor:
    """``L(Â + U Vᵀ)`` on one task."""
    return task_loss(a + u @ v.mT, stats)


def lora_grads(a: Tensor, u: Tensor, v: Tensor, stats: Stats) -> tuple[Tensor, Tensor]:
    """``(∇_U, ∇_V) = (G V, Gᵀ U)`` with ``G = ∇_M L(Â + U Vᵀ)``."""
    g = task_grad(a + u @ v.mT, stats)
    return g @ v, g.mT @ u


def finetune_lora(a: Tensor, stats: Stats, u0: Tensor, v0: Tensor, lr: float, steps: int) -> Tensor:
    """GD on an asymmetric LoRA over the frozen ``Â`` (simultaneous U/V updates); returns ``Â + U Vᵀ``."""
    u, v = u0.clone(), v0.clone()
    b = a @ stats.sigma - stats.cross  # G = (Â + U Vᵀ) Σ − C = b + U (Vᵀ Σ)
    for _ in range(steps):
        g = torch.addmm(b, u, v.mT @ stats.sigma)
        u, v = torch.addmm(u, g, v, alpha=-lr), torch.addmm(v, g.mT, u, alpha=-lr)
    return a + u @ v.mT


def population_test_loss(m_hat: Tensor, m_star: Tensor, n_test: int) -> float:
    """``N' ‖M* − M̂‖_F²`` = E over fresh inputs of the released ``semi_true_loss`` on ``N'`` samples."""
    return float(n_test * ((m_star - m_hat) ** 2).sum())


def insample_test_loss(m_hat: Tensor, m_star: Tensor, stats: Stats) -> float:
    """The released metric exactly: ``Σ_n ‖(M* − M̂) x_n‖² = N tr(Δ Σ Δᵀ)`` on the finetuning inputs."""
    delta = m_star - m_hat
    return float(stats.n * (delta @ stats.sigma * delta).sum())


# ---------------------------------------------------------------------------------- one experiment

def run_experiment(seed: int, num_tasks: int, cfg: LinearConfig, max_tasks: int | None = None) -> dict:
    """One seed × T: draw the problem and data, train SR and Meta-LoRA, finetune both on the test task.

    ``max_tasks`` (≥ ``num_tasks``) fixes how many ``U*_t`` are drawn, so runs with different ``T``
    and the same seed share ``A*``, ``u`` and nested training tasks. Returns, per method, the
    population and in-sample test losses and ``‖Â − A*‖_F²``. Runs single-threaded: the
    tensors are 10 × 10, and intra-op threads only add contention (~15× slower on 2 cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_experiment(seed, num_tasks, cfg, max_tasks)
    finally:
        torch.set_num_threads(threads)


def _run_experiment(seed: int, num_tasks: int, cfg: LinearConfig, max_tasks: int | None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    problem = make_problem(gen, cfg.d, cfg.k, max(max_tasks or num_tasks, num_tasks))
    gen_t = torch.Generator().manual_seed(seed * 1000 + num_tasks)  # data/init stream of this T
    train = sample_stats(gen_t, problem.task_matrices(num_tasks), cfg.n_samples, cfg.noise_std)
    m_test = problem.test_matrix()
    test = sample_stats(gen_t, m_test, cfg.n_test_samples, cfg.noise_std)
    rank = cfg.rank_for(num_tasks)
    u0 = cfg.init_std * torch.randn(cfg.d, rank, generator=gen_t, dtype=DTYPE)
    v0 = cfg.init_std * torch.randn(cfg.d, rank, generator=gen_t, dtype=DTYPE)

    bases = {"standard_retraining": standard_retraining(train),
             "meta_lora": train_meta_lora(train, cfg, gen_t)[0]}
    out = {}
    for method, a_hat in bases.items():
        m_hat = finetune_lora(a_hat, test, u0, v0, cfg.finetune_lr, cfg.finetune_steps)
        out[method] = {"test_loss": population_test_loss(m_hat, m_test, cfg.n_test_samples),
                       "test_loss_insample": insample_test_loss(m_hat, m_test, test),
                       "a_error": float(((a_hat - problem.a_star) ** 2).sum())}
    return out
