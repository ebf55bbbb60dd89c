"""CG / Neumann / power iteration against dense solves on the total Hessian (docs/methods.md, meta methods), and the
matrix-free inner Newton solve."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from meta_toys import mlp, problem_for, random_direction, regression_tasks
from torch.func import hessian

from worker.attribution.meta import InnerOptions
from worker.attribution.meta.data import split_tasks
from worker.attribution.meta.functional import FunctionalModel
from worker.attribution.meta.influence import HessianInverse
from worker.attribution.meta.inner import proximal_loss, solve_proximal
from worker.attribution.meta.solvers import NonPositiveCurvature, conjugate_gradient, extreme_eigenvalues
from worker.attribution.types import AttributionError


@pytest.fixture(scope="module")
def problem():
    # λ is untrained, so H is indefinite (λ_min ≈ −3.5): a large damping keeps the test fast
    return problem_for("unrolled", damping=20.0, train=regression_tasks(2))[0]


def test_cg_and_neumann_match_dense_solve(problem):
    b = random_direction(problem, 1)
    problem.options.solver = "exact"
    dense = HessianInverse(problem).solve(b)
    for solver in ("cg", "neumann"):
        problem.options.solver = solver
        problem.options.neumann_steps = 2000
        problem.options.max_iter = 200
        problem.options.tol = 1e-10
        got = HessianInverse(problem).solve(b)
        assert float((got - dense).norm() / dense.norm()) < 1e-7, solver
    problem.options.solver = "exact"


def test_power_iteration_extremes_match_eigvalsh(problem):
    problem.options.solver = "exact"
    inverse = HessianInverse(problem)
    lo, hi = extreme_eigenvalues(problem.total.hvp, problem.fm.num_lambda, 100, problem.lam)
    assert abs(hi - inverse.lambda_max) < 1e-3 * abs(inverse.lambda_max)
    assert abs(lo - inverse.lambda_min) < 1e-2 * abs(inverse.lambda_max)


def test_cg_rejects_indefinite_and_non_convergence():
    m = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    with pytest.raises(NonPositiveCurvature):
        conjugate_gradient(lambda v: m @ v, torch.ones(3, dtype=torch.float64), 1e-10, 10, "test")
    spd = torch.diag(torch.logspace(0, 6, 50, dtype=torch.float64))
    with pytest.raises(AttributionError, match="did not converge"):
        conjugate_gradient(lambda v: spd @ v, torch.ones(50, dtype=torch.float64), 1e-12, 3, "test")


def test_gamma_and_drop_operators(problem):
    v = random_direction(problem, 2)
    for order in ("gamma", "drop"):
        problem.total.third_order = order
        problem.total.gammas = [t.gamma() for t in problem.terms] if order == "gamma" else [0.0] * len(problem.terms)
        dense = sum(problem.total.task_dense(k) for k in range(len(problem.terms)))
        dense = dense + problem.options.outer_l2 * torch.eye(problem.fm.num_lambda, dtype=torch.float64)
        assert float((problem.total.hvp(v) - dense @ v).norm() / (dense @ v).norm()) < 1e-10
    drop_dense = sum(t.dense_drop() for t in problem.terms)
    gamma = sum(float(t.outer_partials()[1].abs().sum()) for t in problem.terms)
    problem.total.third_order = "gamma"
    problem.total.gammas = [t.gamma() for t in problem.terms]
    gamma_dense = sum(problem.total.task_dense(k) for k in range(len(problem.terms)))
    assert torch.allclose(gamma_dense - drop_dense, gamma * torch.eye(problem.fm.num_lambda, dtype=torch.float64))
    problem.total.third_order = "exact"
    problem.total.gammas = [0.0] * len(problem.terms)


def test_matrix_free_inner_newton_converges_from_an_indefinite_start():
    """Truncated Newton-CG: where the inner Hessian at θ = λ is indefinite, the CG iterate before the direction
    of negative curvature is used (steepest descent needed up to 100+ iterations here); the solution is a
    minimum (A ≻ 0) within the tolerance."""
    model = mlp((2, 6, 1), seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    fm = FunctionalModel(model, "mse", None, torch.float64, torch.device("cpu"))
    lam = fm.flat_lambda()
    data = regression_tasks(3, per_split=8, seed=3)
    data = dataclasses.replace(data, targets=data.targets * 4)
    options = InnerOptions(reg=0.05, ihvp="cg", tol=1e-9, max_iter=40)
    for task in split_tasks(data, "mse", torch.float64, torch.device("cpu"), "train"):

        def inner_objective(theta, task=task):
            return proximal_loss(fm, task, options.reg, lam, theta)

        assert float(torch.linalg.eigvalsh(hessian(inner_objective)(fm.theta_of(lam)))[0]) < -1.0
        theta, residual, _ = solve_proximal(fm, task, lam, options)
        assert residual <= options.tol
        assert float(torch.linalg.eigvalsh(hessian(inner_objective)(theta))[0]) > 0
