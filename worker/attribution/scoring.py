"""Scoring: query vectors once per layer, the training set streamed in batches, a running top-k.

score(q, i) = <v_q, grad l(z_i)> summed over tracked layers, where v_q = P grad f(z_q) (influence,
DataInf) or the unit-norm query gradient (cosine similarity, then divided by ||grad l(z_i)||).
Per-example training gradients are never formed for rank-one layers (contraction g^T V a).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from worker.attribution.curvature.base import LayerVectors, Preconditioner
from worker.attribution.gradients import batches, measurement_activities, training_activities
from worker.attribution.hooks import Activities, ActivityRecorder, TrackedLayer, evaluation_mode
from worker.attribution.kept_activities import KeptActivities
from worker.attribution.losses import LossName, MeasurementName
from worker.attribution.progress import StageCounter
from worker.attribution.threads import batch_work, few_threads, token_rows
from worker.attribution.training_index import TrainingIndex
from worker.attribution.types import AttributionError, Examples, TopK, tensor_sum

DEFAULT_MEMORY_BUDGET_BYTES = 512 * 1024**2  # preconditioned query vectors held at once, over all models


@dataclass
class ModelScorer:
    """Everything needed to score with one model: its tracked layers and its preconditioner.

    ``preconditioner`` None gives gradient dot products; with ``normalize`` True, their cosine.
    """

    model: nn.Module
    layers: list[TrackedLayer]
    loss: LossName
    device: torch.device
    dtype: torch.dtype
    preconditioner: Preconditioner | None
    normalize: bool = False
    diagnostics: dict[str, Any] = field(default_factory=dict)
    # the training set's per-example (a, g) rows, when a fit recorded them for this very training set
    index: TrainingIndex | None = None
    # the training set's batch activities, kept from a pass over it (DataInf's first pass)
    cached: KeptActivities | None = None

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def vector_size(self) -> int:
        return sum(layer.num_parameters for layer in self.layers)

    def query_vectors(
        self, queries: Examples, measurement: MeasurementName, batch_size: int, counter: StageCounter, aggregate: bool
    ) -> LayerVectors:
        """Preconditioned measurement gradients (Q, d_out, d_in) per layer, or their sum (1, ...) if ``aggregate``."""
        parts: list[LayerVectors] = []
        with evaluation_mode(self.model), ActivityRecorder(self.layers) as recorder:
            for _, batch in batches(queries, batch_size, self.device, self.dtype):
                with few_threads(batch_work(self.layers, token_rows(batch), self.model)):
                    activities = measurement_activities(self.model, recorder, batch, self.loss, measurement)
                    gradients = {name: activities[name].per_example_gradients() for name in self.layer_names}
                if self.normalize:
                    gradients = _unit_norm(gradients)
                if aggregate:
                    gradients = {name: g.sum(0, keepdim=True) for name, g in gradients.items()}
                parts.append(gradients)
                if aggregate and len(parts) > 1:
                    parts = [{name: parts[0][name] + parts[1][name] for name in self.layer_names}]
                counter.advance(len(batch))
        vectors = {name: torch.cat([p[name] for p in parts]) for name in self.layer_names}
        if self.preconditioner is not None:
            rows = next(iter(vectors.values())).shape[0]
            work = rows * sum(t.in_features * t.out_features * (t.in_features + t.out_features) for t in self.layers)
            with few_threads(work):
                vectors = self.preconditioner.precondition(vectors)
        check_finite_vectors(vectors, "preconditioned query gradients")
        return vectors

    def train_scores(self, activities: Activities, vectors: LayerVectors) -> torch.Tensor:
        """(Q, B) scores of one training batch against the query vectors."""
        scores = tensor_sum(activities[name].contract(vectors[name]) for name in self.layer_names)
        if self.normalize:
            norms = tensor_sum(activities[name].squared_norms() for name in self.layer_names).sqrt()
            scores = scores / norms.clamp_min(torch.finfo(norms.dtype).tiny)
        return scores

    def self_scores(self, activities: Activities) -> torch.Tensor:
        if self.preconditioner is not None:
            return self.preconditioner.self_scores(activities)
        if self.normalize:
            raise AttributionError(
                "self mode is not defined for normalized gradient_similarity (it is 1 for every example)"
            )
        return tensor_sum(activities[name].squared_norms() for name in self.layer_names)


def _unit_norm(gradients: LayerVectors) -> LayerVectors:
    squared = tensor_sum(g.flatten(1).pow(2).sum(1) for g in gradients.values())
    norms = squared.sqrt().clamp_min(torch.finfo(squared.dtype).tiny)
    return {name: g / norms.reshape(-1, 1, 1) for name, g in gradients.items()}


def check_finite_vectors(vectors: LayerVectors, what: str) -> None:
    for name, v in vectors.items():
        with few_threads(v.numel()):  # memory-bound: threads only pay for large tensors
            finite = bool(torch.isfinite(v).all())
        if not finite:
            raise AttributionError(f"non-finite {what} (NaN or Inf) at layer {name!r}")


def check_finite_scores(scores: torch.Tensor) -> None:
    with few_threads(scores.numel()):
        finite = bool(torch.isfinite(scores).all())
    if not finite:
        raise AttributionError("non-finite scores (NaN or Inf): the model, data or damping give unstable values")


# ---------------------------------------------------------------- streaming the training set


def stream_training_batches(
    scorers: list[ModelScorer],
    train: Examples,
    batch_size: int,
    counter: StageCounter,
    visit: Callable[[int, list[Activities]], None],
) -> None:
    """One pass over ``train``: ``visit(start row, [activities per model])`` for every batch."""
    with ExitStack() as stack:
        recorders = []
        for scorer in scorers:
            stack.enter_context(evaluation_mode(scorer.model))
            recorders.append(stack.enter_context(ActivityRecorder(scorer.layers)))
        for start in range(0, len(train), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(train)))
            chunk = train.subset(rows)
            per_model = []
            with few_threads(sum(batch_work(s.layers, token_rows(chunk), s.model) for s in scorers) * 2):
                for scorer, recorder in zip(scorers, recorders, strict=True):
                    _, batch = next(batches(chunk, len(chunk), scorer.device, scorer.dtype))
                    per_model.append(training_activities(scorer.model, recorder, batch, scorer.loss))
            visit(start, per_model)
            counter.advance(len(rows))


def stream_training_activities(
    scorers: list[ModelScorer],
    train: Examples,
    batch_size: int,
    counter: StageCounter,
    visit: Callable[[int, list[Activities]], None],
    queries: int = 0,
) -> None:
    """``stream_training_batches``, or, when every scorer carries the batch activities of this very ``train``
    (``cached``), those; or, when every scorer carries a training-gradient index of ``train``,
    the same activities read from the indexes in large blocks (no model pass). ``queries``: how many query
    vectors ``visit`` contracts each block with (sizes the work for the thread policy only)."""
    kept = [s.cached for s in scorers if s.cached is not None and s.cached.matches(train, batch_size)]
    if kept and len(kept) == len(scorers):
        for parts in zip(*(cache.batches() for cache in kept), strict=True):
            visit(parts[0][0], [activities for _, activities in parts])
            counter.advance(next(iter(parts[0][1].values())).batch_size)
        return
    indexes = [
        scorer.index for scorer in scorers if scorer.index is not None and scorer.index.num_examples == len(train)
    ]
    if len(indexes) != len(scorers):
        stream_training_batches(scorers, train, batch_size, counter, visit)
        return
    rows = min(index.block_rows(batch_size) for index in indexes)
    iterators = [index.blocks(rows, s.device, s.dtype) for index, s in zip(indexes, scorers, strict=True)]
    for parts in zip(*iterators, strict=True):
        start = parts[0][0]
        block = parts[0][1][scorers[0].layer_names[0]].batch_size
        with few_threads(sum(batch_work(s.layers, block) + queries * block * s.vector_size for s in scorers)):
            visit(start, [activities for _, activities in parts])
        counter.advance(parts[0][1][scorers[0].layer_names[0]].batch_size)


def mean_over_models(values: list[torch.Tensor]) -> torch.Tensor:
    device = values[0].device
    total = values[0].to(torch.float32)
    for v in values[1:]:
        total = total + v.to(device, torch.float32)
    return total / len(values)


# ---------------------------------------------------------------- top-k


class TopKAccumulator:
    """Running top-k in both directions for each query, merged batch by batch."""

    def __init__(self, num_queries: int, k: int, device: torch.device):
        self.k = k
        self.best_scores = torch.empty(num_queries, 0, device=device)
        self.best_indices = torch.empty(num_queries, 0, dtype=torch.long, device=device)
        self.worst_scores = torch.empty(num_queries, 0, device=device)
        self.worst_indices = torch.empty(num_queries, 0, dtype=torch.long, device=device)

    def update(self, scores: torch.Tensor, start: int) -> None:
        """``scores`` (Q, B) for training rows start..start+B-1."""
        with few_threads(4 * (scores.numel() + self.best_scores.numel())):  # memory-bound merges
            indices = torch.arange(start, start + scores.shape[1], device=scores.device).expand_as(scores)
            self.best_scores, self.best_indices = self._merge(
                self.best_scores, self.best_indices, scores, indices, True
            )
            self.worst_scores, self.worst_indices = self._merge(
                self.worst_scores, self.worst_indices, scores, indices, False
            )

    def _merge(
        self, kept: torch.Tensor, kept_idx: torch.Tensor, new: torch.Tensor, new_idx: torch.Tensor, largest: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.cat([kept, new], dim=1)
        idx = torch.cat([kept_idx, new_idx], dim=1)
        k = min(self.k, values.shape[1])
        top_values, position = torch.topk(values, k, dim=1, largest=largest, sorted=True)
        return top_values, idx.gather(1, position)

    def result(self) -> TopK:
        return TopK(
            positive_indices=self.best_indices.cpu(),
            positive_scores=self.best_scores.cpu(),
            negative_indices=self.worst_indices.cpu(),
            negative_scores=self.worst_scores.cpu(),
        )


def query_chunk_size(scorers: list[ModelScorer], budget_bytes: int | None = None) -> int:
    """How many queries' preconditioned vectors fit the memory budget (over all models)."""
    budget_bytes = DEFAULT_MEMORY_BUDGET_BYTES if budget_bytes is None else budget_bytes
    bytes_per_query = sum(s.vector_size * torch.finfo(s.dtype).bits // 8 for s in scorers)
    return max(1, budget_bytes // max(bytes_per_query, 1))
