"""Proximal and Newton edits on a small float64 MLP (a non-convex model).

The reference is an independent retrain from the same weights of the anchored proximal objective

    J_S(θ) = (1/M) Σ_{i∉S} ℓ_i(θ) − ⟨∇L(θ₀), θ − θ₀⟩ + (λ/2)‖θ − θ₀‖²

(M = N − |S| for the `mean` reduction, N for `sum`), written here with torch.func and minimised by L-BFGS to a
gradient norm of 1e-12. Tolerances (relative distance of the parameter changes): the proximal estimator 1e-6 at tol
1e-8, and each tighter tolerance at least 10× closer than tol 1e-1; every influence strategy and DataInf give the
same minimiser (the objective does not depend on the method): 1e-4 at tol 1e-6.
"""

from __future__ import annotations

from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from tests.engine.helpers import fit_classifier
from worker.attribution import DataInfOptions, EditOptions, Examples, InfluenceOptions, edit_parameters
from worker.attribution.hooks import TrackedLayer
from worker.attribution.options import EditEstimator, KeptReduction

N, PROXIMITY = 80, 0.05
REMOVE = torch.tensor([2, 7, 11, 30, 31, 64])


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, Examples, Examples]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(N, 4, generator=generator, dtype=torch.float64)
    targets = (
        inputs @ torch.randn(4, 3, generator=generator, dtype=torch.float64)
        + 0.7 * torch.randn(N, 3, generator=generator, dtype=torch.float64)
    ).argmax(1)
    torch.manual_seed(0)
    data = Examples(inputs, targets)
    model = fit_classifier(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double(), data, 300)
    queries = Examples(inputs[:5] + 0.1, targets[:5])
    return model, data, queries


@pytest.fixture(scope="module")
def references(setup) -> dict[str, torch.Tensor]:
    model, data, _ = setup
    return {reduction: proximal_retrain(model, data, REMOVE, PROXIMITY, reduction) for reduction in ("mean", "sum")}


def kept_count(remove: torch.Tensor, reduction: str) -> int:
    """M: the kept rows' loss is divided by this (their count for the mean reduction, N for the sum)."""
    return N - len(set(remove.tolist())) if reduction == "mean" else N


def flat_change(model: nn.Module, state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(state[k] - v).flatten() for k, v in model.state_dict().items()])


def proximal_retrain(
    model: nn.Module, data: Examples, remove: torch.Tensor, proximity: float, reduction: str
) -> torch.Tensor:
    """argmin J_S by L-BFGS from θ₀; returns θ − θ₀ over every parameter (all are tracked here)."""
    names = [name for name, _ in model.named_parameters()]
    theta0 = [p.detach().clone() for p in model.parameters()]
    keep = torch.tensor([i for i in range(N) if i not in set(remove.tolist())])

    def total_loss(params: list[torch.Tensor], rows: torch.Tensor, count: int) -> torch.Tensor:
        out = functional_call(model, dict(zip(names, params, strict=True)), (data.inputs[rows],))
        return F.cross_entropy(out, data.targets[rows], reduction="sum") / count

    start = [t.clone().requires_grad_(True) for t in theta0]
    anchor = torch.autograd.grad(total_loss(start, torch.arange(N), N), start)
    params = [t.clone().requires_grad_(True) for t in theta0]
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=2000,
        tolerance_grad=1e-12,
        tolerance_change=1e-20,
        history_size=100,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = total_loss(params, keep, kept_count(remove, reduction))
        for p, p0, g in zip(params, theta0, anchor, strict=True):
            value = value - (g * (p - p0)).sum() + 0.5 * proximity * (p - p0).pow(2).sum()
        value.backward()
        return value

    for _ in range(5):
        optimizer.step(closure)
    return torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(params, theta0, strict=True)])


def edit(model: nn.Module, data: Examples, remove: torch.Tensor, **edit_options: object) -> dict[str, torch.Tensor]:
    options = InfluenceOptions(strategy="exact", damping=PROXIMITY)
    edit_options.setdefault("estimator", "proximal")
    edit_options.setdefault("proximity", PROXIMITY)
    edit_options.setdefault("reduction", "sum")  # the objective proximal_objective writes out by default
    return edit_parameters(
        model,
        data,
        remove,
        loss="cross_entropy",
        options=options,
        edit=EditOptions(cg_tol=1e-10, cg_max_iter=200, **edit_options),  # type: ignore[arg-type]
    ).state


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_proximal_edit_approaches_the_proximal_retrain_as_tolerance_tightens(
    setup, references, reduction: KeptReduction
) -> None:
    model, data, _ = setup
    reference, errors = references[reduction], []
    for tol in (1e-1, 1e-3, 1e-8):
        change = flat_change(model, edit(model, data, REMOVE, tol=tol, max_steps=100, reduction=reduction))
        errors.append(float((change - reference).norm() / reference.norm()))
    assert errors[-1] <= 1e-6
    assert errors[1] <= errors[0] / 10 and errors[2] <= errors[0] / 10
    other = references["sum" if reduction == "mean" else "mean"]  # the other objective's minimiser is elsewhere
    assert float((change - other).norm() / reference.norm()) > 1e-2
    newton = flat_change(model, edit(model, data, REMOVE, estimator="newton", trust_radius=10.0, reduction=reduction))
    assert float((newton - reference).norm() / reference.norm()) < 0.5  # one step: close, not exact


def proximal_objective(
    model: nn.Module, data: Examples, remove: torch.Tensor, proximity: float, change: torch.Tensor
) -> float:
    """J_S at θ₀ + ``change`` (flat, in parameter order)."""
    names = [name for name, _ in model.named_parameters()]
    theta0 = [p.detach() for p in model.parameters()]
    keep = torch.tensor([i for i in range(N) if i not in set(remove.tolist())])
    start = [t.clone().requires_grad_(True) for t in theta0]
    full = F.cross_entropy(
        functional_call(model, dict(zip(names, start, strict=True)), (data.inputs,)), data.targets, reduction="sum"
    )
    anchor = torch.cat([g.flatten() for g in torch.autograd.grad(full / N, start)])
    sizes = [t.numel() for t in theta0]
    params = [p0 + c.view_as(p0) for p0, c in zip(theta0, change.split(sizes), strict=True)]
    kept = F.cross_entropy(
        functional_call(model, dict(zip(names, params, strict=True)), (data.inputs[keep],)),
        data.targets[keep],
        reduction="sum",
    )
    return float(kept / N - anchor @ change + 0.5 * proximity * change @ change)


def test_a_short_proximal_edit_of_a_large_removal_moves_at_least_as_far_down_as_newton(setup) -> None:
    """A third of the data removed and little proximity: the plain first Levenberg-Marquardt step overshoots, and a
    few steps started there all used to be rejected (the edit was the unedited model). The proximal estimator
    now starts with the Newton step (trust radius, line search), so it never ends above it on J_S."""
    model, data, _ = setup
    remove, proximity = torch.nonzero(data.targets == 0).reshape(-1), 1e-4
    changes = {
        estimator: flat_change(model, edit(model, data, remove, estimator=estimator, proximity=proximity, max_steps=3))
        for estimator in ("newton", "proximal")
    }
    values = {name: proximal_objective(model, data, remove, proximity, change) for name, change in changes.items()}
    start = proximal_objective(model, data, remove, proximity, torch.zeros_like(changes["newton"]))
    assert float(changes["proximal"].norm()) > 0
    assert values["proximal"] <= values["newton"] < start


def test_the_boundary_line_search_finds_the_edge_of_the_acceptable_steps(setup) -> None:
    """A removal whose full Newton step raises J_S: ``halving`` takes the first of 1, ½, ¼, … at which J_S
    decreases enough (Armijo, c = 1e-4); ``boundary`` finds the edge b of those scales along the same direction
    (within 1/32: acceptable there, rejected a little further, checked on J_S written here, not the engine's)
    and steps ``boundary_share`` × b."""
    model, data, _ = setup
    remove, proximity = torch.nonzero(data.targets == 0).reshape(-1), 1e-3
    results = {
        (search, share): edit_parameters(
            model,
            data,
            remove,
            loss="cross_entropy",
            edit=EditOptions(
                estimator="newton",
                proximity=proximity,
                line_search=search,  # type: ignore[arg-type]
                boundary_share=share,
                cg_tol=1e-10,
                cg_max_iter=200,
                reduction="sum",  # the objective proximal_objective writes out
            ),
        )
        for search, share in (("halving", 0.85), ("boundary", 0.85), ("boundary", 1.0))
    }
    solver = {key: result.diagnostics["solver"] for key, result in results.items()}
    halving, edge = solver["halving", 0.85]["line_search_step"], solver["boundary", 1.0]["line_search_boundary"]
    assert solver["halving", 0.85]["line_search_boundary"] is None
    assert halving < 1.0 and halving <= edge < 2 * halving
    assert solver["boundary", 1.0]["line_search_step"] == edge
    assert solver["boundary", 0.85]["line_search_boundary"] == pytest.approx(edge, rel=1 / 16)
    assert solver["boundary", 0.85]["line_search_step"] == pytest.approx(
        0.85 * solver["boundary", 0.85]["line_search_boundary"]
    )
    direction = flat_change(model, results["halving", 0.85].state) / halving
    for key, result in results.items():
        change = flat_change(model, result.state)
        expected = solver[key]["line_search_step"] * direction
        assert float((change - expected).norm()) <= 1e-9 * float(change.norm())

    def objective(scale: float) -> float:
        return proximal_objective(model, data, remove, proximity, scale * direction)

    start, epsilon = objective(0.0), 1e-7
    slope = (objective(epsilon) - start) / epsilon
    assert slope < 0
    assert objective(edge) <= start + 1e-4 * edge * slope
    beyond = edge * (1 + 2 / 32)
    assert objective(beyond) > start + 1e-4 * beyond * slope


def test_a_full_newton_step_within_the_boundary_is_taken_whole(setup) -> None:
    """Two removed rows: J_S is nearly quadratic along the step, the edge lies beyond 1 / share, and the edit is
    the full Newton step (scale 1, as ``halving`` gives)."""
    model, data, _ = setup
    for search in ("boundary", "halving"):
        solver = edit_parameters(
            model,
            data,
            torch.tensor([3, 50]),
            loss="cross_entropy",
            edit=EditOptions(estimator="newton", proximity=PROXIMITY, line_search=search),  # type: ignore[arg-type]
        ).diagnostics["solver"]
        assert solver["line_search_step"] == 1.0
        if search == "boundary":  # acceptable at the first try, 1 / share
            assert solver["line_search_boundary"] == pytest.approx(1 / 0.85)


@pytest.mark.parametrize("estimator", ["proximal", "newton", "first_order"])
def test_removing_nothing_changes_nothing(setup, estimator: EditEstimator) -> None:
    model, data, queries = setup
    result = edit_parameters(
        model,
        data,
        torch.zeros(0, dtype=torch.long),
        loss="cross_entropy",
        edit=EditOptions(estimator=estimator),
        queries=queries,
    )
    for key, value in model.state_dict().items():
        assert torch.equal(result.state[key], value)
    assert result.diagnostics["num_removed"] == 0 and result.diagnostics["step_norm"] == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_set_and_its_complement_are_consistent_with_the_full_data_objective(setup, reduction: KeptReduction) -> None:
    """Each proximal edit is stationary for its objective: (M_X/N) J_X, with L_{−X} = (1/N) Σ_{i∉X} ℓ_i, has
    ∇L_{−X}(θ_X) − s_X ∇L(θ₀) + s_X λ(θ_X − θ₀) = 0, s_X = M_X / N (1 for the sum reduction). The two objectives'
    data terms add up to the full data loss, so ∇L_{−S}(θ_S) + ∇L_{−S^c}(θ_{S^c}) + λ(s_S(θ_S − θ₀) +
    s_{S^c}(θ_{S^c} − θ₀)) = (s_S + s_{S^c}) ∇L(θ₀): 2∇L(θ₀) for the sum, ∇L(θ₀) for the mean (M_S + M_{S^c} = N).
    First-order edits are additive: Δ(S) + Δ(S^c) = Δ(everything)."""
    model, data, _ = setup
    complement = torch.tensor([i for i in range(N) if i not in set(REMOVE.tolist())])
    names = [name for name, _ in model.named_parameters()]
    theta0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def kept_gradient(state: dict[str, torch.Tensor], removed: torch.Tensor) -> torch.Tensor:
        params = {n: state[n].clone().requires_grad_(True) for n in names}
        keep = torch.tensor([i for i in range(N) if i not in set(removed.tolist())])
        out = functional_call(model, params, (data.inputs[keep],))
        value = F.cross_entropy(out, data.targets[keep], reduction="sum") / N
        return torch.cat([g.flatten() for g in torch.autograd.grad(value, list(params.values()))])

    tight: dict[str, Any] = {"tol": 1e-9, "max_steps": 100, "reduction": reduction}
    s_state, c_state = edit(model, data, REMOVE, **tight), edit(model, data, complement, **tight)
    share_s, share_c = kept_count(REMOVE, reduction) / N, kept_count(complement, reduction) / N
    full = kept_gradient(model.state_dict(), torch.zeros(0, dtype=torch.long))
    theta_s = theta0 + flat_change(model, s_state)
    theta_c = theta0 + flat_change(model, c_state)
    total = (
        kept_gradient(s_state, REMOVE)
        + kept_gradient(c_state, complement)
        + PROXIMITY * (share_s * (theta_s - theta0) + share_c * (theta_c - theta0))
    )
    expected = (share_s + share_c) * full
    assert float((total - expected).norm()) <= 1e-7 * max(float(full.norm()), 1e-3)
    first = {"estimator": "first_order"}
    additive = flat_change(model, edit(model, data, REMOVE, **first)) + flat_change(
        model, edit(model, data, complement, **first)
    )
    everything = flat_change(model, edit(model, data, torch.arange(N), **first))
    assert float((additive - everything).norm()) <= 1e-9 * float(everything.norm())


@pytest.mark.parametrize(
    "method,options",
    [
        ("influence", InfluenceOptions(strategy="ekfac")),
        ("influence", InfluenceOptions(strategy="lissa")),
        ("datainf", DataInfOptions()),
    ],
)
def test_every_method_reaches_the_same_proximal_minimiser(
    setup,
    references,
    method: Literal["influence", "datainf"],
    options: InfluenceOptions | DataInfOptions,
) -> None:
    model, data, queries = setup
    result = edit_parameters(
        model,
        data,
        REMOVE,
        loss="cross_entropy",
        method=method,
        options=options,
        edit=EditOptions(
            estimator="proximal", proximity=PROXIMITY, tol=1e-6, max_steps=100, cg_tol=1e-8, cg_max_iter=100
        ),
        queries=queries,
    )
    reference = references["mean"]  # the default reduction
    assert float((flat_change(model, result.state) - reference).norm()) <= 1e-4 * float(reference.norm())
    diagnostics = result.diagnostics
    assert diagnostics["solver"]["converged"]
    assert diagnostics["remaining_loss_after"] < diagnostics["remaining_loss_before"] + 1e-9
    assert len(diagnostics["query_loss_changes"]) == len(queries)


def test_a_newton_step_beyond_the_trust_radius_is_shortened_to_it(setup) -> None:
    """The solver reports the shortening; the edit itself stays inside the trust radius, so it does not warn (a
    warning is for an edit that leaves the region where the estimate can be trusted: docs/editing.md)."""
    model, data, _ = setup
    result = edit_parameters(
        model,
        data,
        torch.arange(40),
        loss="cross_entropy",
        edit=EditOptions(estimator="newton", proximity=1e-6, trust_radius=1e-3),
    )
    assert result.diagnostics["solver"]["clipped_to_trust_radius"]
    assert result.diagnostics["relative_step_norm"] <= 1e-3 * (1 + 1e-9)
    assert not any("trust radius" in w for w in result.diagnostics["warnings"])


def test_one_pass_linearisation_matches_exact_loss_gradient_and_gauss_newton(setup) -> None:
    """The objective's single forward pass at θ₀ (loss, gradient and curvature operator together) against
    torch.func: the kept rows' loss and gradient, and G v = Jᵀ H J v with the full Jacobian (float64, 1e-10)."""
    from torch.func import jacrev

    from worker.attribution.hooks import evaluation_mode, resolve_layers
    from worker.attribution.proximal import ProximalObjective, state_entries

    model, data, _ = setup
    layers = resolve_layers(model, None)
    with evaluation_mode(model):
        objective = ProximalObjective(model, layers, data, REMOVE, "cross_entropy", batch_size=32)
        keep = torch.tensor([i for i in range(N) if i not in set(REMOVE.tolist())])
        theta0 = objective.theta0

        def outputs(flat: torch.Tensor) -> torch.Tensor:
            return functional_call(model, state_entries(layers, flat), (data.inputs[keep],))

        def kept_loss(flat: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(outputs(flat), data.targets[keep], reduction="sum") / N

        assert abs(objective.kept_loss0 - float(kept_loss(theta0))) <= 1e-12
        gradient = torch.func.grad(kept_loss)(theta0)
        assert torch.allclose(objective.anchor - objective.removal_gradient, gradient, rtol=0, atol=1e-12)
        jacobian = jacrev(outputs)(theta0)  # (rows, classes, D)
        p = torch.softmax(outputs(theta0), 1)
        hessians = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
        vector = torch.randn(theta0.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        expected = torch.einsum("rcd,rce,re->d", jacobian, hessians, torch.einsum("red,d->re", jacobian, vector)) / N
        product = objective.curvature_operator(theta0)(vector)  # the operator built with the objective
        assert float((product - expected).norm()) <= 1e-10 * float(expected.norm())
        rebuilt = objective.curvature_operator(theta0)(vector)  # taken once: this one is linearised afresh
        assert float((rebuilt - expected).norm()) <= 1e-10 * float(expected.norm())


def test_further_newton_steps_are_gauss_newton_steps_from_the_point_reached(setup) -> None:
    """A removal whose first line search stops short (a third of the data, little proximity): each further step
    is (G_{−S}(θ) + λI) d = −∇J_S(θ) with the Gauss-Newton matrix of the point θ reached (built here from the full
    Jacobian at θ with torch.func, not the engine's operator), scaled by its own line search; J_S falls at each
    step and the edit comes closer to the minimiser of J_S (an L-BFGS retrain of it)."""
    from torch.func import jacrev

    from worker.attribution.hooks import resolve_layers
    from worker.attribution.proximal import flat_from_state, state_entries

    model, data, _ = setup
    remove, proximity = torch.nonzero(data.targets == 0).reshape(-1), 1e-3
    layers = resolve_layers(model, None)
    theta0 = flat_from_state(layers, model.state_dict(), next(model.parameters()).detach())
    keep = torch.tensor([i for i in range(N) if i not in set(remove.tolist())])

    def run(newton_steps: int) -> tuple[torch.Tensor, dict[str, Any]]:
        result = edit_parameters(
            model,
            data,
            remove,
            loss="cross_entropy",
            edit=EditOptions(
                estimator="newton",
                proximity=proximity,
                newton_steps=newton_steps,
                trust_radius=10.0,
                cg_tol=1e-12,
                cg_max_iter=400,
                reduction="sum",  # the objective written out below
            ),
        )
        return flat_from_state(layers, result.state, theta0), result.diagnostics["solver"]

    def outputs(flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return functional_call(model, state_entries(layers, flat), (data.inputs[rows],))

    def full_loss(flat: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs(flat, torch.arange(N)), data.targets, reduction="sum") / N

    anchor = torch.func.grad(full_loss)(theta0)

    def objective(flat: torch.Tensor) -> torch.Tensor:
        step = flat - theta0
        kept = F.cross_entropy(outputs(flat, keep), data.targets[keep], reduction="sum") / N
        return kept - anchor @ step + 0.5 * proximity * step @ step

    def gauss_newton_step(point: torch.Tensor) -> torch.Tensor:
        jacobian = jacrev(lambda flat: outputs(flat, keep))(point)  # (rows, classes, D) at the point
        p = torch.softmax(outputs(point, keep), 1)
        hessians = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
        curvature = torch.einsum("rcd,rce,ref->df", jacobian, hessians, jacobian) / N
        system = curvature + proximity * torch.eye(point.numel(), dtype=point.dtype)
        return torch.linalg.solve(system, -torch.func.grad(objective)(point))

    points = {steps: run(steps) for steps in (1, 2, 3)}
    assert points[1][1]["line_search_step"] < 1.0 and points[1][1]["further_step_scales"] == []
    scales = points[3][1]["further_step_scales"]
    assert len(scales) >= 1 and all(0 < s <= 1 for s in scales)
    assert points[2][1]["further_step_scales"] == scales[:1] and points[2][1]["steps"] == 2
    expected = points[1][0] + scales[0] * gauss_newton_step(points[1][0])
    assert float((points[2][0] - expected).norm()) <= 1e-6 * float((points[2][0] - theta0).norm())
    values = [float(objective(points[steps][0])) for steps in (1, 2, 3)]
    assert values[2] <= values[1] < values[0] < float(objective(theta0))
    reference = theta0 + proximal_retrain_flat(model, data, remove, proximity, layers)
    distances = [float((points[steps][0] - reference).norm()) for steps in (1, 2, 3)]
    assert distances[2] <= distances[1] < distances[0]


def proximal_retrain_flat(
    model: nn.Module, data: Examples, remove: torch.Tensor, proximity: float, layers: list[TrackedLayer]
) -> torch.Tensor:
    """``proximal_retrain``'s change in the engine's flat layout (each layer's weight with its bias as a column)."""
    from worker.attribution.proximal import flat_from_state

    change = proximal_retrain(model, data, remove, proximity, "sum")
    state, start = {}, 0
    for key, value in model.state_dict().items():
        state[key] = value + change[start : start + value.numel()].view_as(value)
        start += value.numel()
    like = next(model.parameters()).detach()
    return flat_from_state(layers, state, like) - flat_from_state(layers, model.state_dict(), like)


def test_a_full_first_step_takes_no_further_step(setup) -> None:
    model, data, _ = setup
    results = [
        edit_parameters(
            model,
            data,
            torch.tensor([3, 50]),
            loss="cross_entropy",
            edit=EditOptions(estimator="newton", proximity=PROXIMITY, newton_steps=newton_steps),
        )
        for newton_steps in (1, 3)
    ]
    assert results[1].diagnostics["solver"]["line_search_step"] == 1.0
    assert results[1].diagnostics["solver"]["further_step_scales"] == []
    assert results[1].diagnostics["solver"]["steps"] == 1
    for key, value in results[0].state.items():
        assert torch.equal(results[1].state[key], value)
