"""Sharded fits are exact: the shards' float64 sums reduced (in any order) give the unsharded fit — K-FAC, EK-FAC
(its eigenvalue phase in the reduced eigenbasis) and the diagonal, true and empirical Fisher, several draws, shard
sizes that divide the training set, leave an uneven last shard, or exceed it.

Tolerance: the stored statistics agree to 1e-9 relative (only the order of float64 additions differs; the float32
model of the last case agrees to 1e-6), the preconditioned vectors to 1e-7."""

from __future__ import annotations

import random

import pytest
import torch

from tests.engine.helpers import make_data, make_mlp
from worker.attribution import fit_curvature
from worker.attribution.curvature.base import Curvature
from worker.attribution.fit_shards import (
    FitPhase,
    bases_from_sums,
    curvature_from_sums,
    first_phase,
    fit_shard_ranges,
    fit_shard_sums,
    reduce_sums,
    sums_from_tensors,
    sums_to_tensors,
)
from worker.attribution.options import FisherKind, FitOptions, FitStrategy
from worker.attribution.statistics import Eigenbasis, LayerSums
from worker.attribution.types import AttributionError, Examples

N_TRAIN, BATCH = 45, 8
LAYER_SHAPES = {"0": (7, 6), "2": (3, 8)}  # make_mlp(): Linear(5, 7), Tanh, Linear(7, 3)


def sharded_fit(model: torch.nn.Module, train: Examples, options: FitOptions, shard_examples: int) -> Curvature:
    """The fit as the job runs it: each phase's shards (in a shuffled order, through safetensors tensors), reduced."""
    ranges = fit_shard_ranges(len(train), shard_examples, options.batch_size)
    order = random.Random(shard_examples).sample(ranges, len(ranges))

    def phase(name: FitPhase, bases: dict[str, Eigenbasis] | None = None) -> dict[str, LayerSums]:
        parts = [
            sums_from_tensors(
                sums_to_tensors(
                    fit_shard_sums(model, train, "cross_entropy", options, s, name, bases),
                    "model::",
                ),
                "model::",
            )
            for s in order
        ]
        return reduce_sums(parts)

    first = phase(first_phase(options.strategy))
    eigenvalues = phase("eigenvalues", bases_from_sums(first)) if options.strategy == "ekfac" else None
    return curvature_from_sums(options, first, eigenvalues)


def assert_same_fit(
    sharded: Curvature, reference: Curvature, rtol: float, p_rtol: float = 1e-7, scale_atol: float = 0.0
) -> None:
    """Equal statistics (to ``rtol``, and to ``scale_atol`` x each tensor's largest entry) and preconditioners."""
    ours, theirs = sharded.to_tensors(), reference.to_tensors()
    # eigenvectors: compared through P below; the training index: a sharded fit keeps none
    statistics = {k for k in theirs if "eigenvectors" not in k and "index_" not in k}
    assert statistics <= set(ours)
    for key in statistics:
        atol = max(1e-12, scale_atol * float(theirs[key].abs().max()))
        torch.testing.assert_close(ours[key].double(), theirs[key].double(), rtol=rtol, atol=atol, msg=key)
    generator = torch.Generator().manual_seed(0)
    p = sharded.preconditioner(None, dtype=torch.float64)
    q = reference.preconditioner(None, dtype=torch.float64)
    vectors = {
        name: torch.randn((3, d_out, d_in), generator=generator, dtype=torch.float64)
        for name, (d_out, d_in) in LAYER_SHAPES.items()  # weight-matrix layout, bias as the last column
    }
    ours_p, theirs_p = p.precondition(vectors), q.precondition(vectors)
    for name in LAYER_SHAPES:
        torch.testing.assert_close(ours_p[name], theirs_p[name], rtol=max(rtol, p_rtol), atol=1e-9)


@pytest.mark.parametrize(
    ("strategy", "fisher", "samples", "shard_examples"),
    [
        ("kfac", "true", 1, 16),
        ("kfac", "empirical", 1, 8),
        ("ekfac", "true", 2, 10),  # rounded up to 16: 16, 16, 13
        ("ekfac", "empirical", 1, 24),
        ("ekfac", "true", 1, 100),  # one shard
        ("diagonal", "true", 3, 8),
        ("diagonal", "empirical", 1, 17),
    ],
)
def test_sharded_fit_equals_the_unsharded_fit(
    strategy: FitStrategy, fisher: FisherKind, samples: int, shard_examples: int
) -> None:
    model = make_mlp()
    train = make_data(N_TRAIN, (5,), 3, seed=1)
    options = FitOptions(strategy=strategy, fisher=fisher, fisher_samples=samples, batch_size=BATCH, seed=4)
    reference = fit_curvature(model, train, "cross_entropy", options)
    assert_same_fit(sharded_fit(model, train, options, shard_examples), reference, rtol=1e-9)


def test_float32_model_and_the_uncached_reference_agree() -> None:
    model = make_mlp().float()
    train = make_data(N_TRAIN, (5,), 3, seed=1, dtype=torch.float32)
    options = FitOptions(strategy="ekfac", fisher="empirical", batch_size=BATCH, memory_budget_bytes=0)
    reference = fit_curvature(model, train, "cross_entropy", options)
    sharded = sharded_fit(model, train, options, 16)
    # a float32 model's fit eigendecomposes and keeps its factor matrices in float32 (sums: float64, as the shards')
    assert reference.to_tensors()["0::activation_eigenvectors"].dtype == torch.float32
    assert sharded.to_tensors()["0::activation_eigenvectors"].dtype == torch.float32
    assert_same_fit(sharded, reference, rtol=1e-6, p_rtol=1e-5, scale_atol=1e-7)


def test_shards_start_at_batch_boundaries() -> None:
    assert [(r.start, r.stop) for r in fit_shard_ranges(45, 10, 8)] == [(0, 16), (16, 32), (32, 45)]
    assert [(r.start, r.stop) for r in fit_shard_ranges(45, 100, 8)] == [(0, 45)]
    with pytest.raises(AttributionError):
        first_phase("identity")
