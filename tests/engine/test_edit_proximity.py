"""The default proximity λ of an edit.

λ = DEFAULT_PROXIMITY_FRACTION × trace(G)/D at the current weights, G = (1/N) Σ_i w_i J_iᵀ H_i J_i over the tracked
layers. The tests write trace(G) from explicit per-example Jacobians (one backward pass per row and output) and
compare: where the edit stores the rows of G's square root, λ is exact (curvature_tol 0: to rounding, 1e-9
relative) and the same whichever rows are removed; where it does not (matrix-free products, first-order edits), the
trace comes from the output terms holding 95% of the output-curvature weight, scaled up by that share, within 5%
(the share left out; on the benchmark's digits models it is within 1%).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.engine.test_editing_stored_curvature import REMOVE, trained
from worker.attribution import EditOptions, Examples, edit_parameters
from worker.attribution.losses import LossName
from worker.attribution.options import DEFAULT_PROXIMITY_FRACTION


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


@pytest.mark.parametrize("kind", ["mlp", "cnn", "mse"])
def test_the_default_proximity_is_the_mean_gauss_newton_eigenvalue(kind) -> None:
    model, data, loss = trained(kind)  # type: ignore[arg-type]
    expected = DEFAULT_PROXIMITY_FRACTION * explicit_mean_eigenvalue(model, data, loss)

    def diagnostics(rows: torch.Tensor, estimator: str, products: str) -> dict:
        edit = EditOptions(estimator=estimator, curvature_products=products, curvature_tol=0.0)  # type: ignore[arg-type]
        return edit_parameters(model, data, rows, loss=loss, edit=edit).diagnostics

    stored = [diagnostics(rows, "newton", "stored") for rows in (REMOVE, torch.arange(30))]
    for result in stored:
        assert "exact trace" in result["proximity_rule"]
        assert result["proximity"] == pytest.approx(expected, rel=1e-9)
    for estimator, products in (("newton", "matrix_free"), ("first_order", "stored")):
        result = diagnostics(REMOVE, estimator, products)
        assert "95% of the weight" in result["proximity_rule"]
        assert result["proximity"] == pytest.approx(expected, rel=0.05)
