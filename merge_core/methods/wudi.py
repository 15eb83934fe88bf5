"""WUDI merging (Cheng et al. 2025, "Whoever started the interference should end it: guiding
data-free model merging via task vectors", arXiv 2503.08099).

Per 2-D tensor, the merged task vector minimises the interference it causes on each task's own
input subspace (the row space of its task vector), weighted by the task vector's size:

    L(X) = sum_i ||(X - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2.

The official code (and FusionBench's ``wudi_merging``) runs Adam on L from ``X = sum_i tau_i`` for
300 iterations at lr 1e-5 (FusionBench's config: 400). L is quadratic in X, so its minimiser solves
the normal equations ``X A = B`` with ``A = sum_i tau_i^T tau_i / ||tau_i||^2`` (in x in) and
``B = sum_i tau_i tau_i^T tau_i / ||tau_i||^2``. ``solver: closed_form`` (the default here) solves
them directly, taking of all minimisers the one nearest to the official start (where gradient
descent from it converges): ``X = S + (B - S A) A^+``, S = sum_i tau_i. When the matrix is wider
than k times its height, the same point is found in the k*out-dimensional row space of the stacked
task vectors instead (there L reaches 0). ``solver: adam`` is the official procedure, with its
gradient ``2 (X A - B)`` computed from A and B instead of autograd (the same gradient, cheaper).

Why closed form: on MiniLM task vectors (docs/methods.md gives the numbers and the command), 300
Adam steps at lr 1e-5 end far from the minimiser and cost ~300 (in x in) products per matrix, while
the direct solve reaches the minimum at the cost of a few.

Every other tensor gets ``alpha * mean_i tau_i`` (the official code: the mean). The official code
has no scale (alpha = 1); alpha is searched on validation data here like every method's scale.
Embedding matrices are 2-D and merged like the rest (the official Adam on a (30522, 384) embedding
would hold k (30522, 30522) products; the closed form needs one (384, 384) system).
"""

from __future__ import annotations

import torch
from torch import Tensor

from supermerge.merge_core.errors import ConfigError, TaskVectorError
from supermerge.merge_core.methods.task_arithmetic import check_stack
from supermerge.merge_core.methods.ties import scaled_onto, sum_over_tasks
from supermerge.merge_core.methods.tsv import check_alpha, mean_of_tasks

PAPER = "https://arxiv.org/abs/2503.08099"

ADAM_STEPS = 300
ADAM_LR = 1e-5
"""The official code's Adam: 300 iterations at lr 1e-5 (no weight decay)."""

PARAM_GRID: dict[str, tuple] = {
    "alpha": (0.6, 0.8, 1.0, 1.2, 1.4, 1.6),
    "solver": ("closed_form",),
    "steps": (ADAM_STEPS,),  # used by solver: adam only
}

def task_weights(deltas: Tensor) -> Tensor:
    """1 / ||tau_i||_F^2 per task (k,); a zero task vector gets weight 0 (it constrains nothing)."""
    sq = torch.stack([torch.linalg.vector_norm(tau).square() for tau in deltas])
    return torch.where(sq > 0, 1.0 / sq, torch.zeros_like(sq))


def objective(merged: Tensor, deltas: Tensor) -> Tensor:
    """L(X) for X = ``merged`` (out, in) and ``deltas`` (k, out, in): the official loss, as it computes it."""
    products = torch.matmul(merged.unsqueeze(0) - deltas, deltas.transpose(1, 2))
    return (products.square().sum((1, 2)) * task_weights(deltas)).sum()


def normal_equations(deltas: Tensor) -> tuple[Tensor, Tensor]:
    """``A`` (in, in) and ``B`` (out, in) of ``X A = B`` (the gradient of L is ``2 (X A - B)``)."""
    k, m, n = deltas.shape
    w = task_weights(deltas)
    dtype = torch.float64 if deltas.dtype == torch.float64 else torch.float32  # float64: closed_form's retry
    a = torch.zeros(n, n, dtype=dtype, device=deltas.device)
    b = torch.zeros(m, n, dtype=dtype, device=deltas.device)
    for wi, tau in zip(w.tolist(), deltas):
        if n <= m:  # tau (tau^T tau): the (in, in) Gram is A's term anyway
            gram = tau.T @ tau
            a.add_(gram, alpha=wi)
            b.addmm_(tau, gram, alpha=wi)
        else:  # (tau tau^T) tau: the smaller (out, out) Gram
            a.addmm_(tau.T, tau, alpha=wi)
            gram = tau @ tau.T
            b.addmm_(gram, tau, alpha=wi)
        del gram
    return a, b


RIDGE = 1e-6
"""The normal equations are solved with ``A + RIDGE * (tr A / in) * I`` (tr A = k, the number of
non-zero task vectors), i.e. L plus a vanishing pull towards the official start: the step along a
direction of A with eigenvalue l is shrunk by l / (l + ridge), which matters only where L is flat to
within fp32 rounding, and it makes A positive definite in exact arithmetic, so one Cholesky
factorisation solves it whatever its rank: fp32 where its rounding stays below the ridge (on MiniLM-shaped
cases fp32 reaches the fp64 solve's L to 6 digits), float64 where it does not (``closed_form``)."""


class _Indefinite(Exception):
    """fp32's rounding left the shifted normal equations indefinite (see ``closed_form``)."""


def _cholesky_solve(matrix: Tensor, rhs: Tensor) -> Tensor:
    """``rhs @ (matrix + ridge I)^-1`` for a symmetric PSD ``matrix`` (d, d), shifted in place, and
    ``rhs`` (r, d); ``_Indefinite`` where the shifted matrix cannot be factored in its dtype."""
    d = matrix.shape[0]
    matrix.diagonal().add_(RIDGE * max(float(matrix.diagonal().sum()), 1e-30) / d)
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise _Indefinite(int(info))
    return torch.cholesky_solve(rhs.T, factor).T


def _solve_columns(deltas: Tensor, start: Tensor) -> Tensor:
    """``S + (B - S A) A^+`` (ridge-regularised) through the (in, in) matrix A."""
    a, b = normal_equations(deltas)
    residual = b.sub_(start @ a)
    return start.add_(_cholesky_solve(a, residual))


def _solve_rows(deltas: Tensor, start: Tensor) -> Tensor:
    """The same point for a wide matrix (in > k * out): ``X = S + C R`` with R the stacked task
    vectors (k*out, in), ``C K = [(tau_i - S) tau_i^T]_i`` and K = R R^T (k*out, k*out)."""
    k, m, n = deltas.shape
    rows = deltas.reshape(k * m, n)
    rhs = torch.cat([(tau - start) @ tau.T for tau in deltas], dim=1)
    coef = _cholesky_solve(rows @ rows.T, rhs)
    return start.addmm_(coef, rows)


def closed_form(deltas: Tensor) -> Tensor:
    """The minimiser of L nearest to ``sum_i tau_i``: (k, out, in) -> (out, in).

    Solved in fp32; where fp32's rounding of the normal equations exceeds the ridge (a spectrum
    dominated by a few large directions, as briefly trained task vectors give: the README demo's
    fine-tunes), the same equations and ridge are built and solved again in float64 — the same solution
    with more digits, not another method. Equations float64 cannot factor are not PSD: an error."""
    try:
        return _closed_form(deltas)
    except _Indefinite:
        pass
    try:
        return _closed_form(deltas.double()).to(torch.float32)
    except _Indefinite as e:
        raise TaskVectorError(f"WUDI's normal equations for a {tuple(deltas.shape[1:])} matrix are not positive "
                              f"definite even in float64 (leading minor {e.args[0]}): the task vectors hold "
                              "corrupt values; check the inputs, or use solver: adam") from None


def _closed_form(deltas: Tensor) -> Tensor:
    k, m, n = deltas.shape
    start = sum_over_tasks(deltas)  # in the deltas' dtype: float64 on closed_form's retry
    return _solve_rows(deltas, start) if n > k * m else _solve_columns(deltas, start)


def adam(deltas: Tensor, steps: int = ADAM_STEPS, lr: float = ADAM_LR, trace: list[float] | None = None) -> Tensor:
    """The official procedure: Adam on L from ``sum_i tau_i``. ``trace``, if given, gets L before
    every step and after the last (for tests and the bench)."""
    k, m, n = deltas.shape
    merged = sum_over_tasks(deltas)
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    a, b = normal_equations(deltas) if n <= k * m else (None, None)
    w = task_weights(deltas)
    for _ in range(steps):
        if trace is not None:
            trace.append(float(objective(merged, deltas)))
        if a is not None:
            merged.grad = 2 * (merged @ a - b)
        else:
            products = torch.matmul(merged.unsqueeze(0) - deltas, deltas.transpose(1, 2)) * w[:, None, None]
            merged.grad = 2 * torch.matmul(products, deltas).sum(0)
        optimizer.step()
    if trace is not None:
        trace.append(float(objective(merged, deltas)))
    return merged.detach()


def direction(deltas: Tensor, solver: str = "closed_form", steps: int = ADAM_STEPS) -> Tensor:
    """The WUDI delta at alpha = 1: (k, *S) fp32 -> S."""
    if deltas.dim() != 3:
        return mean_of_tasks(deltas)
    return closed_form(deltas) if solver == "closed_form" else adam(deltas, steps)


def merge(
    base: Tensor, deltas: Tensor, *, seed: int = 0, alpha: float = 1.0, solver: str = "closed_form",
    steps: int = ADAM_STEPS,
) -> Tensor:
    """``base`` (shape S, any dtype), ``deltas`` (k, *S) fp32 -> fp32 S. ``seed`` is unused.

    ``solver``: closed_form (the minimiser) or adam (the official 300 steps at lr 1e-5; ``steps``)."""
    check_alpha(alpha, "wudi")
    if solver not in ("closed_form", "adam"):
        raise ConfigError(f"wudi: solver must be closed_form or adam (the official procedure), got {solver!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"wudi: steps must be a whole number >= 0 (Adam iterations), got {steps!r}")
    check_stack(base, deltas)
    return scaled_onto(base, direction(deltas, solver, steps), alpha)
