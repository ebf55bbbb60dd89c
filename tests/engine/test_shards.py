"""Sharded scoring is exact: the shards' outputs merged equal one unsharded pass, for every factor strategy and
mode, for shard sizes that divide the training set, leave an uneven last shard, or exceed it; the merge is a pure
function (twice, or in another order, gives the same)."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from tests.engine.helpers import make_data, make_mlp
from worker.attribution import attribute, fit_curvature
from worker.attribution.attribute import build_scorers
from worker.attribution.gradients import place_model
from worker.attribution.options import FitOptions, FitStrategy, InfluenceOptions
from worker.attribution.shards import (
    ShardMode,
    ShardOutput,
    merge_shards,
    prepare_query_vectors,
    score_shard,
    shard_ranges,
    vectors_from_tensors,
    vectors_to_tensors,
)
from worker.attribution.types import AttributionError, AttributionScores, no_progress

N_TRAIN, N_QUERY, TOP_K, BATCH = 53, 6, 5, 7
STRATEGIES: tuple[FitStrategy, ...] = get_args(FitStrategy)
MODES: tuple[ShardMode, ...] = get_args(ShardMode)


def run_both(
    strategy: FitStrategy, mode: ShardMode, shard_examples: int
) -> tuple[AttributionScores, list[ShardOutput]]:
    """The unsharded result and the shards' outputs (each written to tensors and read back, as from a blob)."""
    model = make_mlp()
    train, queries = make_data(N_TRAIN, (5,), 3, seed=1), make_data(N_QUERY, (5,), 3, seed=2)
    fit = fit_curvature(model, train, "cross_entropy", FitOptions(strategy=strategy, batch_size=16))
    options = InfluenceOptions(strategy=strategy, batch_size=BATCH)
    scorers = build_scorers(
        [place_model(model, None)], train, "cross_entropy", "influence", options, [fit], no_progress
    )
    vectors = prepare_query_vectors(scorers, queries, mode, "loss", BATCH, no_progress)
    vectors = vectors_from_tensors(vectors_to_tensors(vectors), 1)
    outputs = []
    for shard in shard_ranges(N_TRAIN, shard_examples):
        output = score_shard(scorers, train, shard, mode, vectors, TOP_K, BATCH, no_progress)
        outputs.append(ShardOutput.from_tensors(mode, output.to_tensors()))
    reference = attribute(
        [model],
        train,
        None if mode == "self" else queries,
        loss="cross_entropy",
        method="influence",
        mode=mode,
        top_k=TOP_K,
        options=options,
        fits=[fit],
    )
    return reference, outputs


def assert_same(merged: AttributionScores, reference: AttributionScores) -> None:
    assert merged.mode == reference.mode
    if reference.mode != "pairwise":
        assert merged.scores is not None and reference.scores is not None
        torch.testing.assert_close(merged.scores, reference.scores.float(), rtol=1e-5, atol=1e-6)
        return
    assert merged.topk is not None and reference.topk is not None
    assert torch.equal(merged.topk.positive_indices, reference.topk.positive_indices)
    assert torch.equal(merged.topk.negative_indices, reference.topk.negative_indices)
    torch.testing.assert_close(merged.topk.positive_scores, reference.topk.positive_scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged.topk.negative_scores, reference.topk.negative_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shard_examples", [1, 10, 20, 53, 100])
def test_merged_shards_equal_one_unsharded_pass(strategy: FitStrategy, mode: ShardMode, shard_examples: int) -> None:
    reference, outputs = run_both(strategy, mode, shard_examples)
    assert len(outputs) == -(-N_TRAIN // shard_examples)
    assert_same(merge_shards(outputs, mode, TOP_K, N_TRAIN), reference)


@pytest.mark.parametrize("mode", MODES)
def test_the_merge_is_idempotent_and_ignores_the_order_of_the_shards(mode: ShardMode) -> None:
    reference, outputs = run_both("ekfac", mode, 10)
    first = merge_shards(outputs, mode, TOP_K, N_TRAIN)
    again = merge_shards(list(reversed(outputs)), mode, TOP_K, N_TRAIN)
    assert_same(first, reference)
    assert_same(again, first)
    if mode == "pairwise":
        assert first.topk is not None and again.topk is not None
        assert torch.equal(first.topk.positive_scores, again.topk.positive_scores)


def test_shard_ranges_cover_the_training_set_with_an_uneven_last_shard() -> None:
    ranges = shard_ranges(53, 20)
    assert [(r.start, r.stop) for r in ranges] == [(0, 20), (20, 40), (40, 53)]
    assert [(r.start, r.stop) for r in shard_ranges(5, 100)] == [(0, 5)]
    with pytest.raises(AttributionError):
        shard_ranges(5, 0)


def test_a_merge_missing_a_shard_fails() -> None:
    _, outputs = run_both("diagonal", "aggregate", 20)
    with pytest.raises(AttributionError, match="do not cover"):
        merge_shards(outputs[:-1], "aggregate", TOP_K, N_TRAIN)
    with pytest.raises(AttributionError, match="do not cover"):
        merge_shards([outputs[0], outputs[2]], "aggregate", TOP_K, N_TRAIN)
