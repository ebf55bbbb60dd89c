"""Scoring with several models of one trajectory (checkpoints): each model has its own query vectors and the
score of a training example is the sum over models of <vector_m, grad l(z_i; theta_m)>.

Used by SOURCE (vectors u_s / C_s for the checkpoints of segment s) and TracInCP (eta_c grad f(z_q; theta_c)).
Pairwise mode keeps a running top-k (queries in chunks that fit the memory budget), never an N x Q matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from worker.attribution.curvature.base import LayerVectors
from worker.attribution.hooks import Activities
from worker.attribution.progress import StageCounter
from worker.attribution.scoring import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    ModelScorer,
    TopKAccumulator,
    check_finite_scores,
    stream_training_batches,
)
from worker.attribution.types import Examples, Progress, TopK

# vectors_for(query chunk, aggregate) -> one LayerVectors per scorer, (Q or 1, d_out, d_in) per layer
QueryVectors = Callable[[Examples, bool], list[LayerVectors]]
SelfScores = Callable[[list[Activities]], torch.Tensor]


def summed_train_scores(
    scorers: list[ModelScorer], per_model: list[Activities], vectors: list[LayerVectors]
) -> torch.Tensor:
    """(Q, B): sum over models of <vectors_m, grad l(z_b; theta_m)>."""
    total: torch.Tensor | None = None
    for scorer, activities, v in zip(scorers, per_model, vectors, strict=True):
        if not v:
            continue
        part = scorer.train_scores(activities, v).to(torch.float64)
        total = part if total is None else total + part.to(total.device)
    assert total is not None, "no model carries query vectors"
    return total


def aggregate_scores(
    scorers: list[ModelScorer],
    train: Examples,
    queries: Examples,
    vectors_for: QueryVectors,
    batch_size: int,
    progress: Progress,
) -> torch.Tensor:
    vectors = vectors_for(queries, True)
    scores = torch.empty(len(train), dtype=torch.float32)
    counter = StageCounter(progress, "score", len(train)).start()

    def visit(start: int, per_model: list[Activities]) -> None:
        values = summed_train_scores(scorers, per_model, vectors)[0]
        check_finite_scores(values)
        scores[start : start + values.shape[0]] = values.float().cpu()

    stream_training_batches(scorers, train, batch_size, counter, visit)
    return scores


def pairwise_top_k(
    scorers: list[ModelScorer],
    train: Examples,
    queries: Examples,
    vectors_for: QueryVectors,
    top_k: int,
    batch_size: int,
    progress: Progress,
    vector_sets: int,
) -> tuple[TopK, int]:
    """Top-k each way per query; ``vector_sets`` = how many distinct query vectors each query needs."""
    chunk = query_chunk_size(scorers[0], vector_sets)
    num_chunks = math.ceil(len(queries) / chunk)
    counter = StageCounter(progress, "score", len(train) * num_chunks).start()
    parts: list[TopK] = []
    for first in range(0, len(queries), chunk):
        rows = torch.arange(first, min(first + chunk, len(queries)))
        vectors = vectors_for(queries.subset(rows), False)
        parts.append(_chunk_top_k(scorers, train, vectors, len(rows), top_k, batch_size, counter))
    return concatenate_top_k(parts), num_chunks


def _chunk_top_k(
    scorers: list[ModelScorer],
    train: Examples,
    vectors: list[LayerVectors],
    num_queries: int,
    top_k: int,
    batch_size: int,
    counter: StageCounter,
) -> TopK:
    """Top-k each way for one chunk of queries, over one pass of the training set."""
    accumulator = TopKAccumulator(num_queries, top_k, scorers[0].device)

    def visit(start: int, per_model: list[Activities]) -> None:
        values = summed_train_scores(scorers, per_model, vectors)
        check_finite_scores(values)
        accumulator.update(values.float(), start)

    stream_training_batches(scorers, train, batch_size, counter, visit)
    return accumulator.result()


def self_scores(
    scorers: list[ModelScorer], train: Examples, batch_size: int, progress: Progress, score_batch: SelfScores
) -> torch.Tensor:
    scores = torch.empty(len(train), dtype=torch.float32)
    counter = StageCounter(progress, "score", len(train)).start()

    def visit(start: int, per_model: list[Activities]) -> None:
        values = score_batch(per_model)
        check_finite_scores(values)
        scores[start : start + values.shape[0]] = values.float().cpu()

    stream_training_batches(scorers, train, batch_size, counter, visit)
    return scores


def query_chunk_size(scorer: ModelScorer, vector_sets: int, budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES) -> int:
    bytes_per_query = scorer.vector_size * torch.finfo(scorer.dtype).bits // 8 * max(vector_sets, 1)
    return max(1, budget_bytes // max(bytes_per_query, 1))


def concatenate_top_k(parts: list[TopK]) -> TopK:
    return TopK(
        positive_indices=torch.cat([p.positive_indices for p in parts]),
        positive_scores=torch.cat([p.positive_scores for p in parts]).float(),
        negative_indices=torch.cat([p.negative_indices for p in parts]),
        negative_scores=torch.cat([p.negative_scores for p in parts]).float(),
    )
