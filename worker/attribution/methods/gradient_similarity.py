"""Gradient similarity: the dot product (or, with ``normalize``, the cosine) of the query's measurement
gradient and the training example's loss gradient over the tracked layers (identity curvature)."""

from __future__ import annotations

import torch
from torch import nn

from worker.attribution.hooks import TrackedLayer
from worker.attribution.losses import LossName
from worker.attribution.scoring import ModelScorer


def gradient_similarity_scorer(
    model: nn.Module,
    layers: list[TrackedLayer],
    loss: LossName,
    device: torch.device,
    dtype: torch.dtype,
    normalize: bool = False,
) -> ModelScorer:
    return ModelScorer(
        model,
        layers,
        loss,
        device,
        dtype,
        preconditioner=None,
        normalize=normalize,
        diagnostics={"similarity": "cosine" if normalize else "dot_product"},
    )
