"""Sign test on a convex toy (linear model, docs/methods.md, meta methods): predicted Δλ_{−k} = FD derivative of the
proximal retrain; the full removal is (H − H_k + ρI)⁻¹ g_k; edit_meta returns λ* + Δλ."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from meta_toys import implicit_options, regression_tasks, unrolled_options

from worker.attribution import EditOptions
from worker.attribution.meta import attribute_meta, edit_meta
from worker.attribution.meta.influence import HessianInverse, build_problem
from worker.attribution.meta.retrain import proximal_retrain, reweighted_tasks
from worker.attribution.meta.total import make_term
from worker.attribution.types import AttributionError

RHO = 0.05


def trained_linear_model(options):
    """A linear model at λ* = argmin F (F is quadratic, so one Newton step from anywhere is exact)."""
    torch.manual_seed(3)
    model = torch.nn.Linear(2, 1)
    model = torch.nn.Sequential(model)
    train = regression_tasks(5, seed=2)
    problem = build_problem(model, train, None, "mse", options)
    inverse = HessianInverse(problem)
    step = torch.linalg.solve(inverse.hessian, problem.total.gradient())
    new = problem.lam - step
    with torch.no_grad():
        model[0].weight.copy_(new[:2].reshape(1, 2).float())
        model[0].bias.copy_(new[2:].float())
    return model, train


@pytest.mark.parametrize("mode", ["implicit_proximal", "unrolled"])
def test_predicted_removal_matches_proximal_retrain(mode):
    options = implicit_options() if mode == "implicit_proximal" else unrolled_options()
    options.damping = RHO
    model, train = trained_linear_model(options)
    queries = regression_tasks(2, seed=9)
    problem = build_problem(model, train, queries, "mse", options)
    assert problem.diagnostics["stationarity_ratio"] < 1e-4  # float32 storage of λ*
    inverse = HessianInverse(problem)
    lam_star = problem.lam
    eps = 1e-4
    s_q = inverse.solve(sum(t.total_grad() for t in problem.query_terms))
    for k, tid in enumerate(problem.task_ids):
        h_k = problem.total.task_dense(k)
        g_k = problem.terms[k].total_grad()
        predicted = inverse.solve(g_k)
        tasks = reweighted_tasks(problem.train_tasks, task_scale={tid: 1 - eps})
        # the retrain starts at the float32-rounded λ*; subtract the gradient left there
        base = proximal_retrain(problem.fm, problem.train_tasks, lam_star, options, RHO, inverse.hessian, tol=1e-13)
        moved = proximal_retrain(problem.fm, tasks, lam_star, options, RHO, inverse.hessian - eps * h_k, tol=1e-13)
        fd = (moved.lam - base.lam) / eps
        assert float((fd - predicted).norm() / predicted.norm()) < 1e-3
        removed = proximal_retrain(
            problem.fm,
            reweighted_tasks(problem.train_tasks, task_scale={tid: 0.0}),
            lam_star,
            options,
            RHO,
            inverse.hessian - h_k,
            tol=1e-13,
        )
        exact_full = torch.linalg.solve(inverse.hessian - h_k + RHO * torch.eye(3, dtype=torch.float64), g_k)
        full = removed.lam - base.lam
        assert float((full - exact_full).norm() / exact_full.norm()) < 1e-6
        # sign of ΔQ: predicted s_Q·g_k vs the FD of the query loss along the retrain
        q_moved = sum(make_term(problem.fm, t.task, moved.lam, options.inner).value() for t in problem.query_terms)
        q_base = sum(make_term(problem.fm, t.task, base.lam, options.inner).value() for t in problem.query_terms)
        assert abs((q_moved - q_base) / eps - float(s_q @ g_k)) < 1e-3 * max(1e-3, abs(float(s_q @ g_k)))


def test_edit_meta_and_attribute_meta_on_convex_toy():
    options = implicit_options()
    options.damping = RHO
    model, train = trained_linear_model(options)
    queries = regression_tasks(2, seed=9)
    problem = build_problem(model, train, queries, "mse", options)
    inverse = HessianInverse(problem)
    remove = torch.tensor([1, 3])
    edited = edit_meta(model, train, remove, loss="mse", unit="task", options=options).state
    assert set(edited) == set(model.state_dict()) and edited["0.weight"].dtype == torch.float32
    grads = [problem.terms[k].total_grad() for k in (1, 3)]
    expected = problem.lam + inverse.solve(grads[0] + grads[1])
    got = torch.cat([edited["0.weight"].reshape(-1), edited["0.bias"]]).double()
    assert float((got - expected).norm()) < 1e-6
    # instance edit of every row of task 1's validation split = the task edit of task 1 (val weights only)
    rows = problem.train_tasks[1].rows_val
    edited_rows = edit_meta(model, train, rows, loss="mse", unit="instance", options=options).state
    expected_rows = problem.lam + inverse.solve(grads[0])
    got_rows = torch.cat([edited_rows["0.weight"].reshape(-1), edited_rows["0.bias"]]).double()
    assert float((got_rows - expected_rows).norm()) < 1e-6
    result = attribute_meta(model, train, queries, loss="mse", unit="task", mode="aggregate", top_k=2, options=options)
    s_q = inverse.solve(sum(t.total_grad() for t in problem.query_terms))
    expected_scores = torch.stack([t.total_grad() for t in problem.terms]) @ s_q
    assert torch.allclose(result.scores.double(), expected_scores, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_newton_removal_is_the_exact_proximal_leave_out_on_a_quadratic(solver):
    """F is quadratic here, so removal='newton' — (H − Σ_S H_k + ρI)⁻¹ Σ_S g_k — is the proximal retrain
    without the tasks S itself (to 1e-6, the float32 storage of λ*), for edits and for task scores."""
    options = implicit_options(damping=RHO, removal="newton")
    model, train = trained_linear_model(implicit_options(damping=RHO))
    queries = regression_tasks(2, seed=9)
    options.solver, options.tol = solver, 1e-13
    problem = build_problem(model, train, queries, "mse", options)
    inverse = HessianInverse(problem)
    hessian = sum(problem.total.task_dense(k) for k in range(5)) + options.outer_l2 * torch.eye(3, dtype=torch.float64)
    base = proximal_retrain(problem.fm, problem.train_tasks, problem.lam, options, RHO, hessian, tol=1e-13)

    def retrain_without(ks):
        tasks = reweighted_tasks(problem.train_tasks, task_scale={problem.task_ids[k]: 0.0 for k in ks})
        reduced = hessian - sum(problem.total.task_dense(k) for k in ks)
        return proximal_retrain(problem.fm, tasks, problem.lam, options, RHO, reduced, tol=1e-13).lam - base.lam

    removed = torch.tensor([problem.task_ids[1], problem.task_ids[3]])
    edited = edit_meta(model, train, removed, loss="mse", unit="task", options=options).state
    got = torch.cat([edited["0.weight"].reshape(-1), edited["0.bias"]]).double() - problem.lam
    expected = retrain_without([1, 3])
    assert float((got - expected).norm() / expected.norm()) < 1e-6
    proximal = edit_meta(
        model,
        train,
        removed,
        loss="mse",
        unit="task",
        options=options,
        edit=EditOptions(estimator="proximal", tol=1e-9, max_steps=20),
    )
    got_proximal = torch.cat([proximal.state["0.weight"].reshape(-1), proximal.state["0.bias"]]).double() - problem.lam
    assert float((got_proximal - expected).norm() / expected.norm()) < 1e-6
    assert proximal.diagnostics["solver"]["converged"]
    assert proximal.diagnostics["remaining_loss_after"] <= proximal.diagnostics["remaining_loss_before"]
    first_order = inverse.solve(problem.terms[1].total_grad() + problem.terms[3].total_grad())
    assert float((first_order - expected).norm() / expected.norm()) > 1e-3  # the correction is not negligible
    result = attribute_meta(model, train, queries, loss="mse", unit="task", mode="aggregate", top_k=2, options=options)
    q_grad = sum(t.total_grad() for t in problem.query_terms)
    expected_scores = torch.stack([q_grad @ retrain_without([k]) for k in range(5)])
    assert torch.allclose(result.scores.double(), expected_scores, rtol=1e-5, atol=1e-7)
    assert result.diagnostics["removal"] == "newton"


def test_newton_removal_is_for_task_units_and_needs_exact_or_cg():
    model, train = trained_linear_model(implicit_options(damping=RHO))
    with pytest.raises(AttributionError, match="task influence"):
        attribute_meta(
            model,
            train,
            train,
            loss="mse",
            unit="instance",
            mode="aggregate",
            top_k=1,
            options=implicit_options(damping=RHO, removal="newton"),
        )
    with pytest.raises(AttributionError, match="'exact' or 'cg'"):
        attribute_meta(
            model,
            train,
            train,
            loss="mse",
            unit="task",
            mode="aggregate",
            top_k=1,
            options=dataclasses.replace(implicit_options(damping=RHO, removal="newton"), solver="neumann"),
        )
