"""Sharded scoring: the training set split into contiguous ranges scored independently, then merged exactly.

A sharded job prepares once (the fitted curvature and the preconditioned query vectors), each shard scores its
training range against them, and the merge combines the shards' outputs:

- ``pairwise``: each shard keeps its local top-k per query in both directions. The global top-k of a query lies
  in the union of the shards' top-k (an example outside its own shard's top-k has k better examples in that
  shard alone), so the top-k of the union is the global top-k: the merge is exact.
- ``aggregate`` / ``self``: each shard holds the scores of its range; the merge places them side by side.

The merge is a pure function of the shards' outputs: running it twice gives the same result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from worker.attribution.curvature.base import LayerVectors
from worker.attribution.hooks import Activities
from worker.attribution.losses import MeasurementName
from worker.attribution.progress import StageCounter
from worker.attribution.scoring import (
    ModelScorer,
    TopKAccumulator,
    check_finite_scores,
    mean_over_models,
    query_chunk_size,
    stream_training_activities,
)
from worker.attribution.types import AttributionError, AttributionScores, Examples, Progress, TopK

ShardMode = Literal["pairwise", "aggregate", "self"]
VECTOR_KEY_SEPARATOR = "::"


@dataclass(frozen=True)
class ShardRange:
    """Training rows ``start`` (inclusive) to ``stop`` (exclusive) of the job's training set."""

    index: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def shard_ranges(num_examples: int, shard_examples: int) -> list[ShardRange]:
    """Contiguous ranges of at most ``shard_examples`` rows covering ``num_examples`` (the last may be shorter)."""
    if shard_examples <= 0:
        raise AttributionError("shard size must be positive")
    count = max(1, math.ceil(num_examples / shard_examples))
    return [ShardRange(i, i * shard_examples, min((i + 1) * shard_examples, num_examples)) for i in range(count)]


@dataclass
class ShardOutput:
    """What one shard computed: its local top-k per query (global training indices), or its range's scores."""

    mode: ShardMode
    start: int
    stop: int
    topk: TopK | None = None
    scores: torch.Tensor | None = None

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"range": torch.tensor([self.start, self.stop], dtype=torch.long)}
        if self.topk is not None:
            tensors.update(
                positive_indices=self.topk.positive_indices,
                positive_scores=self.topk.positive_scores,
                negative_indices=self.topk.negative_indices,
                negative_scores=self.topk.negative_scores,
            )
        if self.scores is not None:
            tensors["scores"] = self.scores
        return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}

    @classmethod
    def from_tensors(cls, mode: ShardMode, tensors: dict[str, torch.Tensor]) -> ShardOutput:
        start, stop = (int(v) for v in tensors["range"].tolist())
        topk = None
        if mode == "pairwise":
            topk = TopK(
                positive_indices=tensors["positive_indices"],
                positive_scores=tensors["positive_scores"],
                negative_indices=tensors["negative_indices"],
                negative_scores=tensors["negative_scores"],
            )
        return cls(mode, start, stop, topk=topk, scores=tensors.get("scores"))


# ---------------------------------------------------------------- prepare: query vectors, once per job


def prepare_query_vectors(
    scorers: list[ModelScorer],
    queries: Examples,
    mode: ShardMode,
    measurement: MeasurementName,
    batch_size: int,
    progress: Progress,
) -> list[LayerVectors]:
    """The preconditioned query gradients per model (summed over queries in ``aggregate`` mode)."""
    if mode == "self":
        return [{} for _ in scorers]
    counter = StageCounter(progress, "queries", len(queries) * len(scorers)).start()
    return [s.query_vectors(queries, measurement, batch_size, counter, aggregate=mode == "aggregate") for s in scorers]


def vectors_to_tensors(vectors: list[LayerVectors]) -> dict[str, torch.Tensor]:
    return {
        f"{position}{VECTOR_KEY_SEPARATOR}{name}": tensor.detach().cpu().contiguous()
        for position, per_layer in enumerate(vectors)
        for name, tensor in per_layer.items()
    }


def vectors_from_tensors(tensors: dict[str, torch.Tensor], num_models: int) -> list[LayerVectors]:
    vectors: list[LayerVectors] = [{} for _ in range(num_models)]
    for key, tensor in tensors.items():
        position, name = key.split(VECTOR_KEY_SEPARATOR, 1)
        vectors[int(position)][name] = tensor
    return vectors


# ---------------------------------------------------------------- one shard


def score_shard(
    scorers: list[ModelScorer],
    train: Examples,
    shard: ShardRange,
    mode: ShardMode,
    vectors: list[LayerVectors],
    top_k: int,
    batch_size: int,
    progress: Progress,
) -> ShardOutput:
    """Score training rows ``shard.start:shard.stop`` (progress stage "score", in examples of this shard)."""
    rows = train.subset(torch.arange(shard.start, shard.stop))
    if mode != "pairwise":
        scores = torch.empty(shard.size, dtype=torch.float32)
        counter = StageCounter(progress, "score", shard.size).start()

        def visit_ranked(start: int, per_model: list[Activities]) -> None:
            if mode == "self":
                values = mean_over_models([s.self_scores(a) for s, a in zip(scorers, per_model, strict=True)])
            else:
                values = mean_over_models(
                    [s.train_scores(a, v) for s, a, v in zip(scorers, per_model, vectors, strict=True)]
                )[0]
            check_finite_scores(values)
            scores[start : start + values.shape[0]] = values.cpu()

        stream_training_activities(scorers, rows, batch_size, counter, visit_ranked, queries=int(mode != "self"))
        return ShardOutput(mode, shard.start, shard.stop, scores=scores)
    num_queries = next(iter(vectors[0].values())).shape[0]
    chunk = query_chunk_size(scorers)
    counter = StageCounter(progress, "score", shard.size * math.ceil(num_queries / chunk)).start()
    parts: list[TopK] = []
    for first in range(0, num_queries, chunk):
        last = min(first + chunk, num_queries)
        chunk_vectors = [{name: v[first:last] for name, v in per_layer.items()} for per_layer in vectors]
        parts.append(_pairwise_top_k(scorers, rows, shard.start, chunk_vectors, top_k, batch_size, counter))
    return ShardOutput(mode, shard.start, shard.stop, topk=_concatenate_queries(parts))


def _pairwise_top_k(
    scorers: list[ModelScorer],
    rows: Examples,
    offset: int,
    vectors: list[LayerVectors],
    top_k: int,
    batch_size: int,
    counter: StageCounter,
) -> TopK:
    """One pass over ``rows`` (training rows ``offset``...) for one chunk of queries: their local top-k."""
    num_queries = next(iter(vectors[0].values())).shape[0]
    accumulator = TopKAccumulator(num_queries, top_k, scorers[0].device)

    def visit(start: int, per_model: list[Activities]) -> None:
        values = mean_over_models([s.train_scores(a, v) for s, a, v in zip(scorers, per_model, vectors, strict=True)])
        check_finite_scores(values)
        accumulator.update(values, offset + start)

    stream_training_activities(scorers, rows, batch_size, counter, visit, queries=num_queries)
    return accumulator.result()


def _concatenate_queries(parts: list[TopK]) -> TopK:
    return TopK(
        positive_indices=torch.cat([p.positive_indices for p in parts]),
        positive_scores=torch.cat([p.positive_scores for p in parts]).float(),
        negative_indices=torch.cat([p.negative_indices for p in parts]),
        negative_scores=torch.cat([p.negative_scores for p in parts]).float(),
    )


# ---------------------------------------------------------------- the merge


def merge_shards(outputs: Sequence[ShardOutput], mode: ShardMode, top_k: int, num_train: int) -> AttributionScores:
    """The job's result from every shard's output (exact; a pure function, so merging twice changes nothing)."""
    ordered = sorted(outputs, key=lambda output: output.start)
    covered = [(o.start, o.stop) for o in ordered]
    expected = list(zip([0, *[stop for _, stop in covered[:-1]]], [stop for _, stop in covered], strict=True))
    if not ordered or covered != expected or covered[-1][1] != num_train:
        raise AttributionError(f"the shards' ranges {covered} do not cover the {num_train} training examples")
    if mode != "pairwise":
        parts = [o.scores for o in ordered]
        assert all(part is not None for part in parts)
        return AttributionScores(mode=mode, scores=torch.cat([p for p in parts if p is not None]).float())
    tops = [o.topk for o in ordered if o.topk is not None]
    assert len(tops) == len(ordered)
    positive = _top(
        torch.cat([t.positive_scores for t in tops], 1),
        torch.cat([t.positive_indices for t in tops], 1),
        top_k,
        largest=True,
    )
    negative = _top(
        torch.cat([t.negative_scores for t in tops], 1),
        torch.cat([t.negative_indices for t in tops], 1),
        top_k,
        largest=False,
    )
    topk = TopK(
        positive_indices=positive[1],
        positive_scores=positive[0],
        negative_indices=negative[1],
        negative_scores=negative[0],
    )
    return AttributionScores(mode="pairwise", topk=topk)


def _top(scores: torch.Tensor, indices: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best candidates per row, ties broken by the lower training index (the same whatever the order in
    which the shards' candidates arrive)."""
    by_index = torch.argsort(indices, dim=1, stable=True)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    order = torch.argsort(scores, dim=1, descending=largest, stable=True)[:, : min(k, scores.shape[1])]
    return scores.gather(1, order).float(), indices.gather(1, order)


def shard_diagnostics(shards: Sequence[ShardRange]) -> dict[str, Any]:
    return {"shards": len(shards), "shard_examples": max((s.size for s in shards), default=0)}
