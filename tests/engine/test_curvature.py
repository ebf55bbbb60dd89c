"""Curvature fits and their preconditioners against explicit dense math (float64).

Tolerances: dense-operator comparisons 1e-9 relative (float64 round-off); Monte Carlo true-Fisher
estimates 5% relative Frobenius error with 4000 label draws per example.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.engine.helpers import SequenceNet, SmallConvNet, dense_operator, explicit_gradients, make_data, make_mlp
from worker.attribution import Examples, FitOptions, fit_curvature
from worker.attribution.hooks import resolve_layers

REL = 1e-9


def close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> bool:
    return float((a - b).norm()) <= rel * max(float(b.norm()), 1e-30)


def block_diag(blocks: list[torch.Tensor]) -> torch.Tensor:
    return torch.block_diag(*blocks)


def test_ekfac_preconditioner_equals_dense_kronecker_eigenbasis() -> None:
    model, data = make_mlp(), make_data(40, (5,), 3, 0)
    fit = fit_curvature(model, data, "cross_entropy", FitOptions(strategy="ekfac", batch_size=16))
    tracked = resolve_layers(model, None)
    p = fit.preconditioner(None, dtype=torch.float64)
    blocks = []
    for name in fit.layer_names:
        basis, lam = fit.bases[name], fit.eigenvalues[name]
        q = torch.kron(basis.gradient_eigenvectors, basis.activation_eigenvectors)
        damping = 0.1 * float(lam.mean())
        assert abs(p.dampings[name] - damping) <= 1e-12 * damping
        blocks.append(q @ torch.diag(1.0 / (lam.flatten() + damping)) @ q.T)
    assert close(dense_operator(p, tracked), block_diag(blocks))
    # a user damping overrides the default on every layer
    p2 = fit.preconditioner(0.5, dtype=torch.float64)
    assert all(d == 0.5 for d in p2.dampings.values())


def test_kfac_preconditioner_equals_damped_kronecker_inverse() -> None:
    model, data = make_mlp(), make_data(40, (5,), 3, 1)
    fit = fit_curvature(model, data, "cross_entropy", FitOptions(strategy="kfac", batch_size=16))
    tracked = resolve_layers(model, None)
    p = fit.preconditioner(None, dtype=torch.float64)
    blocks = []
    for name in fit.layer_names:
        a, s = fit.covariances[name].activation, fit.covariances[name].gradient
        kron = torch.kron(s, a)  # weight-matrix (row-major) layout: vec(S V A) = (S ⊗ A) vec(V)
        eigen = torch.outer(torch.linalg.eigvalsh(s).clamp_min(0), torch.linalg.eigvalsh(a).clamp_min(0))
        damping = 0.1 * float(eigen.mean())
        assert abs(p.dampings[name] - damping) <= 1e-9 * damping
        blocks.append(torch.linalg.inv(kron + damping * torch.eye(kron.shape[0], dtype=kron.dtype)))
    assert close(dense_operator(p, tracked), block_diag(blocks), rel=1e-8)


def test_diagonal_and_identity_preconditioners() -> None:
    model, data = make_mlp(), make_data(30, (5,), 3, 2)
    tracked = resolve_layers(model, None)
    fit = fit_curvature(model, data, "cross_entropy", FitOptions(strategy="diagonal", fisher="empirical"))
    grads = explicit_gradients(model, data, "cross_entropy")
    diagonal = grads.pow(2).mean(0)
    offset, dampings = 0, []
    for layer in tracked:
        part = diagonal[offset : offset + layer.num_parameters]
        assert close(fit.diagonals[layer.name].flatten(), part)
        dampings.append(torch.full_like(part, 0.1 * float(part.mean())))
        offset += layer.num_parameters
    expected = torch.diag(1.0 / (diagonal + torch.cat(dampings)))
    assert close(dense_operator(fit.preconditioner(None, dtype=torch.float64), tracked), expected)
    identity = fit_curvature(model, data, "cross_entropy", FitOptions(strategy="identity"))
    dense = dense_operator(identity.preconditioner(None, dtype=torch.float64), tracked)
    assert torch.equal(dense, torch.eye(dense.shape[0], dtype=torch.float64))


def test_single_linear_empirical_fit_matches_explicit_expectation() -> None:
    torch.manual_seed(3)
    model = nn.Linear(4, 3).double()
    data = make_data(25, (4,), 3, 3)
    kfac = fit_curvature(model, data, "cross_entropy", FitOptions(strategy="kfac", fisher="empirical", batch_size=7))
    ekfac = fit_curvature(model, data, "cross_entropy", FitOptions(strategy="ekfac", fisher="empirical", batch_size=7))
    a = torch.cat([data.inputs, torch.ones(25, 1, dtype=torch.float64)], dim=1)
    g = torch.softmax(model(data.inputs), 1).detach() - F.one_hot(data.targets, 3).double()
    expected_a = a.T @ a / 25
    expected_s = g.T @ g / 25
    for fit in (kfac, ekfac):
        assert close(fit.covariances[""].activation, expected_a)
        assert close(fit.covariances[""].gradient, expected_s)
    basis = ekfac.bases[""]
    per_example = torch.einsum("bo,bi->boi", g, a)
    rotated = basis.gradient_eigenvectors.T @ per_example @ basis.activation_eigenvectors
    assert close(ekfac.eigenvalues[""], rotated.pow(2).mean(0))


def test_true_fisher_sampling_matches_expected_fisher() -> None:
    torch.manual_seed(4)
    model = nn.Linear(3, 4).double()
    data = make_data(5, (3,), 4, 4)
    options = FitOptions(strategy="kfac", fisher="true", fisher_samples=4000, seed=7)
    fit = fit_curvature(model, data, "cross_entropy", options)
    p = torch.softmax(model(data.inputs), 1).detach()
    expected = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    assert close(fit.covariances[""].gradient, expected, rel=0.05)
    again = fit_curvature(model, data, "cross_entropy", options)
    assert torch.equal(again.covariances[""].gradient, fit.covariances[""].gradient)
    other = fit_curvature(model, data, "cross_entropy", FitOptions(strategy="kfac", fisher_samples=4000, seed=8))
    assert not torch.equal(other.covariances[""].gradient, fit.covariances[""].gradient)
    # mse: labels y ~ N(f(x), I) give S = E[eps eps^T] = I
    targets = torch.randn(5, 4, dtype=torch.float64)
    mse_fit = fit_curvature(model, Examples(data.inputs, targets), "mse", options)
    assert close(mse_fit.covariances[""].gradient, torch.eye(4, dtype=torch.float64), rel=0.05)


def test_ekfac_with_positions_matches_explicit_corrected_eigenvalues() -> None:
    """Conv2d and sequence Linear layers: per-example gradients are sums over positions (not rank one)."""
    for model, data in (
        (SmallConvNet().double(), make_data(12, (2, 5, 5), 3, 5)),
        (SequenceNet().double(), make_data(12, (6, 4), 3, 6)),
    ):
        fit = fit_curvature(
            model, data, "cross_entropy", FitOptions(strategy="ekfac", fisher="empirical", batch_size=5)
        )
        tracked = resolve_layers(model, None)
        grads = explicit_gradients(model, data, "cross_entropy")
        offset = 0
        for layer in tracked:
            g = grads[:, offset : offset + layer.num_parameters].reshape(-1, layer.out_features, layer.in_features)
            offset += layer.num_parameters
            basis = fit.bases[layer.name]
            rotated = basis.gradient_eigenvectors.T @ g @ basis.activation_eigenvectors
            assert close(fit.eigenvalues[layer.name], rotated.pow(2).mean(0))
