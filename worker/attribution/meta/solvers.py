"""Linear solvers for symmetric positive-definite systems given by a matrix or a matrix-vector product."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.attribution.types import AttributionError

MatVec = Callable[[torch.Tensor], torch.Tensor]


class NonPositiveCurvature(AttributionError):
    """CG met a direction p with pᵀAp ≤ 0: the matrix is not positive definite."""

    def __init__(self, message: str, curvature: float, partial: torch.Tensor) -> None:
        super().__init__(message)
        self.curvature = curvature  # pᵀAp / pᵀp of the offending direction
        self.partial = partial  # the CG iterate before that direction (zero at the first iteration)


@dataclass
class SolveInfo:
    iterations: int
    relative_residual: float


def check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise AttributionError(f"NaN or infinite values in {what}")
    return t


def conjugate_gradient(
    matvec: MatVec, b: torch.Tensor, tol: float, max_iter: int, what: str
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve A x = b to ‖Ax − b‖ ≤ tol‖b‖; raise on pᵀAp ≤ 0, on NaN and when max_iter is reached."""
    check_finite(b, f"the right-hand side of {what}")
    b_norm = float(b.norm())
    x = torch.zeros_like(b)
    if b_norm == 0.0:
        return x, SolveInfo(0, 0.0)
    r = b.clone()
    p = r.clone()
    rr = r @ r
    for it in range(1, max_iter + 1):
        ap = matvec(p)
        pap = p @ ap
        if not torch.isfinite(pap):
            raise AttributionError(f"NaN in {what} (conjugate gradient, iteration {it})")
        if pap <= 0:
            curvature = float(pap / (p @ p))
            raise NonPositiveCurvature(
                f"{what}: the matrix is not positive definite (CG found pᵀAp/pᵀp = {curvature:.3e} at iteration {it})",
                curvature,
                x,
            )
        alpha = rr / pap
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        if math.sqrt(float(rr_new)) <= tol * b_norm:
            return x, SolveInfo(it, math.sqrt(float(rr_new)) / b_norm)
        p = r + (rr_new / rr) * p
        rr = rr_new
    raise AttributionError(
        f"{what}: conjugate gradient did not converge within max_iter={max_iter} iterations "
        f"(relative residual {math.sqrt(float(rr)) / b_norm:.2e} > tol {tol:.1e}); raise max_iter or the damping"
    )


def power_iteration(matvec: MatVec, dim: int, iterations: int, like: torch.Tensor, seed: int = 0) -> float:
    """Dominant (largest-magnitude) eigenvalue of a symmetric operator, by Rayleigh quotients."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(dim, generator=gen, dtype=like.dtype).to(like.device)
    v = v / v.norm()
    value = 0.0
    for _ in range(iterations):
        av = check_finite(matvec(v), "a Hessian-vector product (power iteration)")
        value = float(v @ av)
        norm = float(av.norm())
        if norm == 0.0:
            return 0.0
        v = av / norm
    return value


def extreme_eigenvalues(matvec: MatVec, dim: int, iterations: int, like: torch.Tensor) -> tuple[float, float]:
    """(λ̂_min, λ̂_max) of a symmetric operator: power iteration, then power iteration on the shifted operator."""
    dominant = power_iteration(matvec, dim, iterations, like, seed=0)
    other = power_iteration(lambda v: matvec(v) - dominant * v, dim, iterations, like, seed=1) + dominant
    return min(dominant, other), max(dominant, other)


def neumann_series(
    matvec: MatVec, b: torch.Tensor, eta: float, steps: int, tol: float, what: str
) -> tuple[torch.Tensor, SolveInfo]:
    """s = η Σ_j (I − ηA)^j b (LiSSA). Stops early when ‖As − b‖ ≤ tol‖b‖; raises when it diverges."""
    check_finite(b, f"the right-hand side of {what}")
    b_norm = float(b.norm())
    x = torch.zeros_like(b)
    if b_norm == 0.0:
        return x, SolveInfo(0, 0.0)
    residual = b.clone()  # b − ηA x
    for it in range(1, steps + 1):
        x = x + residual
        residual = b - eta * matvec(x)
        rel = float(residual.norm()) / b_norm
        if not math.isfinite(rel) or rel > 1e6:
            raise AttributionError(
                f"{what}: the Neumann series diverges (relative residual {rel:.2e} at step {it}); "
                "the matrix is not positive definite or the scale is wrong: raise the damping"
            )
        if rel <= tol:
            return eta * x, SolveInfo(it, rel)
    return eta * x, SolveInfo(steps, float(residual.norm()) / b_norm)


class DenseSPD:
    """Eigendecomposition of a dense symmetric matrix, reused for many right-hand sides."""

    def __init__(self, matrix: torch.Tensor, what: str) -> None:
        check_finite(matrix, what)
        sym = 0.5 * (matrix + matrix.T)
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(sym)
        self.what = what

    @property
    def min_eigenvalue(self) -> float:
        return float(self.eigenvalues[0])

    @property
    def max_eigenvalue(self) -> float:
        return float(self.eigenvalues[-1])

    def solve(self, b: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        """(M + shift·I)⁻¹ b for b of shape (p,) or (p, m); raises unless M + shift·I is positive definite."""
        values = self.eigenvalues + shift
        if float(values[0]) <= 0:
            raise AttributionError(
                f"{self.what} + damping is not positive definite "
                f"(smallest eigenvalue {float(values[0]):.3e}); raise the damping"
            )
        coeffs = self.eigenvectors.T @ b
        coeffs = coeffs / (values if b.dim() == 1 else values[:, None])
        return check_finite(self.eigenvectors @ coeffs, f"the solve with {self.what}")
