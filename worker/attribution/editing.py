"""Editing: the parameters the model would have if retrained without some training examples.

Three estimators (``EditOptions.estimator``, docs/editing.md says what each assumes):
- ``newton`` (default): a Gauss-Newton step of J_S (proximal.py) from the current weights, clipped to a trust
  radius, line-searched, and further such steps from the point reached while a line search stops short
  (``EditOptions.newton_steps``);
- ``proximal``: the minimiser of the anchored proximal retrain objective J_S, by Levenberg-Marquardt Gauss-Newton
  steps over the remaining rows (each solved by CG);
- ``first_order``: θ + (1/N) P Σ_{removed} ∇ℓ with the attribution's preconditioner P (its scoring damping):
  removing z from L = (1/N) Σ ℓ_i moves a minimiser by (1/N) H⁻¹ ∇ℓ(z) to first order.
J_S's loss over the remaining rows is their mean by default (``EditOptions.reduction``). Removing nothing is the
identity for every estimator. Every edit carries diagnostics (``EditResult``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from worker.attribution.attribute import MethodOptions, build_scorers
from worker.attribution.curvature.base import Curvature
from worker.attribution.gradients import batches, model_dtype, place_model, training_activities
from worker.attribution.hooks import ActivityRecorder, TrackedLayer, evaluation_mode, resolve_layers
from worker.attribution.losses import (
    LossName,
    check_examples,
    check_loss_name,
    check_targets,
    constant_prediction_loss,
    per_example_loss,
)
from worker.attribution.methods.influence import influence_layers
from worker.attribution.options import (
    DEFAULT_PROXIMITY_FRACTION,
    FIT_STRATEGIES,
    WEIGHT_DECAY_EVIDENCE,
    DataInfOptions,
    EditOptions,
    InfluenceOptions,
)
from worker.attribution.proximal import (
    CURVATURE_SCALE_ROWS,
    Flat,
    ProximalObjective,
    SolveReport,
    flat_from_state,
    flat_parameters,
    mean_curvature_eigenvalue,
    minimise,
    newton_step,
    newton_step_count,
    state_entries,
)
from worker.attribution.scoring import check_finite_vectors
from worker.attribution.types import AttributionError, Examples, Progress, no_progress

MAX_REPORTED_QUERIES = 1000
# the edit warns when it gives back more than this share of what the model had learned about the remaining rows
# (their mean loss below the best constant prediction's): on the four digits models of benchmarks/
# edits_retraining.py the default edits gave back at most 0.38%, retraining 0.06%, the first-order edits 0.09% to
# 33 times what was learned, 381 of 396 of them above 1% (docs/editing.md)
LEARNED_SHARE_WARNING = 0.01
# where that share is undefined (the model no better than the constant on its rows): the relative rise of their
# mean loss that is reported as a warning
LOSS_RISE_WARNING = 0.1


@dataclass(frozen=True)
class CurvatureScale:
    """The mean Gauss-Newton eigenvalue trace(G)/D of a model's tracked layers at its current weights over every
    training row, the unit of the default proximity λ, and how it was computed. It depends on the model, its
    training rows, its tracked layers and its loss, not on the removed rows: the edits of one attribution can all
    use the one their first edit computed (the same λ for each, and no pass over the data for it)."""

    mean_eigenvalue: float
    rule: str

    def as_dict(self) -> dict[str, Any]:
        return {"mean_eigenvalue": self.mean_eigenvalue, "rule": self.rule}


@dataclass
class EditResult:
    """The edited model's full state_dict and what the edit did (JSON-serialisable diagnostics).
    ``curvature_scale``: the scale the default λ was set from (None where λ was given)."""

    state: dict[str, torch.Tensor]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    curvature_scale: CurvatureScale | None = None


# The methods whose attributions this module edits, and the options each takes.
EDITABLE_OPTIONS: dict[str, type[InfluenceOptions] | type[DataInfOptions]] = {
    "influence": InfluenceOptions,
    "datainf": DataInfOptions,
}


def edit_parameters(
    model: nn.Module,
    train: Examples,
    remove: torch.Tensor,
    *,
    loss: LossName,
    method: Literal["influence", "datainf"] = "influence",
    options: MethodOptions | None = None,
    fit: Curvature | None = None,
    edit: EditOptions | None = None,
    queries: Examples | None = None,
    device: torch.device | str | None = None,
    progress: Progress = no_progress,
    curvature_scale: CurvatureScale | None = None,
) -> EditResult:
    """The model retrained without the rows ``remove`` of ``train``, estimated with the attribution's method
    (``influence`` or ``datainf``) and ``options``; ``fit`` is the attribution's stored curvature, if any.
    ``queries``: the attribution's queries, whose loss changes are reported. ``curvature_scale``: the one an
    earlier edit of the same model, rows, method options and loss returned (not computed again)."""
    check_loss_name(loss)
    expected = EDITABLE_OPTIONS.get(method)
    if expected is None:
        raise AttributionError(f"editing needs method 'influence' or 'datainf', got {method!r}")
    options = options if options is not None else expected()
    if not isinstance(options, expected):
        raise AttributionError(f"method {method!r} takes {expected.__name__}, got {type(options).__name__}")
    options.validate()
    edit = edit if edit is not None else EditOptions()
    edit.validate()
    check_examples(train, "training")
    rows = removed_rows(remove, len(train))
    if fit is not None and not (isinstance(options, InfluenceOptions) and options.strategy in FIT_STRATEGIES):
        raise AttributionError("a precomputed fit is only used by method 'influence' with a factor strategy")
    placed, _ = place_model(model, device)
    if isinstance(options, InfluenceOptions):
        layers = influence_layers(placed, options, fit)
    else:
        layers = resolve_layers(placed, options.layers)

    def first_order() -> Flat:
        return first_order_parameters(placed, train, rows, loss, method, options, fit, progress)

    return estimate_edit(placed, layers, train, rows, loss, edit, first_order, queries, progress, curvature_scale)


def retrain_objective_edit(
    model: nn.Module,
    train: Examples,
    remove: torch.Tensor,
    *,
    loss: LossName,
    edit: EditOptions,
    layers: list[TrackedLayer] | None = None,
    queries: Examples | None = None,
    progress: Progress = no_progress,
    curvature_scale: CurvatureScale | None = None,
) -> EditResult:
    """A ``newton`` or ``proximal`` edit of any model (every trackable layer by default): it needs no method's
    preconditioner (SOURCE edits use it; their first-order estimate comes from the trajectory)."""
    if edit.estimator == "first_order":
        raise AttributionError("the first-order estimate is the method's own; use edit_parameters or the method")
    check_loss_name(loss)
    check_examples(train, "training")
    rows = removed_rows(remove, len(train))
    layers = layers if layers is not None else resolve_layers(model, None)

    def no_first_order() -> Flat:
        raise AssertionError("unreachable")

    return estimate_edit(model, layers, train, rows, loss, edit, no_first_order, queries, progress, curvature_scale)


def estimate_edit(
    model: nn.Module,
    layers: list[TrackedLayer],
    train: Examples,
    rows: torch.Tensor,
    loss: LossName,
    edit: EditOptions,
    first_order: Callable[[], Flat],
    queries: Examples | None = None,
    progress: Progress = no_progress,
    curvature_scale: CurvatureScale | None = None,
) -> EditResult:
    """The edit of ``model``'s tracked ``layers`` for removed ``rows`` by ``edit.estimator``. ``first_order``
    gives the method's own first-order parameters (a flat vector). ``curvature_scale``: an earlier edit's, reused
    for the default λ (``_proximity``)."""
    edit.validate()
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    if curvature_scale is not None:
        _checked_scale(curvature_scale)
    if rows.numel() == 0:
        return EditResult(
            state,
            {
                "estimator": edit.estimator,
                "num_removed": 0,
                "num_train": len(train),
                "step_norm": 0.0,
                "relative_step_norm": 0.0,
                "warnings": [],
            },
        )
    with evaluation_mode(model):
        objective = ProximalObjective(
            model,
            layers,
            train,
            rows,
            loss,
            edit.batch_size,
            progress,
            linearised=edit.estimator != "first_order",
            curvature_products=edit.curvature_products,
            curvature_tol=edit.curvature_tol,
            cg_max_iter=edit.cg_max_iter,
            preconditioner_kind=edit.preconditioner,
            reduction=edit.reduction,
        )
        objective.proximity, rule, scale = _proximity(objective, edit, curvature_scale)
        report = SolveReport()
        if edit.estimator == "first_order":
            theta = first_order().to(objective.theta0.device, objective.theta0.dtype)
        elif edit.estimator == "newton":
            theta, report = newton_step(objective, edit, progress, newton_step_count(objective, edit))
        else:
            theta, report = minimise(objective, edit, progress)
        check_finite_vectors({"tracked layers": theta}, "edited parameters")
        diagnostics = _diagnostics(objective, theta, report, edit, rule, queries)
    if scale is not None:
        diagnostics["curvature_scale"] = scale.as_dict()
    for key, value in state_entries(layers, theta).items():
        state[key] = value.detach().to(state[key].device, state[key].dtype).clone()
    return EditResult(state, diagnostics, scale)


def assess_edit(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    train: Examples,
    rows: torch.Tensor,
    loss: LossName,
    edit: EditOptions,
    layers: list[TrackedLayer] | None = None,
    queries: Examples | None = None,
    curvature_scale: CurvatureScale | None = None,
) -> EditResult:
    """Diagnostics for a first-order state computed elsewhere (SOURCE's unrolled estimate)."""
    layers = layers if layers is not None else resolve_layers(model, None)
    rows = removed_rows(rows, len(train))

    def given() -> Flat:
        return flat_from_state(layers, state, next(model.parameters()))

    first_order = EditOptions(**{**edit.__dict__, "estimator": "first_order"})
    result = estimate_edit(
        model, layers, train, rows, loss, first_order, given, queries, curvature_scale=curvature_scale
    )
    result.state = {key: value.detach().clone() for key, value in state.items()}
    return result


# ---------------------------------------------------------------- pieces


def first_order_parameters(
    model: nn.Module,
    train: Examples,
    rows: torch.Tensor,
    loss: LossName,
    method: str,
    options: MethodOptions,
    fit: Curvature | None,
    progress: Progress,
) -> Flat:
    """θ + (1/N) P Σ_{removed} ∇ℓ over the tracked layers, P the attribution's own preconditioner."""
    device = next(model.parameters()).device
    scorer = build_scorers([(model, device)], train, loss, method, options, None if fit is None else [fit], progress)[0]
    assert scorer.preconditioner is not None
    removed = train.subset(rows)
    summed = {
        layer.name: torch.zeros(1, layer.out_features, layer.in_features, device=device, dtype=scorer.dtype)
        for layer in scorer.layers
    }
    with evaluation_mode(model), ActivityRecorder(scorer.layers) as recorder:
        for _, batch in batches(removed, options.batch_size, device, model_dtype(model)):
            activities = training_activities(model, recorder, batch, loss)
            for name in scorer.layer_names:
                summed[name] += activities[name].summed_gradient().unsqueeze(0)
    steps = scorer.preconditioner.precondition(summed)
    check_finite_vectors(steps, "parameter edits")
    step = torch.cat([steps[layer.name][0].reshape(-1) for layer in scorer.layers])
    return flat_parameters(scorer.layers).to(step.dtype) + step / len(train)


def _proximity(
    objective: ProximalObjective, edit: EditOptions, known: CurvatureScale | None
) -> tuple[float, str, CurvatureScale | None]:
    """(λ, how it was set, the curvature scale it was set from): given; else the L2 penalty δ̂ that the model's
    own gradient shows where it shows one (cos(g₀, −θ₀) ≥ WEIGHT_DECAY_EVIDENCE: with λ = δ̂ the proximal
    objective is the penalised retrain objective); else DEFAULT_PROXIMITY_FRACTION × the mean Gauss-Newton
    eigenvalue trace(G)/D at θ₀: ``known`` (an earlier edit's), else computed from the rows of G's square root
    where they can be formed (``ProximalObjective.mean_eigenvalue``), else sampled."""
    if edit.proximity is not None:
        return float(edit.proximity), "given", None
    decay, cosine = objective.implied_weight_decay
    if cosine >= WEIGHT_DECAY_EVIDENCE and 0 < decay < math.inf:
        rule = (
            f"auto: the model's own L2 penalty, read off its gradient (δ̂ = {decay:.3g}, cos(g₀, −θ₀) = "
            f"{cosine:.2f} ≥ {WEIGHT_DECAY_EVIDENCE:g})"
        )
        return decay, rule, None
    rule = f"auto: {DEFAULT_PROXIMITY_FRACTION:g} × mean Gauss-Newton eigenvalue"
    if known is not None:
        scale = known
        how = f"{known.rule}; computed by an earlier edit of this model"
    else:
        scale = _curvature_scale(objective, edit)
        how = scale.rule
    return DEFAULT_PROXIMITY_FRACTION * scale.mean_eigenvalue, f"{rule} ({how})", scale


def _curvature_scale(objective: ProximalObjective, edit: EditOptions) -> CurvatureScale:
    computed = objective.mean_eigenvalue()
    if computed is not None:
        return CurvatureScale(*computed)
    train = objective.train
    sampled = mean_curvature_eigenvalue(objective.model, objective.layers, train, objective.loss, edit.batch_size)
    rows = min(len(train), CURVATURE_SCALE_ROWS)
    return CurvatureScale(sampled, f"sampled labels on {rows} rows")


def _checked_scale(scale: CurvatureScale) -> None:
    value = scale.mean_eigenvalue
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise AttributionError(f"a curvature scale must be a positive finite mean eigenvalue, got {value!r}")


def query_losses(objective: ProximalObjective, flat: Flat, queries: Examples) -> torch.Tensor:
    """(Q,) loss of each query at the tracked parameters ``flat``."""
    values = []
    with torch.no_grad():
        for _, batch in batches(queries, objective.batch_size, objective.device, objective.dtype):
            outputs = objective._outputs(flat, batch)
            values.append(
                per_example_loss(outputs, check_targets(outputs, batch.targets, objective.loss), objective.loss)
            )
    return torch.cat(values).double().cpu()


def _diagnostics(
    objective: ProximalObjective,
    theta: Flat,
    report: SolveReport,
    edit: EditOptions,
    rule: str,
    queries: Examples | None,
) -> dict[str, Any]:
    step = theta - objective.theta0
    relative = float(step.norm()) / max(float(objective.theta0.norm()), 1e-300)
    before, after = objective.mean_kept_loss(objective.theta0), objective.mean_kept_loss(theta)
    decay, cosine = objective.implied_weight_decay
    warnings = list(report.warnings)
    if relative > edit.trust_radius * (1 + 1e-9):  # a step shortened to the radius lies on it, up to rounding
        warnings.append(
            f"the edit moves the tracked weights by {100 * relative:.1f}% of their norm (trust radius "
            f"{100 * edit.trust_radius:.0f}%): outside the region where a local estimate of retraining "
            "can be trusted"
        )
    constant = constant_prediction_loss(objective.kept.targets, objective.kept.weights, objective.loss)
    given_back = _learned_given_back(before, after, constant)
    warning = _loss_warning(before, after, constant, given_back, objective.loss)
    if warning is not None:
        warnings.append(warning)
    diagnostics: dict[str, Any] = {
        "estimator": edit.estimator,
        "num_removed": int(objective.removed.numel()),
        "num_train": objective.n,
        "proximity": objective.proximity,
        "proximity_rule": rule,
        "reduction": objective.reduction if edit.estimator != "first_order" else None,
        "implied_weight_decay": decay,
        "implied_weight_decay_cosine": cosine,
        "step_norm": float(step.norm()),
        "relative_step_norm": relative,
        "remaining_loss_before": before,
        "remaining_loss_after": after,
        "remaining_loss_constant": constant,
        "learned_given_back": given_back,
        "passes_over_remaining_data": objective.passes,
        "solver": report.as_dict() if edit.estimator != "first_order" else None,
        "curvature": dict(objective.curvature_report) if objective.curvature_report else None,
        "warnings": warnings,
    }
    if queries is not None and len(queries):
        start, end = query_losses(objective, objective.theta0, queries), query_losses(objective, theta, queries)
        change = end - start
        diagnostics.update(
            {
                "query_loss_before_mean": float(start.mean()),
                "query_loss_after_mean": float(end.mean()),
                "query_loss_changes": [float(v) for v in change[:MAX_REPORTED_QUERIES]],
            }
        )
    return diagnostics


def _learned_given_back(before: float, after: float, constant: float | None) -> float | None:
    """(after − before) / (constant − before): the share of what the model had learned about the remaining rows
    (their loss below the best constant prediction's) that the edit gave back; None when the model was no better
    than that constant on them, or the constant is undefined."""
    if constant is None or constant <= before:
        return None
    return (after - before) / (constant - before)


CONSTANT_PREDICTIONS = {
    "cross_entropy": "the class frequencies",
    "mse": "the mean target",
    "causal_lm": "the token frequencies",
}


def _loss_warning(
    before: float, after: float, constant: float | None, given_back: float | None, loss: LossName
) -> str | None:
    """The warning when the edit gave back more than LEARNED_SHARE_WARNING of what the model had learned about
    the remaining rows; where that share is undefined, when their mean loss rose by more than LOSS_RISE_WARNING."""
    if given_back is not None and constant is not None:
        if given_back <= LEARNED_SHARE_WARNING:
            return None
        return (
            f"the edit gives back {100 * given_back:.1f}% of what the model had learned about the rows it keeps: "
            f"their mean training loss rose from {before:.4g} to {after:.4g} (predicting "
            f"{CONSTANT_PREDICTIONS[loss]} gives {constant:.4g})"
        )
    if after > before * (1 + LOSS_RISE_WARNING) + 1e-12:
        return (
            f"the remaining rows' mean training loss rose from {before:.4g} to {after:.4g}: the edit "
            "undoes what the model learned from the data it keeps"
        )
    return None


def removed_rows(remove: torch.Tensor, size: int) -> torch.Tensor:
    """Sorted unique row indices; an empty set is allowed (the edit is then the identity)."""
    rows = torch.as_tensor(remove)
    if rows.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if rows.dtype.is_floating_point or rows.dtype == torch.bool or rows.dim() != 1:
        raise AttributionError("remove must be a 1-D tensor of integer row indices into the training data")
    if int(rows.min()) < 0 or int(rows.max()) >= size:
        raise AttributionError(f"remove indices must lie in [0, {size - 1}]")
    unique: torch.Tensor = torch.unique(rows.long())
    return unique
