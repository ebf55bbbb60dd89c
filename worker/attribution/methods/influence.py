"""Influence functions: score(q, i) = grad f(z_q)^T P grad l(z_i) with P from a curvature strategy."""

from __future__ import annotations

import torch
from torch import nn

from worker.attribution.curvature.base import Curvature, Preconditioner
from worker.attribution.curvature.exact import exact_preconditioner
from worker.attribution.curvature.fit import fit_layers
from worker.attribution.hooks import TrackedLayer, resolve_layers
from worker.attribution.losses import LossName
from worker.attribution.options import FIT_STRATEGIES, InfluenceOptions
from worker.attribution.progress import StageCounter
from worker.attribution.types import AttributionError, Examples, Progress


def influence_layers(model: nn.Module, options: InfluenceOptions, fit: Curvature | None) -> list[TrackedLayer]:
    """The tracked layers: the fit's layers unless ``options.layers`` names others (then they must agree)."""
    if fit is None:
        return resolve_layers(model, options.layers)
    if fit.strategy != options.strategy:
        raise AttributionError(f"the fit's strategy {fit.strategy!r} differs from the requested {options.strategy!r}")
    layers = resolve_layers(model, fit.layer_names if options.layers is None else options.layers)
    if [layer.name for layer in layers] != list(fit.layer_names):
        raise AttributionError(f"the fit tracks layers {fit.layer_names}, the request asks for {options.layers}")
    return layers


def influence_preconditioner(
    model: nn.Module,
    layers: list[TrackedLayer],
    train: Examples,
    loss: LossName,
    options: InfluenceOptions,
    fit: Curvature | None,
    fit_counter: StageCounter,
    device: torch.device,
    dtype: torch.dtype,
    progress: Progress,
) -> Preconditioner:
    """P for one model: from ``fit`` (or fitted here) for the factor strategies, else an exact solver."""
    if options.strategy in FIT_STRATEGIES:
        if fit is None:
            fit = fit_layers(model, layers, train, loss, options.fit_options(), fit_counter, device)
        return fit.preconditioner(options.damping, device, dtype)
    if fit is not None:
        raise AttributionError(f"strategy {options.strategy!r} does not use a precomputed fit")
    return exact_preconditioner(
        model,
        layers,
        train,
        loss,
        solver=options.strategy,
        kind=options.curvature,
        damping=options.damping,
        max_iter=options.max_iter,
        tol=options.tol,
        batch_size=options.batch_size,
        device=device,
        seed=options.seed,
        progress=progress,
    )
