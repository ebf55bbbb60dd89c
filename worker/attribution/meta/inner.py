"""Inner problems: θ_i(λ) by the proximal (implicit) solve or by K unrolled gradient steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import grad, grad_and_value, hessian, jvp

from worker.attribution.meta.data import TaskData
from worker.attribution.meta.functional import FunctionalModel, RetainedGradient
from worker.attribution.meta.inner_ekfac import KroneckerInnerInverse, fit_inner_ekfac
from worker.attribution.meta.options import InnerOptions
from worker.attribution.meta.solvers import (
    DenseSPD,
    NonPositiveCurvature,
    check_finite,
    conjugate_gradient,
    extreme_eigenvalues,
)
from worker.attribution.types import AttributionError

INNER_POWER_ITERATIONS = 20  # matrix-free check that A = ∇²_θ L_I is positive definite


def train_loss(
    fm: FunctionalModel, task: TaskData, lam: torch.Tensor, theta: torch.Tensor, w_tr: torch.Tensor | None = None
) -> torch.Tensor:
    return fm.split_loss(lam, theta, task.x_tr, task.y_tr, task.w_tr if w_tr is None else w_tr)


def val_loss(
    fm: FunctionalModel, task: TaskData, lam: torch.Tensor, theta: torch.Tensor, w_val: torch.Tensor | None = None
) -> torch.Tensor:
    return fm.split_loss(lam, theta, task.x_val, task.y_val, task.w_val if w_val is None else w_val)


def proximal_loss(
    fm: FunctionalModel,
    task: TaskData,
    reg: float,
    lam: torch.Tensor,
    theta: torch.Tensor,
    w_tr: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_I(λ, θ) = L_tr(λ, θ) + (r/2)‖θ − λ_adapted‖²."""
    return train_loss(fm, task, lam, theta, w_tr) + 0.5 * reg * ((theta - fm.theta_of(lam)) ** 2).sum()


@dataclass
class InnerInverse:
    """A⁻¹x for the inner Hessian A = ∇²_θ L_I at the solution: dense eigendecomposition, EK-FAC or CG."""

    hvp: Callable[[torch.Tensor], torch.Tensor]
    tol: float
    max_iter: int
    task_id: int
    dense: DenseSPD | None = None
    matrix: torch.Tensor | None = None  # the dense A when ihvp is 'dense'
    kronecker: KroneckerInnerInverse | None = None

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """A⁻¹x for x (p_θ,); dense and EK-FAC also take (p_θ, m)."""
        if self.dense is not None:
            return self.dense.solve(x)
        if self.kronecker is not None:
            return self.kronecker.solve(x)
        return conjugate_gradient(self.hvp, x, self.tol, self.max_iter, f"inner Hessian of task {self.task_id}")[0]


def _newton_direction(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    g: torch.Tensor,
    dense_a: torch.Tensor | None,
    tol: float,
    max_iter: int,
) -> torch.Tensor:
    """The Newton step A⁻¹g: by the dense A when given (ihvp 'dense'), else by conjugate gradients on ``hvp``."""
    if dense_a is not None:
        values: torch.Tensor
        vectors: torch.Tensor
        values, vectors = torch.linalg.eigh(0.5 * (dense_a + dense_a.T))
        floor = max(1e-10 * float(values.abs().max()), 1e-12)
        values = values.abs().clamp_min(floor)  # saddle-free Newton away from a minimum
        return vectors @ ((vectors.T @ g) / values)
    try:
        direction, _ = conjugate_gradient(hvp, g, min(tol, 1e-3), max_iter, "inner Newton step")
        return direction
    except NonPositiveCurvature as exc:
        # truncated Newton (Nocedal & Wright, Algorithm 7.1): the CG iterate before the direction of negative
        # curvature is still a descent direction; steepest descent if CG stopped at once
        return exc.partial if bool((exc.partial != 0).any()) else g


def solve_proximal(
    fm: FunctionalModel,
    task: TaskData,
    lam: torch.Tensor,
    options: InnerOptions,
    theta_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, int]:
    """Newton's method with backtracking on L_I from θ = λ_adapted (or a warm start).

    Returns (θ*, ‖∂_θ L_I(θ*)‖, iterations). Raises when the stationarity tolerance is not reached.
    """
    theta = (fm.theta_of(lam) if theta_start is None else theta_start).detach().clone()

    def objective(th: torch.Tensor) -> torch.Tensor:
        return proximal_loss(fm, task, options.reg, lam, th)

    gradient = grad(objective)
    gradient_and_value = grad_and_value(objective)  # one forward and backward per line-search trial
    target = options.tol * 1e-3  # polish well below the tolerance; Newton converges quadratically
    g, value_t = gradient_and_value(theta)
    g = check_finite(g, f"the inner gradient of task {task.task_id}")
    value = float(value_t)
    iterations = 0
    for iterations in range(1, options.max_iter + 1):  # noqa: B007 (the count is read after the loop)
        g_norm = float(g.norm())
        if g_norm <= target:
            break
        dense_a = hessian(objective)(theta) if options.ihvp == "dense" else None

        def hvp(v: torch.Tensor, point: torch.Tensor = theta) -> torch.Tensor:
            product: torch.Tensor = jvp(gradient, (point,), (v,))[1]
            return product

        direction = _newton_direction(hvp, g, dense_a, options.tol, options.max_iter)
        slope = float(g @ direction)
        step = 1.0
        for _ in range(40):
            candidate = theta - step * direction
            new_g, new_value_t = gradient_and_value(candidate)
            new_value = float(new_value_t)
            armijo = new_value <= value - 1e-4 * step * slope
            # near the solution the decrease is below rounding: accept a smaller gradient instead
            rounding = new_value <= value + 1e-12 * abs(value) and float(new_g.norm()) < 0.9 * g_norm
            if armijo or rounding:
                break
            step *= 0.5
        if step < 1e-10 or (g_norm <= options.tol and float(new_g.norm()) > 0.5 * g_norm):
            break  # no further progress possible (floating-point floor)
        theta, g = candidate, check_finite(new_g, f"the inner gradient of task {task.task_id}")
        value = new_value
    residual = float(g.norm())
    if residual > options.tol:
        raise AttributionError(
            f"the inner problem of task {task.task_id} is not at stationarity: ‖∂θ L_I‖ = {residual:.3e} > tol "
            f"{options.tol:.1e} after {iterations} Newton iterations (raise inner.reg, inner.max_iter or inner.tol)"
        )
    return theta.detach(), residual, iterations


def inner_inverse(
    fm: FunctionalModel, task: TaskData, lam: torch.Tensor, theta: torch.Tensor, options: InnerOptions
) -> InnerInverse:
    """A⁻¹ for the inner Hessian A = ∇²L_tr + rI at θ*, after checking that A is positive definite (θ* is a
    minimum): exactly when A is formed (dense), else by power iteration on its products (cg, ekfac)."""

    retained = RetainedGradient(lambda t: proximal_loss(fm, task, options.reg, lam, t), theta)
    hvp = lambda v: retained.hvp(v)[0]  # noqa: E731
    inverse = InnerInverse(hvp, options.tol, options.max_iter, task.task_id)
    if options.ihvp == "dense":
        inverse.matrix = hessian(lambda t: proximal_loss(fm, task, options.reg, lam, t))(theta)
        inverse.dense = dense = DenseSPD(inverse.matrix, f"inner Hessian of task {task.task_id}")
        if dense.min_eigenvalue <= 0:
            raise AttributionError(
                f"the inner Hessian of task {task.task_id} is not positive definite (smallest eigenvalue "
                f"{dense.min_eigenvalue:.3e}): the inner problem is not at a minimum; raise inner.reg"
            )
    else:
        lowest, _ = extreme_eigenvalues(hvp, theta.numel(), INNER_POWER_ITERATIONS, theta)
        if lowest <= 0:
            raise AttributionError(
                f"the inner Hessian of task {task.task_id} is not positive definite (power-iteration estimate of "
                f"its smallest eigenvalue {lowest:.3e}): the inner problem is not at a minimum; raise inner.reg"
            )
    if options.ihvp == "ekfac":
        inverse.kronecker = fit_inner_ekfac(fm, task, lam, theta, options.reg)
    return inverse


def unrolled_adapt(
    fm: FunctionalModel, task: TaskData, options: InnerOptions, lam: torch.Tensor, w_tr: torch.Tensor | None = None
) -> torch.Tensor:
    """θ_K with θ_0 = λ_adapted and θ_{t+1} = θ_t − α ∇_θ L_tr(λ, θ_t); differentiable in λ and w_tr."""
    theta = fm.theta_of(lam)
    step_grad = grad(lambda th, lm, w: train_loss(fm, task, lm, th, w))
    for _ in range(options.steps):
        theta = theta - options.lr * step_grad(theta, lam, task.w_tr if w_tr is None else w_tr)
    return theta
