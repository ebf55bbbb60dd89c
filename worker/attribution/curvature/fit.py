"""Fitting a curvature approximation on the training data."""

from __future__ import annotations

import torch
from torch import nn

from worker.attribution.curvature.base import Curvature
from worker.attribution.curvature.diagonal import DiagonalCurvature
from worker.attribution.curvature.ekfac import EkfacCurvature
from worker.attribution.curvature.identity import IdentityCurvature
from worker.attribution.curvature.kfac import KfacCurvature
from worker.attribution.gradients import FisherLabels, place_model
from worker.attribution.hooks import TrackedLayer, resolve_layers
from worker.attribution.losses import LossName, check_examples, check_loss_name
from worker.attribution.options import FitOptions
from worker.attribution.progress import StageCounter
from worker.attribution.statistics import eigenbasis, fit_corrected_eigenvalues, fit_covariances, fit_diagonal
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
    if options.strategy == "diagonal":
        diagonals = fit_diagonal(model, layers, train, loss, labels, batch, device, counter)
        return DiagonalCurvature(names, options, _to_cpu(diagonals))
    covariances = fit_covariances(model, layers, train, loss, labels, batch, device, counter)
    bases = {name: eigenbasis(c) for name, c in covariances.items()}
    if options.strategy == "kfac":
        return KfacCurvature(names, options, _to_cpu(covariances), _to_cpu(bases))
    eigenvalues = fit_corrected_eigenvalues(model, layers, train, loss, labels, bases, batch, device, counter)
    return EkfacCurvature(names, options, _to_cpu(covariances), _to_cpu(bases), _to_cpu(eigenvalues))


def _to_cpu(values: dict) -> dict:  # type: ignore[type-arg]
    """Moves every tensor (also inside the factor dataclasses) to the CPU, contiguous (as a reload gives)."""
    moved = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            moved[name] = value.cpu().contiguous()
        else:
            moved[name] = type(value)(**{k: v.cpu().contiguous() for k, v in vars(value).items()})
    return moved
