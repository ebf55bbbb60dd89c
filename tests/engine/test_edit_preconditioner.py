"""The Kronecker-factored preconditioner of an edit's CG solves (``EditOptions.preconditioner``).

Each tracked layer's block of the Gauss-Newton matrix G_{−S} is approximated by a Kronecker product in the
eigenbases of the Gram factors of its square-root rows. Checked against G_{−S} written out densely (its products
applied to every unit vector, float64):
- where the block is a Kronecker product (a linear model with the mse loss: G = I ⊗ (1/N) Σ x̃ x̃ᵀ), the
  preconditioner is (G + λI)⁻¹ itself, to rounding (1e-10 relative), and preconditioned CG stops after one product;
- on a small MLP and CNN (cross-entropy, stored and matrix-free products; the CNN's Gram factors from all rows and
  from a sample), preconditioned CG converges to the dense solve (1e-8 relative), and its first two products get closer to it in the (G + λI)-norm than plain CG's. (Not
  every later count: on systems this small plain CG soon exhausts the few distinct eigenvalues. How much the
  preconditioner saves on the benchmark's digits models is measured by ``benchmarks/edits_cg.py``.)
- ``auto`` (the default) fits it where the products store the rows (the CNN) and not where they are matrix-free
  (the MLP), and the default CG count is 8 with it and 20 without;
- where the square-root rows cannot be formed, the edit solves without it and says why.
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.engine.test_editing_stored_curvature import REMOVE, trained
from worker.attribution import EditOptions, Examples, edit_parameters
from worker.attribution.hooks import evaluation_mode, resolve_layers
from worker.attribution.losses import LossName
from worker.attribution.proximal import ProximalObjective, conjugate_gradient
from worker.attribution.types import AttributionError

LAMBDA = 1e-3


def objective_of(
    model: nn.Module, data: Examples, loss: LossName, products: Literal["stored", "matrix_free"], tol: float = 0.0
) -> ProximalObjective:
    objective = ProximalObjective(
        model,
        resolve_layers(model, None),
        data,
        REMOVE,
        loss,
        batch_size=16,  # several chunks of rows
        curvature_products=products,
        curvature_tol=tol,
        preconditioner_kind="kronecker",
    )
    objective.proximity = LAMBDA
    return objective


def dense_system(objective: ProximalObjective) -> torch.Tensor:
    """G_{−S}(θ₀) + λI written out from its products (the operator is kept: every column is one product)."""
    operator = objective.curvature_operator(objective.theta0)
    identity = torch.eye(objective.theta0.numel(), dtype=objective.theta0.dtype)
    columns = torch.stack([operator(column) for column in identity], dim=1)
    return 0.5 * (columns + columns.T) + LAMBDA * identity


def linear_mse() -> tuple[nn.Module, Examples]:
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(60, 4, generator=generator, dtype=torch.float64)
    torch.manual_seed(5)
    model = nn.Linear(4, 3).double().eval()
    targets = inputs @ torch.randn(4, 3, generator=generator, dtype=torch.float64)
    return model, Examples(inputs, targets)


def test_a_kronecker_block_is_preconditioned_exactly() -> None:
    model, data = linear_mse()
    with evaluation_mode(model):
        objective = objective_of(model, data, "mse", "stored")
        system = dense_system(objective)
        fitted = objective.preconditioner
        assert fitted is not None and objective.curvature_report["preconditioner"] == "kronecker"
        vector = torch.randn(system.shape[0], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        expected = torch.linalg.solve(system, vector)
        assert float((fitted.apply(vector, LAMBDA) - expected).norm()) <= 1e-10 * float(expected.norm())
        solved = conjugate_gradient(lambda v: system @ v, vector, 1e-10, 50, lambda v: fitted.apply(v, LAMBDA))
        assert solved.iterations == 1


@pytest.mark.parametrize(
    ("kind", "products", "gram_terms"),
    [("mlp", "matrix_free", None), ("mlp", "stored", None), ("cnn", "stored", None), ("cnn", "stored", 3)],
)
def test_preconditioned_cg_converges_to_the_solve(kind, products, gram_terms, monkeypatch) -> None:
    if gram_terms is not None:  # the convolutions' Gram factors from an even sample of each chunk's rows
        monkeypatch.setattr("worker.attribution.edit_preconditioner.GRAM_TERMS", gram_terms)
    model, data, loss = trained(kind)
    with evaluation_mode(model):
        objective = objective_of(model, data, loss, products)
        fitted = objective.preconditioner
        assert fitted is not None
        system = dense_system(objective)
        rhs = objective.removal_gradient
        exact = torch.linalg.solve(system, rhs)

        def error(solution: torch.Tensor) -> float:
            difference = solution - exact
            return float(difference @ system @ difference) ** 0.5 / float(exact @ system @ exact) ** 0.5

        def precondition(vector: torch.Tensor) -> torch.Tensor:
            return fitted.apply(vector, LAMBDA)

        converged = conjugate_gradient(lambda v: system @ v, rhs, 1e-12, 500, precondition)
        assert float((converged.solution - exact).norm()) <= 1e-8 * float(exact.norm())
        plain = conjugate_gradient(lambda v: system @ v, rhs, 1e-12, 2)
        preconditioned = conjugate_gradient(lambda v: system @ v, rhs, 1e-12, 2, precondition)
        assert error(preconditioned.solution) < error(plain.solution)


def test_converged_edits_agree_with_and_without_the_preconditioner() -> None:
    model, data, loss = trained("cnn")

    def step(preconditioner: str) -> torch.Tensor:
        edit = EditOptions(
            proximity=LAMBDA,
            cg_tol=1e-11,
            cg_max_iter=500,
            line_search="halving",
            preconditioner=preconditioner,  # type: ignore[arg-type]
        )
        result = edit_parameters(model, data, REMOVE, loss=loss, edit=edit)
        assert result.diagnostics["curvature"]["preconditioner"] == preconditioner
        return torch.cat([value.reshape(-1) for value in result.state.values()])

    start = torch.cat([value.reshape(-1) for value in model.state_dict().values()])
    with_it, without = step("kronecker"), step("none")
    assert float((with_it - without).norm()) <= 1e-7 * float((without - start).norm())


@pytest.mark.parametrize(
    ("kind", "products", "preconditioner", "iterations"),
    [("cnn", "stored", "kronecker", 8), ("mlp", "matrix_free", "none (auto", 20)],
)
def test_auto_fits_the_preconditioner_where_the_rows_are_stored(kind, products, preconditioner, iterations) -> None:
    model, data, loss = trained(kind)
    result = edit_parameters(model, data, REMOVE, loss=loss, edit=EditOptions(proximity=LAMBDA, cg_tol=1e-14))
    assert result.diagnostics["curvature"]["products"] == products
    assert result.diagnostics["curvature"]["preconditioner"].startswith(preconditioner)
    assert result.diagnostics["solver"]["cg_iterations"][0] == iterations  # the default count follows it


def test_without_square_root_rows_the_solve_is_plain_cg() -> None:
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 1100), nn.Tanh()).double().eval()  # more than 1,024 outputs per row
    targets = torch.tanh(inputs @ torch.randn(4, 1100, generator=generator, dtype=torch.float64))
    with torch.no_grad():
        assert float(F.mse_loss(model(inputs), targets)) > 0
    edit = EditOptions(proximity=LAMBDA, preconditioner="kronecker", cg_max_iter=3)
    result = edit_parameters(model, Examples(inputs, targets), torch.tensor([0, 1]), loss="mse", edit=edit)
    report = result.diagnostics["curvature"]
    assert report["products"] == "matrix_free" and report["preconditioner"].startswith("none: ")


def test_an_unknown_preconditioner_is_refused() -> None:
    with pytest.raises(AttributionError, match="preconditioner"):
        EditOptions(preconditioner="jacobi").validate()  # type: ignore[arg-type]
