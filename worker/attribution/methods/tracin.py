"""TracInCP: score(q, i) = sum over checkpoints c of eta_c < grad f(z_q; theta_c), grad l(z_i; theta_c) >.

eta_c is the checkpoint's learning rate as uploaded (not divided by 1 - momentum). Positive = z_i helps z_q.
``self`` mode: sum_c eta_c ||grad l(z_i; theta_c)||^2. The caller passes the checkpoints of the chosen stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from worker.attribution.curvature.base import LayerVectors
from worker.attribution.gradients import model_dtype, place_model
from worker.attribution.hooks import Activities, resolve_layers
from worker.attribution.losses import LossName, MeasurementName
from worker.attribution.methods.source import check_request
from worker.attribution.progress import StageCounter
from worker.attribution.scoring import ModelScorer
from worker.attribution.segment_curvature import check_same_architecture
from worker.attribution.trajectory import TrajectoryCheckpoint, check_checkpoints, ordered
from worker.attribution.trajectory_scoring import aggregate_scores, pairwise_top_k, self_scores
from worker.attribution.types import AttributionError, AttributionScores, Examples, Progress, no_progress, tensor_sum


@dataclass
class TracInOptions:
    layers: list[str] | None = None
    batch_size: int = 256

    def validate(self) -> None:
        if self.batch_size < 1:
            raise AttributionError(f"batch_size must be >= 1, got {self.batch_size}")


def attribute_tracin(
    checkpoints: Sequence[TrajectoryCheckpoint],
    train: Examples,
    queries: Examples | None,
    *,
    loss: LossName,
    mode: Literal["pairwise", "aggregate", "self"],
    measurement: MeasurementName = "loss",
    top_k: int = 10,
    options: TracInOptions | None = None,
    progress: Progress = no_progress,
    device: torch.device | str | None = None,
) -> AttributionScores:
    """TracInCP scores (see the module docstring). Progress stages: "queries", "score"."""
    options = options or TracInOptions()
    options.validate()
    check_request(train, queries, loss, mode, measurement, top_k)
    check_checkpoints(
        [TrajectoryCheckpoint(c.model, c.step, c.learning_rate, 0.0, c.stage, "sgd") for c in checkpoints]
    )
    chain = ordered(checkpoints)
    check_same_architecture(chain[-1].model, [(f"at step {c.step} (stage {c.stage})", c.model) for c in chain])
    scorers = [_scorer(c.model, options.layers, loss, device) for c in chain]
    rates = [c.learning_rate for c in chain]
    counter = StageCounter(progress, "queries", 0 if queries is None else len(queries) * len(chain)).start()

    def vectors_for(chunk: Examples, aggregate: bool) -> list[LayerVectors]:
        vectors = []
        for scorer, rate in zip(scorers, rates, strict=True):
            gradients = scorer.query_vectors(chunk, measurement, options.batch_size, counter, aggregate)
            vectors.append({name: v * rate for name, v in gradients.items()})
        return vectors

    if mode == "self":

        def score_batch(per_model: list[Activities]) -> torch.Tensor:
            return tensor_sum(
                rate * tensor_sum(a[name].squared_norms().to(torch.float64) for name in s.layer_names)
                for s, a, rate in zip(scorers, per_model, rates, strict=True)
            )

        result = AttributionScores(
            mode="self", scores=self_scores(scorers, train, options.batch_size, progress, score_batch)
        )
    elif mode == "aggregate":
        assert queries is not None
        result = AttributionScores(
            mode="aggregate",
            scores=aggregate_scores(scorers, train, queries, vectors_for, options.batch_size, progress),
        )
    else:
        assert queries is not None
        topk, chunks = pairwise_top_k(
            scorers, train, queries, vectors_for, top_k, options.batch_size, progress, vector_sets=len(scorers)
        )
        result = AttributionScores(mode="pairwise", topk=topk, diagnostics={"query_chunks": chunks})
    result.diagnostics.update(
        {
            "method": "tracin",
            "mode": mode,
            "measurement": measurement,
            "layers": scorers[0].layer_names,
            "checkpoints": [
                {"stage": c.stage, "step": c.step, "learning_rate": c.learning_rate, "name": c.name} for c in chain
            ],
            "num_train": len(train),
            "num_queries": None if queries is None else len(queries),
            "scale": "sum_c eta_c <grad f(z_q; theta_c), grad l(z_i; theta_c)>",
        }
    )
    return result


def _scorer(
    model: nn.Module, layers: list[str] | None, loss: LossName, device: torch.device | str | None
) -> ModelScorer:
    placed, target = place_model(model, device)
    placed.eval()
    return ModelScorer(placed, resolve_layers(placed, layers), loss, target, model_dtype(placed), None)
