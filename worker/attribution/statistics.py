"""Per-layer curvature statistics, fitted by streaming the training data (the shared substrate).

Reusable pieces (SOURCE builds on them): covariance factors A = E[a a^T] (mean over positions) and
S = E[sum_t g_t g_t^T] (mean over examples and label draws), their eigendecomposition (``factor_dtype``),
corrected eigenvalues Lambda = E[(Q_S^T G Q_A)^2] in a given eigenbasis, the diagonal E[G^2], and
``apply_in_eigenbasis`` (a function of the eigenvalues applied as Q_S[(Q_S^T V Q_A) * values]Q_A^T).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

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
    """Mean Kronecker factors of one layer: activation A (d_in x d_in), gradient S (d_out x d_out)."""

    activation: torch.Tensor
    gradient: torch.Tensor


@dataclass
class Eigenbasis:
    """Eigendecompositions of one layer's factors (ascending eigenvalues; see ``factor_dtype`` for the dtype)."""

    activation_eigenvalues: torch.Tensor  # (d_in,)
    activation_eigenvectors: torch.Tensor  # Q_A (d_in, d_in)
    gradient_eigenvalues: torch.Tensor  # (d_out,)
    gradient_eigenvectors: torch.Tensor  # Q_S (d_out, d_out)


# ---------------------------------------------------------------- per-batch contributions


def activation_covariance_product(activity: LayerActivity) -> torch.Tensor:
    """A^T A over examples and positions, as the matrix product gives it: (d_in, d_in), symmetric up to the
    product's rounding (its upper triangle is what the sums keep)."""
    a = activity.activations.flatten(0, 1)
    return a.T @ a


def gradient_covariance_product(activity: LayerActivity) -> torch.Tensor:
    """G^T G over examples and positions, as the matrix product gives it: (d_out, d_out)."""
    g = activity.gradients.flatten(0, 1)
    return g.T @ g


def activation_covariance_sum(activity: LayerActivity) -> torch.Tensor:
    """sum over examples and positions of a a^T: (d_in, d_in), exactly symmetric (the product's upper triangle,
    mirrored: a product's two triangles can differ in their last bits)."""
    return symmetric_from_upper(activation_covariance_product(activity))


def gradient_covariance_sum(activity: LayerActivity) -> torch.Tensor:
    """sum over examples and positions of g g^T: (d_out, d_out), exactly symmetric (see above)."""
    return symmetric_from_upper(gradient_covariance_product(activity))


def symmetric_from_upper(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``matrix``'s."""
    upper = matrix.triu()
    return upper.add_(upper.triu(1).T)


class PackedSymmetricSum:
    """A float64 running sum of symmetric (d, d) matrices that keeps only their upper triangle: d (d + 1) / 2
    numbers, the memory of one float32 matrix, with float64 additions. It holds exactly what a full float64 sum
    of the same matrices' ``symmetric_from_upper`` holds in its upper triangle, so a fit that sums this way equals
    one that sums full matrices (sharded fits) to the last bit. The largest buffers a factor fit holds while it
    streams are these sums (GPT-2-small LoRA on the attention and MLP projections: 205 M entries)."""

    def __init__(self, upper: torch.Tensor):
        self.upper = upper  # (d, d) bool, the upper triangle (shared between sums of one size)
        size = upper.shape[0]
        self.packed = torch.zeros(size * (size + 1) // 2, dtype=torch.float64, device=upper.device)

    def add_(self, matrix: torch.Tensor) -> None:
        self.packed.add_(matrix.masked_select(self.upper))

    def full(self) -> torch.Tensor:
        """The (d, d) float64 sum; the packed buffer is released."""
        matrix = torch.zeros(self.upper.shape, dtype=torch.float64, device=self.packed.device)
        matrix.masked_scatter_(self.upper, self.packed)
        self.packed = self.packed.new_empty(0)
        return symmetric_from_upper(matrix)


def upper_triangle_masks(sizes: Iterable[int], device: torch.device) -> dict[int, torch.Tensor]:
    """One (d, d) upper-triangle mask per size."""
    return {d: torch.ones(d, d, dtype=torch.bool, device=device).triu_() for d in set(sizes)}


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


def symmetric_eigh(matrix: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetrised matrix, computed in ``dtype``."""
    m = matrix.to(dtype)
    with few_threads(eigh_work(m.shape[0])):
        values: torch.Tensor
        vectors: torch.Tensor
        values, vectors = torch.linalg.eigh(0.5 * (m + m.T))
    return values, vectors


def eigenbasis(covariances: Covariances, dtype: torch.dtype = torch.float64) -> Eigenbasis:
    """The factors' eigendecompositions, computed in ``dtype`` (a fit's ``factor_dtype``)."""
    lam_a, q_a = symmetric_eigh(covariances.activation, dtype)
    lam_s, q_s = symmetric_eigh(covariances.gradient, dtype)
    return Eigenbasis(lam_a, q_a, lam_s, q_s)


def factor_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a fit eigendecomposes and keeps its factor matrices (covariances, eigenvectors) in: float64 for a
    float64 model, float32 otherwise. The factors are summed in float64 either way (so shards reduce to the same
    means as one pass). A float32 model's preconditioner and eigenvalue pass apply the eigenvectors in float32,
    so float64 storage (twice the memory) and a float64 eigendecomposition (about twice the time: most of a LoRA
    fit's cost at GPT-2 width) would buy little there; the corrected eigenvalues are fitted in whatever basis is
    used."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def stored_bases(covariances: dict[str, Covariances], dtype: torch.dtype) -> dict[str, Eigenbasis]:
    """Each layer's covariances eigendecomposed in ``dtype`` and kept on the CPU as their eigendecompositions
    (eigenvectors in ``dtype``, eigenvalues as float64): a factor is Q diag(lambda) Q^T, so the matrices
    themselves are not kept (``factors_of`` gives them back). Layer by layer, each layer's matrices dropped from
    ``covariances`` as soon as they are done with, so no second copy of every factor is alive at once."""
    kept_bases: dict[str, Eigenbasis] = {}
    for name in list(covariances):
        covariance = covariances.pop(name)
        basis = eigenbasis(covariance, dtype)
        del covariance
        kept_bases[name] = Eigenbasis(
            _kept(basis.activation_eigenvalues, torch.float64),
            _kept(basis.activation_eigenvectors, dtype),
            _kept(basis.gradient_eigenvalues, torch.float64),
            _kept(basis.gradient_eigenvectors, dtype),
        )
        del basis
    return kept_bases


def factors_of(basis: Eigenbasis) -> Covariances:
    """The covariance factors an eigenbasis was computed from, Q diag(lambda) Q^T, in float64."""

    def matrix(values: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        q = vectors.to(torch.float64)
        return (q * values.to(torch.float64)) @ q.T

    return Covariances(
        matrix(basis.activation_eigenvalues, basis.activation_eigenvectors),
        matrix(basis.gradient_eigenvalues, basis.gradient_eigenvectors),
    )


def _kept(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to("cpu", dtype).contiguous()


def numerical_null_space(eigenvalues: torch.Tensor, precision: torch.dtype) -> torch.Tensor:
    """(d,) bool: the directions of a factor (eigenvalues of a d x d PSD matrix accumulated in ``precision``)
    that are numerically null, eigenvalues at most d x eps x the largest (numpy's ``matrix_rank`` tolerance).
    Half-precision models count with float32's eps (a coarser one would call most of a spectrum null)."""
    eps = torch.finfo(precision if precision in (torch.float32, torch.float64) else torch.float32).eps
    tolerance = eigenvalues.numel() * eps * float(eigenvalues.abs().max())
    return eigenvalues <= tolerance


def pool_null_spaces(eigenvalues: torch.Tensor, basis: Eigenbasis, precision: torch.dtype) -> torch.Tensor:
    """Corrected eigenvalues Lambda (d_out, d_in) averaged over each factor's numerical null space.

    A rank-deficient factor (fewer examples or tokens than its width, or a structural null direction) has a
    null eigenspace whose eigenvectors ``eigh`` picks arbitrarily, steered by float noise (padding, thread count,
    BLAS kernel). Lambda is fitted with fresh labels (true Fisher) that do reach into that space, so its entries
    there depend on that arbitrary basis, and scores moved by up to 1e-2 when the noise did. Their mean over the
    null space, ||P_null G q||^2 / dim, does not: the preconditioner is then the same whichever basis was picked.
    """
    pooled = eigenvalues.clone()
    rows = numerical_null_space(basis.gradient_eigenvalues.to(pooled.device), precision)
    if int(rows.sum()) > 1:
        pooled[rows] = pooled[rows].mean(0, keepdim=True)
    columns = numerical_null_space(basis.activation_eigenvalues.to(pooled.device), precision)
    if int(columns.sum()) > 1:
        pooled[:, columns] = pooled[:, columns].mean(1, keepdim=True)
    return pooled


def rotate(vectors: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    """Q_S^T V Q_A for V (..., d_out, d_in)."""
    return _left_multiply(q_s.T, vectors) @ q_a


def unrotate(vectors: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    """Q_S V Q_A^T for V (..., d_out, d_in)."""
    return _left_multiply(q_s, vectors) @ q_a.T


def _left_multiply(matrix: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``matrix @ vectors`` for a stack of (d_out, d_in) matrices. ``V @ Q`` on a stack is one matrix product
    (torch folds the stack into rows), ``Q @ V`` is one product per matrix that each reads all of Q: for tall
    matrices (LoRA's B: 2304 x 8 at GPT-2 width) the stack is laid side by side instead, (d_out, stack x d_in),
    and multiplied once (about 4x faster there)."""
    d_out, d_in = vectors.shape[-2:]
    if vectors.dim() < 3 or d_out <= d_in:
        return matrix @ vectors
    stack = vectors.reshape(-1, d_out, d_in)
    side_by_side = stack.transpose(0, 1).reshape(d_out, -1)
    product = (matrix @ side_by_side).reshape(matrix.shape[0], stack.shape[0], d_in).transpose(0, 1)
    return product.reshape(*vectors.shape[:-2], matrix.shape[0], d_in)


def apply_in_eigenbasis(
    vectors: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Q_S [(Q_S^T V Q_A) * values] Q_A^T for V (..., d_out, d_in): the matrix function with eigenvalues ``values``."""
    return unrotate(rotate(vectors, q_s, q_a) * values, q_s, q_a)


# ---------------------------------------------------------------- passes over the training data


Visitor = Callable[[str, LayerActivity], None]
SumKind = Literal["covariances", "diagonal", "eigenvalues"]


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
    first_row: int = 0,
) -> None:
    """One pass over ``data``: calls ``visit(layer name, activity)`` for every batch (rows = examples x draws).

    The labels of a batch are drawn from a generator seeded by the batch's first training row (``first_row``:
    the training row of ``data``'s first row, when ``data`` is a shard of the training set), so every pass, and
    every shard whose batches start at the same rows, sees the same sampled labels.
    """
    dtype = model_dtype(model)
    with evaluation_mode(model), ActivityRecorder(layers) as recorder:
        for start, batch in batches(data, batch_size, device, dtype):
            generator = labels.generator(first_row + start)
            with few_threads(batch_work(layers, token_rows(batch) * labels.samples, model)):
                for activities in fitting_activities(model, recorder, batch, loss, labels, generator):
                    for name, activity in activities.items():
                        visit(name, activity)
            counter.advance(len(batch))


@dataclass
class LayerSums:
    """float64 sums of one layer's per-batch statistics over some training rows, and the counts that make them
    means: ``positions`` (the activation covariance's denominator) and ``rows`` (examples x label draws).
    ``dtype``: the dtype the fitted factor matrices are eigendecomposed and kept in (``factor_dtype``)."""

    sums: dict[str, torch.Tensor]
    positions: int
    rows: int
    dtype: torch.dtype = torch.float64


def fitting_sums(
    kind: SumKind,
    model: nn.Module,
    layers: list[TrackedLayer],
    data: Examples,
    loss: LossName,
    labels: FisherLabels,
    batch_size: int,
    device: torch.device,
    counter: StageCounter,
    bases: dict[str, Eigenbasis] | None = None,
    first_row: int = 0,
) -> dict[str, LayerSums]:
    """One pass's sums per layer: ``covariances`` (``activation`` = sum a a^T, ``gradient`` = sum g g^T),
    ``diagonal`` (sum G * G) or ``eigenvalues`` (sum (Q_S^T G Q_A)^2 in ``bases``). Sums over disjoint row ranges
    add up to the sums over their union (`add_sums`): the fit's means are the sums over counts."""
    dtype = model_dtype(model)
    square = {layer.name: (layer.in_features, layer.in_features) for layer in layers}
    out_square = {layer.name: (layer.out_features, layer.out_features) for layer in layers}
    matrix = {layer.name: (layer.out_features, layer.in_features) for layer in layers}
    shapes = {"activation": square, "gradient": out_square} if kind == "covariances" else {kind: matrix}
    result = {
        layer.name: LayerSums(
            {
                stat: torch.zeros(shape[layer.name], dtype=torch.float64, device=device)
                for stat, shape in shapes.items()
            },
            0,
            0,
            factor_dtype(dtype),
        )
        for layer in layers
    }
    if kind == "eigenvalues":
        assert bases is not None, "the eigenvalue sums need the eigenbasis"
        q_s = {n: b.gradient_eigenvectors.to(device, dtype) for n, b in bases.items()}
        q_a = {n: b.activation_eigenvectors.to(device, dtype) for n, b in bases.items()}

    def visit(name: str, activity: LayerActivity) -> None:
        sums = result[name]
        if kind == "covariances":
            sums.sums["activation"] += activation_covariance_sum(activity).to(torch.float64)
            sums.sums["gradient"] += gradient_covariance_sum(activity).to(torch.float64)
            sums.positions += activity.num_positions
        elif kind == "diagonal":
            sums.sums["diagonal"] += squared_gradient_sum(activity).to(torch.float64)
        else:
            sums.sums["eigenvalues"] += corrected_eigenvalue_sum(activity, q_s[name], q_a[name]).to(torch.float64)
        sums.rows += activity.batch_size

    stream_fitting_gradients(model, layers, data, loss, labels, batch_size, device, counter, visit, first_row)
    return result


def add_sums(parts: Sequence[dict[str, LayerSums]]) -> dict[str, LayerSums]:
    """The sums over the union of disjoint row ranges (added in the order given, in the sums' dtypes)."""
    total: dict[str, LayerSums] = {}
    for part in parts:
        for name, layer in part.items():
            if name not in total:
                total[name] = LayerSums(
                    {k: v.clone() for k, v in layer.sums.items()}, layer.positions, layer.rows, layer.dtype
                )
                continue
            into = total[name]
            for stat, value in layer.sums.items():
                into.sums[stat] += value.to(into.sums[stat].device)
            into.positions += layer.positions
            into.rows += layer.rows
    return total


def covariances_from_sums(sums: dict[str, LayerSums], in_place: bool = False) -> dict[str, Covariances]:
    """A = sum a a^T / positions; S = sum_t g g^T / (examples x draws). ``in_place`` turns the sums themselves
    into the means (no second copy of every factor) when nothing reads the sums afterwards."""

    def mean(total: torch.Tensor, count: int) -> torch.Tensor:
        return total.div_(max(count, 1)) if in_place else total / max(count, 1)

    return {
        name: Covariances(mean(s.sums["activation"], s.positions), mean(s.sums["gradient"], s.rows))
        for name, s in sums.items()
    }


def means_from_sums(sums: dict[str, LayerSums], stat: str) -> dict[str, torch.Tensor]:
    """A weight-shaped statistic's mean over examples and label draws."""
    return {name: s.sums[stat] / max(s.rows, 1) for name, s in sums.items()}


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
    return covariances_from_sums(
        fitting_sums("covariances", model, layers, data, loss, labels, batch_size, device, counter),
        in_place=True,
    )


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
    sums = fitting_sums("eigenvalues", model, layers, data, loss, labels, batch_size, device, counter, bases)
    return means_from_sums(sums, "eigenvalues")


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
    sums = fitting_sums("diagonal", model, layers, data, loss, labels, batch_size, device, counter)
    return means_from_sums(sums, "diagonal")


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
    dtype = model_dtype(model)
    with evaluation_mode(model), ActivityRecorder(layers) as recorder:
        for start, batch in batches(data, batch_size, device, dtype):
            generator = labels.generator(start)
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
