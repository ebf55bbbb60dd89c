"""Sharded fits: the statistics of a curvature fit summed over ranges of the training set, then reduced exactly.

Every statistic a factor fit estimates is a mean over training rows of a per-batch sum, so a fit splits into
shards whose *sums* (and row / position counts) add up to those of the whole pass; the reduction is
the sum of the shards' sums over the sum of their counts (`add_sums`), whatever order the shards finish in:

- ``diagonal``: one phase, sum G * G;
- ``kfac``: one phase, the covariance sums (sum a a^T, sum g g^T), eigendecomposed after the reduction;
- ``ekfac``: the same first phase, then — once the eigenbasis of the reduced covariances is known — a second
  phase summing (Q_S^T G Q_A)^2 in that basis (the corrected eigenvalues).

Shards start at multiples of the fit's batch size (`fit_shard_ranges`), so a shard's batches are the whole
pass's batches, and the labels a true-Fisher fit draws for a batch depend only on the seed and the batch's first
row (`FisherLabels.generator`): a shard draws exactly the labels the unsharded pass draws. The only difference
from the unsharded fit is the order of float64 additions.

A sharded fit keeps no training-gradient index (its rows would be the whole training set's); scoring
recomputes the training gradients instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from worker.attribution.curvature.base import Curvature
from worker.attribution.curvature.diagonal import DiagonalCurvature
from worker.attribution.curvature.ekfac import EkfacCurvature
from worker.attribution.curvature.kfac import KfacCurvature
from worker.attribution.gradients import FisherLabels, place_model
from worker.attribution.hooks import resolve_layers
from worker.attribution.losses import LossName, check_examples, check_loss_name
from worker.attribution.options import FitOptions
from worker.attribution.progress import StageCounter
from worker.attribution.shards import ShardRange
from worker.attribution.statistics import (
    Eigenbasis,
    LayerSums,
    add_sums,
    covariances_from_sums,
    eigenbasis,
    fitting_sums,
    means_from_sums,
    stored_bases,
)
from worker.attribution.types import AttributionError, Examples, Progress, no_progress

FitPhase = Literal["covariances", "diagonal", "eigenvalues"]
SHARDED_FIT_STRATEGIES = ("diagonal", "kfac", "ekfac")
SEPARATOR = "::"


def fit_shard_ranges(num_examples: int, shard_examples: int, batch_size: int) -> list[ShardRange]:
    """Contiguous ranges of about ``shard_examples`` rows, each starting at a multiple of ``batch_size`` (the
    shard size is rounded up to one): a shard's batches are those of the unsharded pass."""
    if shard_examples <= 0 or batch_size <= 0:
        raise AttributionError("shard size and batch size must be positive")
    size = math.ceil(shard_examples / batch_size) * batch_size
    count = max(1, math.ceil(num_examples / size))
    return [ShardRange(i, i * size, min((i + 1) * size, num_examples)) for i in range(count)]


def first_phase(strategy: str) -> FitPhase:
    if strategy not in SHARDED_FIT_STRATEGIES:
        raise AttributionError(f"strategy {strategy!r} has no sharded fit")
    return "diagonal" if strategy == "diagonal" else "covariances"


def fit_shard_sums(
    model: nn.Module,
    train: Examples,
    loss: LossName,
    options: FitOptions,
    shard: ShardRange,
    phase: FitPhase,
    bases: dict[str, Eigenbasis] | None = None,
    progress: Progress = no_progress,
    device: torch.device | None = None,
) -> dict[str, LayerSums]:
    """One phase's sums over training rows ``shard.start:shard.stop`` (progress stage "fit", in examples)."""
    options.validate()
    check_loss_name(loss)
    check_examples(train, "training")
    if shard.start % options.batch_size:
        raise AttributionError(f"a fit shard must start at a multiple of the batch size, not at {shard.start}")
    placed, target = place_model(model, device)
    layers = resolve_layers(placed, options.layers)
    labels = FisherLabels(options.fisher, options.fisher_samples, options.seed)
    if phase == "eigenvalues":
        labels = labels.for_eigenvalues()
    rows = train.subset(torch.arange(shard.start, shard.stop))
    counter = StageCounter(progress, "fit", shard.size).start()
    sums = fitting_sums(
        phase, placed, layers, rows, loss, labels, options.batch_size, target, counter, bases, shard.start
    )
    return {
        name: LayerSums({k: v.cpu() for k, v in s.sums.items()}, s.positions, s.rows, s.dtype)
        for name, s in sums.items()
    }


def reduce_sums(parts: Sequence[dict[str, LayerSums]]) -> dict[str, LayerSums]:
    """The sums over the whole training set from every shard's (exact up to rounding)."""
    if not parts:
        raise AttributionError("no shard sums to reduce")
    return add_sums(parts)


def bases_from_sums(covariance_sums: dict[str, LayerSums]) -> dict[str, Eigenbasis]:
    """The eigenbasis of the reduced covariances (what the EK-FAC second phase sums in)."""
    covariances = covariances_from_sums(covariance_sums)
    return {name: eigenbasis(c, covariance_sums[name].dtype) for name, c in covariances.items()}


def curvature_from_sums(
    options: FitOptions,
    first: dict[str, LayerSums],
    eigenvalues: dict[str, LayerSums] | None = None,
) -> Curvature:
    """The fitted curvature from the reduced sums of its phases."""
    names = list(first)
    if options.strategy == "diagonal":
        return DiagonalCurvature(names, options, _cpu(means_from_sums(first, "diagonal")))
    bases = stored_bases(covariances_from_sums(first), first[names[0]].dtype)
    if options.strategy == "kfac":
        return KfacCurvature(names, options, bases)
    if eigenvalues is None:
        raise AttributionError("an EK-FAC fit needs its eigenvalue sums")
    return EkfacCurvature(names, options, bases, _cpu(means_from_sums(eigenvalues, "eigenvalues")))


def _cpu(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.cpu().contiguous() for name, value in values.items()}


# ---------------------------------------------------------------- as safetensors (a shard's output blob)


def sums_to_tensors(sums: dict[str, LayerSums], prefix: str = "") -> dict[str, torch.Tensor]:
    """``{prefix}{layer}::{statistic}`` -> sum, ``...::positions`` / ``...::rows`` -> int64 counts,
    ``...::factor_dtype`` -> an empty scalar of the dtype the fitted factors are kept in."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in sums.items():
        for stat, value in layer.sums.items():
            tensors[f"{prefix}{name}{SEPARATOR}sum{SEPARATOR}{stat}"] = value.detach().cpu().contiguous()
        tensors[f"{prefix}{name}{SEPARATOR}positions"] = torch.tensor(layer.positions, dtype=torch.int64)
        tensors[f"{prefix}{name}{SEPARATOR}rows"] = torch.tensor(layer.rows, dtype=torch.int64)
        tensors[f"{prefix}{name}{SEPARATOR}factor_dtype"] = torch.zeros((), dtype=layer.dtype)  # its dtype says
    return tensors


def sums_from_tensors(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, LayerSums]:
    sums: dict[str, LayerSums] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        name, rest = key[len(prefix) :].split(SEPARATOR, 1)
        layer = sums.setdefault(name, LayerSums({}, 0, 0))
        if rest == "positions":
            layer.positions = int(value)
        elif rest == "rows":
            layer.rows = int(value)
        elif rest == "factor_dtype":
            layer.dtype = value.dtype
        else:
            layer.sums[rest.split(SEPARATOR, 1)[1]] = value
    return sums
