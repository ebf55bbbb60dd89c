"""The EK-FAC inner iHVP (inner.ihvp = "ekfac"): its defining properties against dense Gauss-Newton
matrices built from Jacobians, exactness where K-FAC is exact, and consistency of every product built on it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from meta_toys import classification_tasks, mlp, problem_for, random_direction, regression_tasks
from torch import nn
from torch.func import functional_call, hessian, jacrev

from worker.attribution.losses import output_hessian_factors, per_example_loss
from worker.attribution.meta import InnerOptions, MetaOptions, attribute_meta
from worker.attribution.meta.influence import build_problem
from worker.attribution.meta.inner import proximal_loss
from worker.attribution.meta.inner_ekfac import KroneckerInnerInverse
from worker.attribution.types import Examples


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def ekfac_options(reg: float = 2.0, **kw) -> MetaOptions:
    inner = InnerOptions(mode="implicit_proximal", reg=reg, ihvp="ekfac", tol=1e-11, max_iter=100)
    return MetaOptions(inner=inner, solver="exact", outer_l2=0.1, **kw)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_output_hessian_factors_sum_to_the_loss_hessian(loss: str) -> None:
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(5, 4, generator=g, dtype=torch.float64)
    targets = (
        torch.tensor([0, 3, 1, 1, 2])
        if loss == "cross_entropy"
        else torch.randn(5, 4, generator=g, dtype=torch.float64)
    )
    factors = output_hessian_factors(outputs, loss)  # (m, B, d)
    for b in range(5):
        expected = hessian(lambda o, b=b: per_example_loss(o.unsqueeze(0), targets[b : b + 1], loss).sum())(outputs[b])
        assert torch.allclose(factors[:, b].T @ factors[:, b], expected, atol=1e-14)


def gauss_newton(problem, k: int) -> torch.Tensor:
    """Dense Σ_z w_z J_zᵀ (∂²ℓ/∂o²) J_z over θ for task k at θ*, from per-example Jacobians."""
    fm, term = problem.fm, problem.terms[k]
    task = term.task

    def outputs(theta: torch.Tensor) -> torch.Tensor:
        out = functional_call(fm.module, {**fm.params(problem.lam, theta), **fm.buffers}, (task.x_tr,))
        return out.reshape(out.shape[0], -1)

    jac = jacrev(outputs)(term.theta)  # (B, d_out, p_θ)
    factors = output_hessian_factors(outputs(term.theta), fm.loss)  # (m, B, d_out)
    pseudo = torch.einsum("mbd,bdp->mbp", factors, jac) * task.w_tr.sqrt()[None, :, None]
    return torch.einsum("mbp,mbq->pq", pseudo, pseudo)


def block_indices(block) -> torch.Tensor:
    """θ indices of a block's weight matrix entries (d_out, d_in) in row-major order, bias as last column."""
    columns = (block.weight.stop - block.weight.start) // block.out_features
    weight = torch.arange(block.weight.start, block.weight.stop).reshape(block.out_features, columns)
    if block.bias is None:
        return weight.reshape(-1)
    bias = torch.arange(block.bias.start, block.bias.stop).reshape(-1, 1)
    return torch.cat([weight, bias], dim=1).reshape(-1)


def kronecker_of(term) -> KroneckerInnerInverse:
    kronecker = term.inverse.kronecker
    assert kronecker is not None
    return kronecker


@pytest.mark.parametrize("case", ["mse", "cross_entropy", "layer_norm"])
def test_eigenvalues_are_the_gauss_newton_diagonal_in_the_kronecker_eigenbasis(case: str) -> None:
    """EK-FAC's defining property, per layer: Λ = diag(Qᵀ G Q) with Q = Q_S ⊗ Q_A, G the exact Gauss-Newton
    block; entries outside Linear layers (LayerNorm) get the exact Gauss-Newton diagonal; all plus r."""
    if case == "cross_entropy":
        model, train, loss = mlp((2, 4, 3), seed=1), classification_tasks(2), "cross_entropy"
    elif case == "layer_norm":
        torch.manual_seed(2)
        model = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 1))
        train, loss = regression_tasks(2), "mse"
    else:
        model, train, loss = mlp((2, 3, 2), seed=3), two_output_tasks(), "mse"
    options = ekfac_options()
    problem = build_problem(model, train, None, loss, options)
    reg = options.inner.reg
    for k in range(len(problem.terms)):
        kronecker, ggn = kronecker_of(problem.terms[k]), gauss_newton(problem, k)
        assert kronecker.blocks
        for block in kronecker.blocks:
            index = block_indices(block)
            q = torch.kron(block.q_s, block.q_a)
            projected = (q.T @ ggn[index][:, index] @ q).diagonal().reshape(block.inverse.shape)
            assert torch.allclose(1.0 / block.inverse - reg, projected, rtol=1e-10, atol=1e-12)
        expected_rest = 1.0 / (ggn.diagonal()[kronecker.diagonal_index] + reg)
        assert (kronecker.diagonal_index.numel() > 0) == (case == "layer_norm")
        assert torch.allclose(kronecker.diagonal_inverse, expected_rest, rtol=1e-10)
        dense = kronecker.matrix()
        assert torch.allclose(dense, dense.T, atol=1e-12) and float(torch.linalg.eigvalsh(dense)[0]) > 0


def two_output_tasks() -> Examples:
    base = regression_tasks(3)
    g = torch.Generator().manual_seed(5)
    second = base.targets + 0.5 * torch.randn(base.targets.shape, generator=g, dtype=base.targets.dtype)
    return dataclasses.replace(base, targets=torch.cat([base.targets, second], dim=1))


def test_ekfac_is_exact_for_a_linear_model_with_mse() -> None:
    """A single Linear layer under ½‖o − y‖²: ∇²L_tr = I ⊗ Σ w a aᵀ is a Kronecker product, so EK-FAC's
    Ã⁻¹ is A⁻¹ and every score equals the dense inner solve's."""
    torch.manual_seed(0)
    model, train, queries = nn.Linear(2, 2), two_output_tasks(), two_output_tasks()
    ekfac = build_problem(model, train, queries, "mse", ekfac_options())
    dense_options = dataclasses.replace(ekfac_options(), inner=dataclasses.replace(ekfac_options().inner, ihvp="dense"))
    for term in ekfac.terms:
        a = hessian(lambda t, term=term: proximal_loss(ekfac.fm, term.task, 2.0, ekfac.lam, t))(term.theta)
        assert rel(kronecker_of(term).matrix(), torch.linalg.inv(a)) < 1e-12
    kwargs = dict(loss="mse", unit="task", mode="aggregate", top_k=3)
    with_ekfac = attribute_meta(model, train, queries, options=ekfac_options(damping=0.5), **kwargs)
    with_dense = attribute_meta(
        model, train, queries, options=dataclasses.replace(dense_options, damping=0.5), **kwargs
    )
    assert rel(with_ekfac.scores, with_dense.scores) < 1e-10


def test_products_on_the_ekfac_inverse_are_consistent() -> None:
    """With Ã⁻¹ in place of A⁻¹ the matrix-free total HVP still equals its dense counterpart (θ' is built
    from the same Ã⁻¹ both ways), and the matrix-free solvers agree with the exact one."""
    problem, model, train, queries, options = problem_for("implicit_proximal", "ekfac")
    v = random_direction(problem, 4)
    for term in problem.terms[:2]:
        assert term.inverse.kronecker is not None
        assert rel(term.hvp_exact(v), term.dense_exact() @ v) < 1e-10
        assert rel(term.hvp_drop(v), term.dense_drop() @ v) < 1e-10
    kwargs = dict(loss="mse", unit="task", mode="aggregate", top_k=2)
    exact = attribute_meta(model, train, queries, options=dataclasses.replace(options, damping=5.0), **kwargs)
    cg = attribute_meta(
        model, train, queries, options=dataclasses.replace(options, damping=5.0, solver="cg", tol=1e-12), **kwargs
    )
    assert rel(cg.scores, exact.scores) < 1e-7
    instances = attribute_meta(
        model,
        train,
        queries,
        options=dataclasses.replace(options, damping=5.0),
        loss="mse",
        unit="instance",
        mode="aggregate",
        top_k=2,
    )
    assert torch.isfinite(instances.scores).all()
