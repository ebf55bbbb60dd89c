"""Fitting a curvature approximation on the training data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from worker.attribution.curvature.base import Curvature
from worker.attribution.curvature.diagonal import DiagonalCurvature
from worker.attribution.curvature.ekfac import EkfacCurvature
from worker.attribution.curvature.identity import IdentityCurvature
from worker.attribution.curvature.kfac import KfacCurvature
from worker.attribution.gradients import FisherLabels, model_dtype, place_model
from worker.attribution.hooks import Activities, LayerActivity, TrackedLayer, resolve_layers
from worker.attribution.losses import LossName, check_examples, check_loss_name
from worker.attribution.options import FitOptions
from worker.attribution.progress import StageCounter
from worker.attribution.statistics import (
    Covariances,
    Eigenbasis,
    PackedSymmetricSum,
    activation_covariance_product,
    corrected_eigenvalues_from_activities,
    factor_dtype,
    fit_corrected_eigenvalues,
    fit_diagonal,
    gradient_covariance_product,
    squared_gradient_sum,
    stored_bases,
    stream_fitting_and_training_gradients,
    stream_fitting_gradients,
    upper_triangle_masks,
)
from worker.attribution.training_index import IndexRecorder, examples_fingerprint, model_fingerprint
from worker.attribution.types import Examples, Progress, no_progress

PASSES = {"identity": 0, "diagonal": 1, "kfac": 1, "ekfac": 2}


def fit_passes(options: FitOptions) -> int:
    """How many passes over the training data a fit takes."""
    return PASSES[options.strategy]


def fit_curvature(
    model: nn.Module,
    train: Examples,
    loss: LossName,
    options: FitOptions,
    progress: Progress = no_progress,
    device: torch.device | None = None,
) -> Curvature:
    """Fits ``options.strategy`` on ``train`` (progress stage "fit", counted in examples over all passes)."""
    options.validate()
    check_loss_name(loss)
    check_examples(train, "training")
    placed, target = place_model(model, device)
    layers = resolve_layers(placed, options.layers)
    counter = StageCounter(progress, "fit", fit_passes(options) * len(train)).start()
    return fit_layers(placed, layers, train, loss, options, counter, target)


def fit_layers(
    model: nn.Module,
    layers: list[TrackedLayer],
    train: Examples,
    loss: LossName,
    options: FitOptions,
    counter: StageCounter,
    device: torch.device,
) -> Curvature:
    names = [layer.name for layer in layers]
    labels = FisherLabels(options.fisher, options.fisher_samples, options.seed)
    batch = options.batch_size
    if options.strategy == "identity":
        return IdentityCurvature(names, options)
    plan = cache_plan(model, layers, train, options)
    if plan.any:
        return _fit_with_cache(model, layers, train, loss, options, labels, counter, device, plan)
    if options.strategy == "diagonal":
        diagonals = fit_diagonal(model, layers, train, loss, labels, batch, device, counter)
        return DiagonalCurvature(names, options, _to_cpu(diagonals))
    bases = _packed_covariance_bases(model, layers, train, loss, labels, batch, device, counter)
    if options.strategy == "kfac":
        return KfacCurvature(names, options, bases)
    eigenvalues = fit_corrected_eigenvalues(
        model, layers, train, loss, labels.for_eigenvalues(), bases, batch, device, counter
    )
    return EkfacCurvature(names, options, bases, _to_cpu(eigenvalues))


class PackedCovariances:
    """Per layer, the running float64 sums of the two K-FAC factors as upper triangles (``PackedSymmetricSum``)
    and their counts; ``bases`` turns them into eigenbases one layer at a time, so a fit's peak memory is the
    packed sums plus one layer's full matrices, not every layer's full float64 sums."""

    def __init__(self, layers: list[TrackedLayer], device: torch.device) -> None:
        masks = upper_triangle_masks([d for layer in layers for d in (layer.in_features, layer.out_features)], device)
        self.activation = {layer.name: PackedSymmetricSum(masks[layer.in_features]) for layer in layers}
        self.gradient = {layer.name: PackedSymmetricSum(masks[layer.out_features]) for layer in layers}
        self.positions = {layer.name: 0 for layer in layers}
        self.rows = {layer.name: 0 for layer in layers}

    def add(self, name: str, activity: LayerActivity) -> None:
        self.activation[name].add_(activation_covariance_product(activity))
        self.gradient[name].add_(gradient_covariance_product(activity))
        self.positions[name] += activity.num_positions
        self.rows[name] += activity.batch_size

    def bases(self, dtype: torch.dtype) -> dict[str, Eigenbasis]:
        """The factors' eigenbases (A = sum a a^T / positions, S = sum g g^T / rows), in ``dtype``; the sums
        are released as each layer is done."""
        bases = {}
        for name in list(self.activation):
            means = Covariances(
                self.activation.pop(name).full().div_(max(self.positions[name], 1)),
                self.gradient.pop(name).full().div_(max(self.rows[name], 1)),
            )
            bases.update(stored_bases({name: means}, dtype))
            del means
        return bases


def _packed_covariance_bases(
    model: nn.Module,
    layers: list[TrackedLayer],
    train: Examples,
    loss: LossName,
    labels: FisherLabels,
    batch_size: int,
    device: torch.device,
    counter: StageCounter,
) -> dict[str, Eigenbasis]:
    """The covariance pass of a fit that keeps no rows: the sums ``fitting_sums`` makes (sharded fits exchange
    them as full matrices), kept packed while they stream."""
    sums = PackedCovariances(layers, device)
    stream_fitting_gradients(model, layers, train, loss, labels, batch_size, device, counter, sums.add)
    return sums.bases(factor_dtype(model_dtype(model)))


@dataclass(frozen=True)
class CachePlan:
    """What a fit keeps of its first pass: the fitting rows (EK-FAC second pass) and/or the training index."""

    fitting_bytes: int  # 0: the EK-FAC second pass re-runs the model
    index_bytes: int  # 0: no training-gradient index
    shared: bool  # empirical Fisher: the fitting rows are the training gradients

    @property
    def any(self) -> bool:
        return self.fitting_bytes > 0 or self.index_bytes > 0


def cache_plan(model: nn.Module, layers: list[TrackedLayer], train: Examples, options: FitOptions) -> CachePlan:
    """Byte budgets of the caches, decided before the pass from the layer widths: a Linear is counted as a
    rank-one layer (d_in + d_out per example), a convolution as a per-example gradient matrix (d_out x d_in).
    The recorders check the real sizes batch by batch (a Linear on sequences keeps matrices) and give up
    beyond the budget. Not for embeddings (their rows are one-hot over the vocabulary)."""
    budget = options.memory_budget_bytes
    if budget <= 0 or options.strategy == "identity" or any(layer.kind == "embedding" for layer in layers):
        return CachePlan(0, 0, False)
    width = sum(_example_width(layer) for layer in layers) * torch.finfo(model_dtype(model)).bits // 8
    shared = options.fisher == "empirical"
    # The true Fisher's eigenvalue pass needs fresh labels (``FisherLabels.for_eigenvalues``), so only the empirical
    # Fisher's rows can be re-used for it.
    fitting = len(train) * width if options.strategy == "ekfac" and shared else 0
    index = len(train) * width if options.store_gradients else 0
    fitting = fitting if fitting <= budget else 0
    if shared:
        need = max(fitting, index)
        index = index if need <= budget else 0
        fitting = fitting if fitting <= budget else 0
    else:
        index = index if fitting + index <= budget else 0
    return CachePlan(fitting, index, shared)


def _example_width(layer: TrackedLayer) -> int:
    """Numbers kept per training example for ``layer`` (at least: a Linear may turn out to run on sequences)."""
    if layer.kind == "linear":
        return layer.in_features + layer.out_features
    return layer.in_features * layer.out_features


def _fit_with_cache(
    model: nn.Module,
    layers: list[TrackedLayer],
    train: Examples,
    loss: LossName,
    options: FitOptions,
    labels: FisherLabels,
    counter: StageCounter,
    device: torch.device,
    plan: CachePlan,
) -> Curvature:
    """The fit with its first pass's per-example rows kept: the EK-FAC eigenvalue pass is pure matrix math
    on them, and the training-loss rows become the fit's training-gradient index."""
    names = [layer.name for layer in layers]
    diagonal = options.strategy == "diagonal"
    dtype = model_dtype(model)
    fitting_cache: IndexRecorder | None
    training_cache: IndexRecorder | None
    # the recorders hold the real sizes to the whole budget (the plan's widths are lower bounds)
    budget = options.memory_budget_bytes
    num_rows = len(train)
    if plan.shared:
        fitting_cache = IndexRecorder(names, budget, num_rows)
        training_cache = None
    else:
        fitting_cache = IndexRecorder(names, budget, num_rows) if plan.fitting_bytes else None
        training_cache = IndexRecorder(names, budget - plan.fitting_bytes, num_rows) if plan.index_bytes else None
    matrix = {layer.name: (layer.out_features, layer.in_features) for layer in layers}
    if diagonal:
        sums = {n: torch.zeros(matrix[n], dtype=torch.float64, device=device) for n in names}
    else:  # float64 sums kept as upper triangles: half the memory of full ones, the same values
        covariances = PackedCovariances(layers, device)
    rows = {n: 0 for n in names}
    advance_after: list[int] = []  # per recorded fitting activity: examples completed with it (0 mid-batch)

    def visit(examples: int, fitting: list[Activities], training: Activities | None) -> None:
        advance_after.extend([0] * (len(fitting) - 1) + [examples])
        for activities in fitting:
            for name, activity in activities.items():
                if diagonal:
                    sums[name] += squared_gradient_sum(activity).to(torch.float64)
                    rows[name] += activity.batch_size
                else:
                    covariances.add(name, activity)
            if fitting_cache is not None:
                fitting_cache.add(activities)
        if training_cache is not None and training is not None:
            training_cache.add(training)

    stream_fitting_and_training_gradients(
        model, layers, train, loss, labels, options.batch_size, device, counter, visit, training_cache is not None
    )
    index_source = fitting_cache if plan.shared and plan.index_bytes else training_cache
    if diagonal:
        fit: Curvature = DiagonalCurvature(names, options, _to_cpu({n: sums[n] / max(rows[n], 1) for n in names}))
    else:
        bases = covariances.bases(factor_dtype(dtype))
        if options.strategy == "kfac":
            fit = KfacCurvature(names, options, bases)
        elif fitting_cache is not None and fitting_cache.active and plan.fitting_bytes:

            def advance(position: int) -> None:
                if advance_after[position]:
                    counter.advance(advance_after[position])

            eigenvalues = corrected_eigenvalues_from_activities(
                layers, fitting_cache.activity_batches(), bases, device, dtype, advance
            )
            fit = EkfacCurvature(names, options, bases, _to_cpu(eigenvalues))
        else:
            if fitting_cache is not None and fitting_cache is not index_source:
                fitting_cache.drop()
            eigenvalues = fit_corrected_eigenvalues(
                model, layers, train, loss, labels.for_eigenvalues(), bases, options.batch_size, device, counter
            )
            fit = EkfacCurvature(names, options, bases, _to_cpu(eigenvalues))
    if index_source is not None and index_source.active:  # after the eigenvalues: the index takes over the rows
        fit.training_index = index_source.index(len(train), examples_fingerprint(train), model_fingerprint(model), loss)
    if fitting_cache is not None:
        fitting_cache.drop()
    return fit


def _to_cpu(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor on the CPU, contiguous (as a reload gives)."""
    return {name: value.cpu().contiguous() for name, value in values.items()}
