"""docs/methods.md, meta methods exactness checks of total gradients, total HVPs and instance scores (float64)."""

from __future__ import annotations

import pytest
import torch
from meta_toys import problem_for, random_direction, term_at, with_weights
from torch.func import grad

from worker.attribution.meta.inner import train_loss

MODES = ["implicit_proximal", "unrolled"]


def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=MODES)
def setup(request):
    problem, *_ = problem_for(request.param)
    return request.param, problem


def test_total_gradient_matches_central_fd(setup):
    _, problem = setup
    v = random_direction(problem)
    for k in range(2):
        term = problem.terms[k]
        eps = 1e-5
        fd = (
            term_at(problem, k, problem.lam + eps * v).value() - term_at(problem, k, problem.lam - eps * v).value()
        ) / (2 * eps)
        assert rel(term.total_grad() @ v, fd) < 1e-6


def test_exact_hvp_matches_fd_of_total_gradient(setup):
    _, problem = setup
    v = random_direction(problem, 1)
    term = problem.terms[0]
    eps = 1e-4
    fd = (
        term_at(problem, 0, problem.lam + eps * v).total_grad()
        - term_at(problem, 0, problem.lam - eps * v).total_grad()
    ) / (2 * eps)
    assert rel(term.hvp_exact(v), fd) < 1e-4


def test_matrix_free_hvp_matches_dense(setup):
    _, problem = setup
    v = random_direction(problem, 2)
    for term in problem.terms[:2]:
        assert rel(term.hvp_exact(v), term.dense_exact() @ v) < 1e-10
        assert rel(term.hvp_drop(v), term.dense_drop() @ v) < 1e-10
    dense_total = sum(problem.total.task_dense(k) for k in range(len(problem.terms)))
    dense_total = dense_total + problem.options.outer_l2 * torch.eye(problem.fm.num_lambda, dtype=torch.float64)
    assert rel(problem.total.hvp(v), dense_total @ v) < 1e-10


def test_third_order_term_matters_for_implicit():
    problem, *_ = problem_for("implicit_proximal")
    h_exact, h_drop = problem.terms[0].dense_exact(), problem.terms[0].dense_drop()
    assert rel(h_drop, h_exact) > 1e-3  # H' (third order) is not negligible


def test_cg_inner_ihvp_matches_dense_inner():
    dense, *_ = problem_for("implicit_proximal", "dense")
    cg, *_ = problem_for("implicit_proximal", "cg")
    v = random_direction(dense, 3)
    assert rel(cg.terms[1].total_grad(), dense.terms[1].total_grad()) < 1e-8
    assert rel(cg.terms[1].hvp_exact(v), dense.terms[1].hvp_exact(v)) < 1e-8


def test_validation_instance_scores_sum_to_task_score(setup):
    _, problem = setup
    s = random_direction(problem, 4)
    for term in problem.terms:
        scores = term.val_scores(s)
        assert abs(float(scores.sum() - term.total_grad() @ s)) < 1e-10 * max(1.0, float(scores.abs().sum()))


def test_validation_instance_score_matches_fd_in_weight(setup):
    _, problem = setup
    s = random_direction(problem, 5)
    term, z, eps = problem.terms[1], 2, 1e-6

    def directional(wz: float) -> float:
        w = term.task.w_val.clone()
        w[z] = wz
        return float(term_at(problem, 1, problem.lam, with_weights(term.task, w_val=w)).total_grad() @ s)

    w0 = float(term.task.w_val[z])
    fd = w0 * (directional(w0 + eps) - directional(w0 - eps)) / (2 * eps)
    assert rel(term.val_scores(s)[z], fd) < 1e-6


def _weight_fd(problem, k: int, z: int, s: torch.Tensor, eps: float = 1e-5) -> float:
    """ΔQ_{−z} by the weight-derivative rule: w_z ∂_{w_z}[s·∇f_k] by central differences (inner re-solved)."""
    task = problem.terms[k].task

    def directional(wz: float) -> float:
        w = task.w_tr.clone()
        w[z] = wz
        return float(term_at(problem, k, problem.lam, with_weights(task, w_tr=w)).total_grad() @ s)

    w0 = float(task.w_tr[z])
    return w0 * (directional(w0 + eps) - directional(w0 - eps)) / (2 * eps)


def test_training_instance_scores_match_weight_derivative_rule(setup):
    _, problem = setup
    s = random_direction(problem, 6)
    scores = problem.terms[0].train_scores(s)
    for z in (0, 3):
        assert rel(scores[z], _weight_fd(problem, 0, z, s)) < 1e-6


def test_two_stage_training_instance_formula():
    """ΔQ_{−z} = −s·D_λP_z with P_z(λ) = w_z ∂_θL_O(λ, θ(λ))ᵀ A(λ)⁻¹ ∇_θℓ_z (paper form), by FD in λ."""
    problem, *_ = problem_for("implicit_proximal")
    s = random_direction(problem, 7)
    k, z = 2, 1
    task = problem.terms[k].task
    w_z = task.w_tr[z]

    def p_z(lam: torch.Tensor) -> float:
        term = term_at(problem, k, lam)
        one = torch.zeros_like(task.w_tr)
        one[z] = 1.0
        q_z = grad(lambda th: train_loss(problem.fm, task, lam, th, one))(term.theta)
        return float(w_z * (term.u @ q_z))  # u = A⁻¹ ∂_θ L_O

    eps = 1e-5
    two_stage = -(p_z(problem.lam + eps * s) - p_z(problem.lam - eps * s)) / (2 * eps)
    batched = problem.terms[k].train_scores(s)[z]
    assert rel(batched, two_stage) < 1e-6
    assert rel(batched, _weight_fd(problem, k, z, s)) < 1e-6


def test_removal_gradient_is_consistent_with_scores(setup):
    _, problem = setup
    s = random_direction(problem, 8)
    term = problem.terms[1]
    m_tr = torch.zeros_like(term.task.w_tr)
    m_val = torch.zeros_like(term.task.w_val)
    m_tr[[0, 2]] = term.task.w_tr[[0, 2]]
    m_val[1] = term.task.w_val[1]
    b = term.removal_gradient(m_tr, m_val)
    expected = term.train_scores(s)[[0, 2]].sum() + term.val_scores(s)[1]
    assert rel(b @ s, expected) < 1e-10
    full = term.removal_gradient(term.task.w_tr * 0, term.task.w_val)
    assert rel(full, term.total_grad()) < 1e-12


def test_non_adapted_parameters_enter_directly():
    """adapted_params = head only: λ enters L_I and L_O directly (general implicit case)."""
    problem, *_ = problem_for("implicit_proximal", adapted_params=["2.weight", "2.bias"])
    assert problem.fm.num_theta == 4
    v = random_direction(problem, 9)
    term = problem.terms[0]
    eps = 1e-5
    fd = (term_at(problem, 0, problem.lam + eps * v).value() - term_at(problem, 0, problem.lam - eps * v).value()) / (
        2 * eps
    )
    assert rel(term.total_grad() @ v, fd) < 1e-6
    assert rel(term.hvp_exact(v), term.dense_exact() @ v) < 1e-10
    fd_h = (
        term_at(problem, 0, problem.lam + 1e-4 * v).total_grad()
        - term_at(problem, 0, problem.lam - 1e-4 * v).total_grad()
    ) / 2e-4
    assert rel(term.hvp_exact(v), fd_h) < 1e-4
    s = random_direction(problem, 10)
    assert rel(term.train_scores(s)[1], _weight_fd(problem, 0, 1, s)) < 1e-6
