"""Exact / CG / LiSSA solvers against a dense solve with a Gauss-Newton matrix or Hessian built
independently by torch.autograd.functional (float64).

Tolerances: dense Cholesky 1e-9 relative; CG 1e-7 relative (tol 1e-12); LiSSA 1e-6 relative (tol 1e-10).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from tests.engine.helpers import dense_operator, make_data, make_mlp
from worker.attribution import Examples
from worker.attribution.curvature.exact import exact_preconditioner, flatten_vectors, unflatten_vectors
from worker.attribution.hooks import resolve_layers


def _param_dict(model, tracked, flat):
    params, offset = {}, 0
    for layer in tracked:
        size = layer.num_parameters
        matrix = flat[offset : offset + size].reshape(layer.out_features, layer.in_features)
        offset += size
        cols = layer.in_features - int(layer.has_bias)
        params[f"{layer.name}.weight"] = matrix[:, :cols]
        if layer.has_bias:
            params[f"{layer.name}.bias"] = matrix[:, cols]
    return params


def explicit_curvature(model, data: Examples, loss: str, kind: str) -> torch.Tensor:
    tracked = resolve_layers(model, None)
    theta = torch.cat(
        [
            torch.cat([layer.module.weight.detach(), layer.module.bias.detach()[:, None]], 1).flatten()
            for layer in tracked
        ]
    )

    def outputs(flat, x):
        return functional_call(model, _param_dict(model, tracked, flat), (x,))

    if kind == "hessian":

        def mean_loss(flat):
            out = outputs(flat, data.inputs)
            if loss == "cross_entropy":
                return F.cross_entropy(out, data.targets, reduction="sum") / len(data)
            return 0.5 * (out - data.targets).pow(2).sum() / len(data)

        return hessian(mean_loss, theta)
    total = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for i in range(len(data)):
        x = data.inputs[i : i + 1]
        j = jacobian(lambda f, x=x: outputs(f, x)[0], theta)  # (C, D)
        if loss == "cross_entropy":
            p = torch.softmax(outputs(theta, x)[0], 0).detach()
            h = torch.diag(p) - torch.outer(p, p)
        else:
            h = torch.eye(j.shape[0], dtype=torch.float64)
        total += j.T @ h @ j
    return total / len(data)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "loss,kind", [("cross_entropy", "gauss_newton"), ("cross_entropy", "hessian"), ("mse", "gauss_newton")]
)
def test_dense_solver_matches_explicit_inverse(loss: str, kind: str) -> None:
    model = make_mlp(d_in=3, hidden=4, classes=3)
    data = make_data(20, (3,), 3, 0)
    if loss == "mse":
        data = Examples(
            data.inputs, torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        )
    tracked = resolve_layers(model, None)
    curvature = explicit_curvature(model, data, loss, kind)
    damping = None if kind == "gauss_newton" else 1.0
    p = exact_preconditioner(model, tracked, data, loss, "exact", kind, damping, 100, 1e-6, 7, torch.device("cpu"))
    used = 0.1 * float(torch.trace(curvature)) / curvature.shape[0] if damping is None else damping
    assert abs(p.damping - used) <= 1e-9 * used
    expected = torch.linalg.inv(curvature + used * torch.eye(curvature.shape[0], dtype=torch.float64))
    assert rel_err(dense_operator(p, tracked), expected) <= 1e-9


@pytest.mark.parametrize(
    "solver,kind,tol,rel",
    [
        ("cg", "gauss_newton", 1e-12, 1e-7),
        ("cg", "hessian", 1e-12, 1e-7),
        ("lissa", "gauss_newton", 1e-10, 1e-6),
        ("lissa", "hessian", 1e-10, 1e-6),
    ],
)
def test_iterative_solvers_match_explicit_solve(solver: str, kind: str, tol: float, rel: float) -> None:
    model = make_mlp(d_in=3, hidden=4, classes=3)
    data = make_data(20, (3,), 3, 0)
    tracked = resolve_layers(model, None)
    curvature = explicit_curvature(model, data, "cross_entropy", kind)
    damping = 0.5 if solver == "cg" else 2.0  # positive definite damped Hessian; fast LiSSA contraction
    assert float(torch.linalg.eigvalsh(curvature).min()) + damping > 0
    p = exact_preconditioner(
        model, tracked, data, "cross_entropy", solver, kind, damping, 2000, tol, 20, torch.device("cpu")
    )
    rhs = torch.randn(3, curvature.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = flatten_vectors(p.precondition(unflatten_vectors(rhs, tracked)), tracked)
    expected = torch.linalg.solve(curvature + damping * torch.eye(curvature.shape[0], dtype=torch.float64), rhs.T).T
    assert rel_err(got, expected) <= rel
    assert p.diagnostics()["converged"]


def test_iterative_default_damping_estimates_trace() -> None:
    """Default damping of cg/lissa: 0.1 x a Hutchinson estimate of trace / D (16 probes): within 50%."""
    model = make_mlp(d_in=3, hidden=4, classes=3)
    data = make_data(20, (3,), 3, 0)
    tracked = resolve_layers(model, None)
    curvature = explicit_curvature(model, data, "cross_entropy", "gauss_newton")
    exact = 0.1 * float(torch.trace(curvature)) / curvature.shape[0]
    p = exact_preconditioner(
        model, tracked, data, "cross_entropy", "cg", "gauss_newton", None, 50, 1e-8, 7, torch.device("cpu")
    )
    assert 0.5 * exact <= p.damping <= 1.5 * exact
