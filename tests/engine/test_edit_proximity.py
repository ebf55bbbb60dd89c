"""The default proximity λ of an edit and the ``boundary`` line search's search for the edge of the acceptable steps.

λ = DEFAULT_PROXIMITY_FRACTION × trace(G)/D at the current weights, G = (1/N) Σ_i w_i J_iᵀ H_i J_i over the tracked
layers. The tests write trace(G) from explicit per-example Jacobians (one backward pass per row and output) and
compare: where the edit stores the rows of G's square root, λ is exact (curvature_tol 0: to rounding, 1e-9
relative) and the same whichever rows are removed; where it does not (matrix-free products, first-order edits), the
trace comes from the output terms holding 95% of the output-curvature weight, scaled up by that share, within 5%
(the share left out; on the benchmark's digits models it is within 1%). The edge search is checked on functions
written here: exact at the first secant try for a quadratic J_S (φ linear), within BOUNDARY_TOLERANCE of the edge
for a steep one, None when nothing is acceptable.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.engine.test_editing_stored_curvature import REMOVE, trained
from worker.attribution import AttributionError, CurvatureScale, EditOptions, Examples, edit_parameters
from worker.attribution.losses import LossName
from worker.attribution.options import DEFAULT_PROXIMITY_FRACTION, WEIGHT_DECAY_EVIDENCE
from worker.attribution.proximal import (
    ARMIJO,
    BOUNDARY_TOLERANCE,
    EDGE_EVALUATIONS,
    ProximalObjective,
    _acceptable_edge,
)


def explicit_mean_eigenvalue(model: nn.Module, data: Examples, loss: LossName) -> float:
    """trace((1/N) Σ_i w_i J_iᵀ H_i J_i) / D over all parameters (every parameter here is in a tracked layer), with
    J_i the (C, D) Jacobian of row i's outputs and H_i = diag(p) − p pᵀ (cross-entropy) or I (mse)."""
    parameters = list(model.parameters())
    size = sum(p.numel() for p in parameters)
    total = 0.0
    for i in range(len(data)):
        outputs = model(data.inputs[i : i + 1])[0]
        rows = []
        for k in range(outputs.shape[0]):
            grads = torch.autograd.grad(outputs[k], parameters, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        jacobian = torch.stack(rows)
        if loss == "cross_entropy":
            p = torch.softmax(outputs.detach(), dim=0)
            hessian = torch.diag(p) - torch.outer(p, p)
        else:
            hessian = torch.eye(outputs.shape[0], dtype=outputs.dtype)
        weight = 1.0 if data.weights is None else float(data.weights[i])
        total += weight * float(torch.trace(hessian @ jacobian @ jacobian.T))
    return total / len(data) / size


def explicit_implied_weight_decay(model: nn.Module, data: Examples, loss: LossName) -> tuple[float, float]:
    """(−⟨g₀, θ₀⟩/‖θ₀‖², cos(g₀, −θ₀)) with g₀ = ∇ (1/N) Σ_i w_i ℓ_i by autograd over every parameter."""
    parameters = list(model.parameters())
    outputs = model(data.inputs)
    if loss == "cross_entropy":
        values = torch.nn.functional.cross_entropy(outputs, data.targets, reduction="none")
    else:
        values = 0.5 * (outputs - data.targets).pow(2).sum(1)
    weights = torch.ones_like(values) if data.weights is None else data.weights
    gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad((weights * values).mean(), parameters)])
    theta = torch.cat([p.detach().reshape(-1) for p in parameters])
    along = -float(gradient @ theta)
    return along / float(theta @ theta), along / float(gradient.norm() * theta.norm())


@pytest.mark.parametrize("kind", ["mlp", "cnn", "mse"])
def test_the_default_proximity_is_the_mean_gauss_newton_eigenvalue(kind) -> None:
    """Without an L2 penalty in its training, a model's gradient shows none (cosine below the evidence needed):
    the default λ is the curvature rule's."""
    model, data, loss = trained(kind)  # type: ignore[arg-type]
    expected = DEFAULT_PROXIMITY_FRACTION * explicit_mean_eigenvalue(model, data, loss)
    decay, cosine = explicit_implied_weight_decay(model, data, loss)
    assert cosine < WEIGHT_DECAY_EVIDENCE

    def diagnostics(rows: torch.Tensor, estimator: str, products: str, preconditioner: str = "none") -> dict:
        edit = EditOptions(
            estimator=estimator,  # type: ignore[arg-type]
            curvature_products=products,  # type: ignore[arg-type]
            curvature_tol=0.0,
            preconditioner=preconditioner,  # type: ignore[arg-type]
        )
        return edit_parameters(model, data, rows, loss=loss, edit=edit).diagnostics

    stored = [diagnostics(rows, "newton", "stored", "kronecker") for rows in (REMOVE, torch.arange(30))]
    for result in stored:
        assert "exact trace" in result["proximity_rule"]
        assert result["proximity"] == pytest.approx(expected, rel=1e-9)
        assert result["implied_weight_decay"] == pytest.approx(decay, rel=1e-9)
        assert result["implied_weight_decay_cosine"] == pytest.approx(cosine, rel=1e-9)
    # matrix-free edits take the trace over every row, or, fitting the preconditioner, over the remaining rows
    # (which the preconditioner needs) plus the removed rows
    for estimator, products, preconditioner in (
        ("newton", "matrix_free", "none"),
        ("newton", "matrix_free", "kronecker"),
        ("first_order", "stored", "none"),
    ):
        result = diagnostics(REMOVE, estimator, products, preconditioner)
        assert "95% of the weight" in result["proximity_rule"]
        assert result["proximity"] == pytest.approx(expected, rel=0.05)


def linear_excess(edge: float) -> tuple[list[float], object, float]:
    """φ(s) for J_S(s) = J₀ + g s + κ s²/2 along the step, with κ putting the Armijo edge at ``edge``; the list
    records the scales tried."""
    slope = -1.0
    curvature = -2 * (1 - ARMIJO) * slope / edge
    tried: list[float] = []

    def excess(scale: float) -> float:
        tried.append(scale)
        return (1 - ARMIJO) * slope + 0.5 * curvature * scale

    return tried, excess, (1 - ARMIJO) * slope


@pytest.mark.parametrize("edge", [0.03, 0.4, 1.0])
def test_the_edge_of_a_quadratic_objective_is_found_in_a_few_tries(edge: float) -> None:
    """φ is linear: the secant estimate is the edge itself, the tries after it only confirm it (the halvings and
    bisection of a plain search took 1 + log2(1.18 / edge) + 5 tries: 11 for the first edge)."""
    tried, excess, at_zero = linear_excess(edge)
    found = _acceptable_edge(excess, 1 / 0.85, at_zero)  # type: ignore[arg-type]
    assert found is not None
    assert edge * (1 - BOUNDARY_TOLERANCE) <= found <= edge * (1 + 1e-12)
    assert len(tried) <= 5


def test_the_edge_of_a_steep_objective_is_found_within_the_tolerance() -> None:
    """J_S(s) = −s + (e^{8s} − 1 − 8s)/40: flat, then exploding (a large removal's step on a neural network)."""
    slope = -1.0

    def value(scale: float) -> float:
        return -scale + (math.exp(8 * scale) - 1 - 8 * scale) / 40

    def excess(scale: float) -> float:
        tried.append(scale)
        return value(scale) / scale - ARMIJO * slope

    low, high = 1e-6, 1.0  # the edge by bisection, to rounding
    for _ in range(200):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if value(middle) / middle - ARMIJO * slope <= 0 else (low, middle)
    tried: list[float] = []
    found = _acceptable_edge(excess, 1 / 0.85, (1 - ARMIJO) * slope)
    assert found is not None
    assert low * (1 - BOUNDARY_TOLERANCE) <= found <= low
    assert len(tried) <= EDGE_EVALUATIONS


def test_no_acceptable_scale_gives_none() -> None:
    tried: list[float] = []

    def excess(scale: float) -> float:
        tried.append(scale)
        return 1.0

    assert _acceptable_edge(excess, 1 / 0.85, -1.0) is None
    assert len(tried) <= EDGE_EVALUATIONS


def test_an_earlier_edits_curvature_scale_is_reused_and_gives_the_same_edit(monkeypatch) -> None:
    """trace(G)/D over every row does not depend on the removed rows: an edit given the scale an earlier edit of
    the same model returned takes the same λ without computing it, and edits as if it had (1e-6 relative: the
    computed trace differs from the reused one only by rounding)."""
    model, data, loss = trained("mlp")
    edit = EditOptions(estimator="newton", curvature_products="matrix_free")
    first = edit_parameters(model, data, REMOVE, loss=loss, edit=edit)
    scale = first.curvature_scale
    assert scale is not None and first.diagnostics["curvature_scale"] == scale.as_dict()
    assert first.diagnostics["proximity"] == pytest.approx(DEFAULT_PROXIMITY_FRACTION * scale.mean_eigenvalue)
    others = torch.arange(30)
    fresh = edit_parameters(model, data, others, loss=loss, edit=edit)

    def not_again(self: ProximalObjective) -> None:
        raise AssertionError("the curvature scale was computed again")

    monkeypatch.setattr(ProximalObjective, "mean_eigenvalue", not_again)
    reused = edit_parameters(model, data, others, loss=loss, edit=edit, curvature_scale=scale)
    assert reused.diagnostics["proximity"] == first.diagnostics["proximity"]
    assert "computed by an earlier edit" in reused.diagnostics["proximity_rule"]
    assert reused.curvature_scale == scale
    for key, value in fresh.state.items():
        assert torch.allclose(reused.state[key], value, rtol=1e-6, atol=1e-9), key
    given = edit_parameters(model, data, others, loss=loss, edit=EditOptions(estimator="newton", proximity=0.3))
    assert given.curvature_scale is None and "curvature_scale" not in given.diagnostics


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_a_curvature_scale_that_is_not_a_positive_finite_number_is_refused(value: float) -> None:
    model, data, loss = trained("mlp")
    with pytest.raises(AttributionError, match="positive finite"):
        edit_parameters(model, data, REMOVE, loss=loss, curvature_scale=CurvatureScale(value, "made up"))
