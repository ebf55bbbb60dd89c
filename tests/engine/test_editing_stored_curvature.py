"""Stored Gauss-Newton products of edits (``EditOptions.curvature_products``) against the matrix-free ones.

Float64 models, so rounding is about 1e-15 relative. With ``curvature_tol`` 0 every (row, output) term of the
square root of G is stored and the product must equal the matrix-free product to 1e-10 (relative); with a
tolerance the left-out terms are positive semi-definite, their weight at most that share of trace(H) summed, and
the product of the kept part must be the full one minus theirs. The edits built on each must then agree: the same
CG iterates from the same operator, 1e-9 relative on the step after 6 iterations. (Not after more: these small
systems have a large near-null space, and once CG has exhausted the other directions, 1e-16 differences in
a product grow to 1e-6 in a few more iterations, as they do for the matrix-free products alone when the
right-hand side is perturbed by 1e-15.)
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from worker.attribution import EditOptions, Examples, InfluenceOptions, edit_parameters
from worker.attribution.hooks import TrackedLayer, evaluation_mode, resolve_layers
from worker.attribution.losses import LossName
from worker.attribution.proximal import (
    ProximalObjective,
    kept_output_terms,
    output_curvature_weights,
    stored_cost_share,
)
from worker.attribution.types import AttributionError

N = 60
REMOVE = torch.tensor([1, 5, 17, 40])


def trained(kind: Literal["mlp", "cnn", "mse"]) -> tuple[nn.Module, Examples, LossName]:
    generator = torch.Generator().manual_seed(0)
    if kind == "cnn":
        inputs = torch.randn(N, 1, 6, 6, generator=generator, dtype=torch.float64)
        torch.manual_seed(0)
        model: nn.Module = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.Linear(16, 3)
        ).double()
        targets = (inputs.flatten(1) @ torch.randn(36, 3, generator=generator, dtype=torch.float64)).argmax(1)
    else:
        inputs = torch.randn(N, 4, generator=generator, dtype=torch.float64)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        scores = inputs @ torch.randn(4, 3, generator=generator, dtype=torch.float64)
        targets = scores if kind == "mse" else (scores + 0.5 * torch.randn(N, 3, generator=generator)).argmax(1)
    loss: LossName = "mse" if kind == "mse" else "cross_entropy"
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(200):
        optimizer.zero_grad()
        out = model(inputs)
        value = 0.5 * (out - targets).pow(2).sum(1).mean() if kind == "mse" else F.cross_entropy(out, targets)
        value.backward()
        optimizer.step()
    weights = (
        torch.rand(N, generator=generator, dtype=torch.float64) + 0.5 if kind == "mlp" else None
    )  # row weights enter G as w_i
    return model.eval(), Examples(inputs, targets, weights=weights), loss


def objective_of(model: nn.Module, data: Examples, loss: LossName, products: str, tol: float) -> ProximalObjective:
    return ProximalObjective(
        model,
        resolve_layers(model, None),
        data,
        REMOVE,
        loss,
        batch_size=16,  # several chunks of rows and of stored terms
        curvature_products=products,  # type: ignore[arg-type]
        curvature_tol=tol,
    )


@pytest.mark.parametrize("kind", ["mlp", "cnn", "mse"])
def test_stored_products_equal_matrix_free_products(kind) -> None:
    model, data, loss = trained(kind)
    with evaluation_mode(model):
        free = objective_of(model, data, loss, "matrix_free", 0.0)
        stored = objective_of(model, data, loss, "stored", 0.0)
        assert stored.curvature_report["products"] == "stored"
        assert free.curvature_report["products"] == "matrix_free"
        assert stored.kept_loss0 == pytest.approx(free.kept_loss0, rel=1e-12)
        assert torch.allclose(stored.anchor, free.anchor, rtol=0, atol=1e-12)
        vector = torch.randn(free.theta0.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        expected = free.curvature_operator(free.theta0)(vector)
        product = stored.curvature_operator(stored.theta0)(vector)
        assert float((product - expected).norm()) <= 1e-10 * float(expected.norm())
        # at another point too (the proximal estimator rebuilds the operator at each step)
        point = free.theta0 + 0.05 * vector / vector.norm()
        elsewhere = free.curvature_operator(point)(vector)
        assert float((stored.curvature_operator(point)(vector) - elsewhere).norm()) <= 1e-10 * float(elsewhere.norm())


def test_left_out_terms_are_the_smallest_within_the_tolerance() -> None:
    values = torch.tensor([[0.5, 0.01, 0.2], [0.001, 0.3, 0.002]], dtype=torch.float64)
    rows, outputs, share = kept_output_terms(values, 0.01)  # total 1.013: 0.001 + 0.002 + 0.01 = 0.013 > 0.01013
    assert list(zip(rows.tolist(), outputs.tolist(), strict=True)) == [(0, 0), (0, 1), (0, 2), (1, 1)]
    assert share == pytest.approx(0.003 / 1.013)
    rows, _, share = kept_output_terms(values, 0.0)
    assert len(rows) == 6 and share == 0.0


def test_output_curvature_weights_sum_to_the_output_hessian_trace() -> None:
    outputs = torch.randn(7, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weights = torch.rand(7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    values = output_curvature_weights(outputs, "cross_entropy", weights, 10)
    p = torch.softmax(outputs, 1)
    assert torch.allclose(values.sum(1), weights * (1 - p.pow(2).sum(1)) / 10, rtol=1e-12, atol=0)


def test_truncated_product_is_the_full_one_less_the_left_out_terms() -> None:
    model, data, loss = trained("cnn")
    with evaluation_mode(model):
        full = objective_of(model, data, loss, "stored", 0.0)
        part = objective_of(model, data, loss, "stored", 0.05)
        report = part.curvature_report
        assert report["stored_terms"] < report["candidate_terms"] and 0 < report["left_out_share"] <= 0.05
        vector = torch.randn(full.theta0.numel(), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        whole, kept = full.curvature_operator(full.theta0)(vector), part.curvature_operator(part.theta0)(vector)
        # G − G_kept is PSD: vᵀ G v ≥ vᵀ G_kept v ≥ 0, and both are close (most of the trace is kept)
        assert float(vector @ whole) >= float(vector @ kept) > 0
        assert float((whole - kept).norm()) <= 0.5 * float(whole.norm())


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_newton_edits_agree_with_stored_and_matrix_free_products(kind) -> None:
    model, data, loss = trained(kind)
    changes = {}
    for products in ("matrix_free", "stored"):
        result = edit_parameters(
            model,
            data,
            REMOVE,
            loss=loss,
            method="influence",
            options=InfluenceOptions(strategy="identity"),
            edit=EditOptions(
                proximity=0.01,
                cg_max_iter=6,
                curvature_products=products,  # type: ignore[arg-type]
                curvature_tol=0.0,
                preconditioner="none",  # the same CG iterates from either product (``auto`` fits it to stored rows)
                newton_steps=2,  # as many for either (``auto`` takes a second step with stored rows only)
            ),
        )
        assert result.diagnostics["curvature"]["products"] == products
        changes[products] = torch.cat([(result.state[k] - v).flatten() for k, v in model.state_dict().items()])
    step = changes["matrix_free"]
    assert float(step.norm()) > 0
    assert float((changes["stored"] - step).norm()) <= 1e-9 * float(step.norm())


def test_auto_stores_convolutions_and_falls_back_for_linear_layers_or_memory(monkeypatch) -> None:
    model, data, loss = trained("cnn")
    with evaluation_mode(model):
        assert objective_of(model, data, loss, "auto", 1e-4).curvature_report["products"] == "stored"
        mlp, mlp_data, _ = trained("mlp")
        report = objective_of(mlp, mlp_data, loss, "auto", 1e-4).curvature_report
        assert report["products"] == "matrix_free" and "linear layers only" in report["reason"]
        assert objective_of(mlp, mlp_data, loss, "stored", 1e-4).curvature_report["products"] == "stored"
        monkeypatch.setattr("worker.attribution.proximal.STORED_CURVATURE_BYTES", 1000)
        report = objective_of(model, data, loss, "auto", 1e-4).curvature_report
        assert report["products"] == "matrix_free" and "MiB" in report["reason"]
        with pytest.raises(AttributionError, match="not possible"):
            objective_of(model, data, loss, "stored", 1e-4)


def test_stored_cost_model_prefers_convolutions() -> None:
    """The benchmark CNN's shapes (conv 1→8, 8→16 on 8×8 inputs, linear 256→10) against an MLP's: stored
    products cost a fraction of matrix-free ones for the first, about as much for the second."""
    cnn = [
        TrackedLayer("c1", nn.Conv2d(1, 8, 3), "conv2d", 10, 8, True),
        TrackedLayer("c2", nn.Conv2d(8, 16, 3), "conv2d", 73, 16, True),
        TrackedLayer("l", nn.Linear(256, 10), "linear", 257, 10, True),
    ]
    share = stored_cost_share(cnn, {"c1": 64, "c2": 64, "l": 1}, terms=4617, rows=1360, kept=1360, iterations=20)
    assert share < 0.5
    mlp = [TrackedLayer("a", nn.Linear(64, 128), "linear", 65, 128, True)]
    assert stored_cost_share(mlp, {"a": 1}, terms=4617, rows=1360, kept=1360, iterations=20) > 0.5


def test_invalid_curvature_options_are_rejected() -> None:
    with pytest.raises(AttributionError, match="curvature_products"):
        EditOptions(curvature_products="dense").validate()  # type: ignore[arg-type]
    with pytest.raises(AttributionError, match="curvature_tol"):
        EditOptions(curvature_tol=1.0).validate()


@pytest.mark.parametrize(("kind", "products", "steps"), [("cnn", "stored", 2), ("mlp", "matrix_free", 1)])
def test_auto_newton_steps_take_a_second_step_where_the_rows_are_stored(kind, products, steps) -> None:
    """A third of the rows removed with little proximity: the first line search stops short on both models. The
    default (``newton_steps`` None) takes a second Gauss-Newton step where the rows of G are stored (a further
    linearisation is cheap) and none where the products are matrix-free; asked for, the MLP takes it too."""
    model, data, loss = trained(kind)
    remove = torch.arange(0, N, 3)
    result = edit_parameters(model, data, remove, loss=loss, edit=EditOptions(proximity=1e-4))
    solver = result.diagnostics["solver"]
    assert result.diagnostics["curvature"]["products"] == products
    assert solver["line_search_step"] < 1.0
    assert solver["steps"] == steps and len(solver["further_step_scales"]) == steps - 1
    if steps == 1:
        asked = edit_parameters(model, data, remove, loss=loss, edit=EditOptions(proximity=1e-4, newton_steps=2))
        assert asked.diagnostics["solver"]["steps"] == 2
