"""Per-layer curvature statistics, fitted by streaming the training data (the shared substrate).

Reusable pieces (SOURCE builds on them): covariance factors A = E[a a^T] (mean over positions) and
S = E[sum_t g_t g_t^T] (mean over examples and label draws), their float64 eigendecomposition,
corrected eigenvalues Lambda = E[(Q_S^T G Q_A)^2] in a given eigenbasis, the diagonal E[G^2], and
``apply_in_eigenbasis`` (a function of the eigenvalues applied as Q_S[(Q_S^T V Q_A) * values]Q_A^T).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from worker.attribution.gradients import (
    FisherLabels,
    batches,
    fitting_activities,
    fitting_and_training_activities,
    model_dtype,
)
from worker.attribution.hooks import Activities, ActivityRecorder, LayerActivity, TrackedLayer, evaluation_mode
from worker.attribution.losses import LossName
from worker.attribution.progress import StageCounter
from worker.attribution.threads import batch_work, eigh_work, few_threads, token_rows
from worker.attribution.types import Examples


@dataclass
class Covariances:
    """Mean Kronecker factors of one layer (float64): activation A (d_in x d_in), gradient S (d_out x d_out)."""

    activation: torch.Tensor
    gradient: torch.Tensor


@dataclass
class Eigenbasis:
    """Eigendecompositions of one layer's factors (float64, ascending eigenvalues)."""

    activation_eigenvalues: torch.Tensor  # (d_in,)
    activation_eigenvectors: torch.Tensor  # Q_A (d_in, d_in)
    gradient_eigenvalues: torch.Tensor  # (d_out,)
    gradient_eigenvectors: torch.Tensor  # Q_S (d_out, d_out)


# ---------------------------------------------------------------- per-batch contributions


def activation_covariance_sum(activity: LayerActivity) -> torch.Tensor:
    """sum over examples and positions of a a^T: (d_in, d_in)."""
    a = activity.activations.flatten(0, 1)
    return a.T @ a


def gradient_covariance_sum(activity: LayerActivity) -> torch.Tensor:
    """sum over examples and positions of g g^T: (d_out, d_out)."""
    g = activity.gradients.flatten(0, 1)
    return g.T @ g


def corrected_eigenvalue_sum(activity: LayerActivity, q_s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    """sum over examples of (Q_S^T G Q_A)^2: (d_out, d_in). Rank-one layers: one matmul, no per-example matrix."""
    if activity.rank_one:
        g_rotated = activity.gradients[:, 0, :] @ q_s  # (B, d_out)
        a_rotated = activity.activations[:, 0, :] @ q_a  # (B, d_in)
        return g_rotated.pow(2).T @ a_rotated.pow(2)
    rotated = rotate(activity.per_example_gradients(), q_s, q_a)
    return rotated.pow(2).sum(0)


def squared_gradient_sum(activity: LayerActivity) -> torch.Tensor:
    """sum over examples of G * G (the diagonal of the empirical curvature): (d_out, d_in)."""
    if activity.rank_one:
        return activity.gradients[:, 0, :].pow(2).T @ activity.activations[:, 0, :].pow(2)
    return activity.per_example_gradients().pow(2).sum(0)


# ---------------------------------------------------------------- linear algebra in the eigenbasis


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetrised matrix, in float64."""
    m = matrix.to(torch.float64)
    with few_threads(eigh_work(m.shape[0])):
        values: torch.Tensor
        vectors: torch.Tensor
        values, vectors = torch.linalg.eigh(0.5 * (m + m.T))
    return values, vectors


def eigenbasis(covariances: Covariances) -> Eigenbasis:
    lam_a, q_a = symmetric_eigh(covariances.activation)
    lam_s, q_s = symmetric_eigh(covariances.gradient)
    return Eigenbasis(lam_a, q_a, lam_s, q_s)


def rotate(vectors: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    """Q_S^T V Q_A for V (..., d_out, d_in)."""
    return q_s.T @ vectors @ q_a


def unrotate(vectors: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    """Q_S V Q_A^T for V (..., d_out, d_in)."""
    return q_s @ vectors @ q_a.T


def apply_in_eigenbasis(
    vectors: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Q_S [(Q_S^T V Q_A) * values] Q_A^T for V (..., d_out, d_in): the matrix function with eigenvalues ``values``."""
    return unrotate(rotate(vectors, q_s, q_a) * values, q_s, q_a)


# ---------------------------------------------------------------- passes over the training data


Visitor = Callable[[str, LayerActivity], None]


def stream_fitting_gradients(
    model: nn.Module,
    layers: list[TrackedLayer],
    data: Examples,
    loss: LossName,
    labels: FisherLabels,
    batch_size: int,
    device: torch.device,
    counter: StageCounter,
    visit: Visitor,
) -> None:
    """One pass over ``data``: calls ``visit(layer name, activity)`` for every batch (rows = examples x draws).

    The label generator is re-seeded at each pass, so every pass sees the same sampled labels.
    """
    generator = labels.generator()
    dtype = model_dtype(model)
    with evaluation_mode(model), ActivityRecorder(layers) as recorder:
        for _, batch in batches(data, batch_size, device, dtype):
            with few_threads(batch_work(layers, token_rows(batch) * labels.samples, model)):
                for activities in fitting_activities(model, recorder, batch, loss, labels, generator):
                    for name, activity in activities.items():
                        visit(name, activity)
            counter.advance(len(batch))


def fit_covariances(
    model: nn.Module,
    layers: list[TrackedLayer],
    data: Examples,
    loss: LossName,
    labels: FisherLabels,
    batch_size: int,
    device: torch.device,
    counter: StageCounter,
) -> dict[str, Covariances]:
    """A = sum a a^T / positions; S = sum_t g g^T / (examples x draws), per layer, float64."""
    activation = {
        layer.name: torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64, device=device)
        for layer in layers
    }
    gradient = {
        layer.name: torch.zeros(layer.out_features, layer.out_features, dtype=torch.float64, device=device)
        for layer in layers
    }
    positions = {layer.name: 0 for layer in layers}
    rows = {layer.name: 0 for layer in layers}

    def visit(name: str, activity: LayerActivity) -> None:
        activation[name] += activation_covariance_sum(activity).to(torch.float64)
        gradient[name] += gradient_covariance_sum(activity).to(torch.float64)
        positions[name] += activity.num_positions
        rows[name] += activity.batch_size

    stream_fitting_gradients(model, layers, data, loss, labels, batch_size, device, counter, visit)
    # in place: the sums become the means (no second float64 copy of every factor)
    return {
        layer.name: Covariances(
            activation[layer.name].div_(max(positions[layer.name], 1)),
            gradient[layer.name].div_(max(rows[layer.name], 1)),
        )
        for layer in layers
    }


def fit_corrected_eigenvalues(
    model: nn.Module,
    layers: list[TrackedLayer],
    data: Examples,
    loss: LossName,
    labels: FisherLabels,
    bases: dict[str, Eigenbasis],
    batch_size: int,
    device: torch.device,
    counter: StageCounter,
) -> dict[str, torch.Tensor]:
    """Lambda = E[(Q_S^T G Q_A)^2] per layer (mean over examples and label draws), float64."""
    dtype = model_dtype(model)
    q_s = {n: b.gradient_eigenvectors.to(device, dtype) for n, b in bases.items()}
    q_a = {n: b.activation_eigenvectors.to(device, dtype) for n, b in bases.items()}
    return _mean_over_fitting_rows(
        lambda name, activity: corrected_eigenvalue_sum(activity, q_s[name], q_a[name]),
        model,
        layers,
        data,
        loss,
        labels,
        batch_size,
        device,
        counter,
    )


def fit_diagonal(
    model: nn.Module,
    layers: list[TrackedLayer],
    data: Examples,
    loss: LossName,
    labels: FisherLabels,
    batch_size: int,
    device: torch.device,
    counter: StageCounter,
) -> dict[str, torch.Tensor]:
    """E[G * G] per layer (mean over examples and label draws), float64, shaped like the weight matrix."""
    return _mean_over_fitting_rows(
        lambda name, activity: squared_gradient_sum(activity),
        model,
        layers,
        data,
        loss,
        labels,
        batch_size,
        device,
        counter,
    )


def _mean_over_fitting_rows(
    statistic: Callable[[str, LayerActivity], torch.Tensor],
    model: nn.Module,
    layers: list[TrackedLayer],
    data: Examples,
    loss: LossName,
    labels: FisherLabels,
    batch_size: int,
    device: torch.device,
    counter: StageCounter,
) -> dict[str, torch.Tensor]:
    """Mean over examples and label draws of a weight-shaped per-batch sum ``statistic``, float64."""
    sums = {
        layer.name: torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64, device=device)
        for layer in layers
    }
    rows = {layer.name: 0 for layer in layers}

    def visit(name: str, activity: LayerActivity) -> None:
        sums[name] += statistic(name, activity).to(torch.float64)
        rows[name] += activity.batch_size

    stream_fitting_gradients(model, layers, data, loss, labels, batch_size, device, counter, visit)
    return {name: total / max(rows[name], 1) for name, total in sums.items()}


# ---------------------------------------------------------------- one pass that also caches per-example rows


def stream_fitting_and_training_gradients(
    model: nn.Module,
    layers: list[TrackedLayer],
    data: Examples,
    loss: LossName,
    labels: FisherLabels,
    batch_size: int,
    device: torch.device,
    counter: StageCounter,
    visit: Callable[[int, list[Activities], Activities | None], None],
    with_training: bool,
) -> None:
    """Like ``stream_fitting_gradients`` (same batches, same sampled labels), but calls
    ``visit(examples in batch, fitting activities, training activities or None)`` once per batch; the
    training activities (gradients of the given-label loss) are computed when ``with_training``."""
    generator = labels.generator()
    dtype = model_dtype(model)
    with evaluation_mode(model), ActivityRecorder(layers) as recorder:
        for _, batch in batches(data, batch_size, device, dtype):
            with few_threads(batch_work(layers, token_rows(batch) * (labels.samples + int(with_training)), model)):
                if with_training:
                    fitting, training = fitting_and_training_activities(model, recorder, batch, loss, labels, generator)
                else:
                    fitting, training = fitting_activities(model, recorder, batch, loss, labels, generator), None
                visit(len(batch), fitting, training)
            counter.advance(len(batch))


def corrected_eigenvalues_from_activities(
    layers: list[TrackedLayer],
    activity_batches: Iterable[Activities],
    bases: dict[str, Eigenbasis],
    device: torch.device,
    dtype: torch.dtype,
    after_batch: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """``fit_corrected_eigenvalues`` from already recorded fitting activities (no model pass)."""
    q_s = {n: b.gradient_eigenvectors.to(device, dtype) for n, b in bases.items()}
    q_a = {n: b.activation_eigenvectors.to(device, dtype) for n, b in bases.items()}
    sums = {
        layer.name: torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64, device=device)
        for layer in layers
    }
    rows = {layer.name: 0 for layer in layers}
    for position, activities in enumerate(activity_batches):
        some = next(iter(activities.values()))
        with few_threads(batch_work(layers, some.batch_size)):
            for name, activity in activities.items():
                sums[name] += corrected_eigenvalue_sum(activity, q_s[name], q_a[name]).to(torch.float64)
                rows[name] += activity.batch_size
        if after_batch is not None:
            after_batch(position)
    return {name: total / max(rows[name], 1) for name, total in sums.items()}
