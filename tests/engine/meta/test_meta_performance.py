"""Performance changes that must not change results: one intra-op thread for small problems (restored
afterwards), the dense inner Hessian reused by θ', and the unrolled θ_K adapted once."""

from __future__ import annotations

import torch
from meta_toys import classification_tasks, mlp, problem_for, unrolled_options
from torch.func import hessian, jacfwd

from worker.attribution.meta import attribute_meta
from worker.attribution.meta.inner import unrolled_adapt


def test_small_problems_run_on_one_thread_and_restore_the_count(monkeypatch):
    seen = []
    import worker.attribution.meta.influence as influence

    original = influence._build_problem

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(influence, "_build_problem", spy)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        options = unrolled_options()
        options.damping = 20.0
        model = mlp((2, 3, 3), seed=1)
        attribute_meta(
            model,
            classification_tasks(3, seed=0),
            classification_tasks(2, seed=5),
            loss="cross_entropy",
            unit="task",
            mode="aggregate",
            top_k=2,
            options=options,
        )
        assert seen == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_implicit_dense_jac_reuses_the_inner_hessian():
    problem = problem_for("implicit_proximal", "dense")[0]
    term = problem.terms[0]
    assert term.inverse.matrix is not None
    fresh = hessian(lambda th: term.inner_loss(term.lam, th))(term.theta)
    assert torch.equal(term.inverse.matrix, fresh)
    mixed = jacfwd(lambda lm: term._grad_theta_inner(lm, term.theta))(term.lam)
    assert torch.allclose(term.dense_jac(), -torch.linalg.solve(fresh, mixed), rtol=1e-12, atol=1e-14)


def test_unrolled_theta_is_the_adapted_parameters():
    problem = problem_for("unrolled")[0]
    term = problem.terms[0]
    expected = unrolled_adapt(term.fm, term.task, term.options, term.lam)
    assert torch.allclose(term.theta, expected, rtol=1e-13, atol=1e-15)
    assert not term.theta.requires_grad


def test_batched_unrolled_dense_hessians_match_the_per_task_ones():
    problem = problem_for("unrolled")[0]
    total = problem.total
    batched = total.dense_all()
    assert len(batched) == len(total.terms) >= 2
    for k, h in enumerate(batched):
        assert torch.allclose(h, total.task_dense(k), rtol=1e-12, atol=1e-13)
