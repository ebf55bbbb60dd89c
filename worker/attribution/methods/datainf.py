"""DataInf (Kwon et al., docs/methods.md): a closed-form per-layer inverse, O(N d_l) per layer.

P_l v = (1/lambda_l) [ v - (1/N) sum_j g_jl <g_jl, v> / (lambda_l + ||g_jl||^2) ],
lambda_l = 0.1 x mean_i ||g_il||^2 / d_l by default. Applying P streams the training set once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from worker.attribution.curvature.base import DEFAULT_DAMPING_FRACTION, LayerVectors, Preconditioner
from worker.attribution.gradients import batches, model_dtype, training_activities
from worker.attribution.hooks import ActivityRecorder, LayerActivity, TrackedLayer, evaluation_mode
from worker.attribution.losses import LossName
from worker.attribution.progress import StageCounter
from worker.attribution.types import Examples, Progress, no_progress


def datainf_dampings(
    model: nn.Module,
    layers: list[TrackedLayer],
    train: Examples,
    loss: LossName,
    batch_size: int,
    device: torch.device,
    counter: StageCounter,
) -> dict[str, float]:
    """lambda_l = 0.1 x mean_i ||g_il||^2 / d_l (one pass over the training data)."""
    totals = {layer.name: 0.0 for layer in layers}
    with evaluation_mode(model), ActivityRecorder(layers) as recorder:
        for _, batch in batches(train, batch_size, device, model_dtype(model)):
            activities = training_activities(model, recorder, batch, loss)
            for name, activity in activities.items():
                totals[name] += float(activity.squared_norms().to(torch.float64).sum())
            counter.advance(len(batch))
    dampings = {}
    for layer in layers:
        value = DEFAULT_DAMPING_FRACTION * totals[layer.name] / len(train) / layer.num_parameters
        dampings[layer.name] = value if value > 0 else 1.0
    return dampings


def _coefficient_weighted_sum(activity: LayerActivity, coefficients: torch.Tensor) -> torch.Tensor:
    """sum_j c_qj G_j for coefficients (Q, B): (Q, d_out, d_in)."""
    if activity.rank_one:
        g = activity.gradients[:, 0, :]
        a = activity.activations[:, 0, :]
        return torch.einsum("qb,bo,bi->qoi", coefficients, g, a)
    gradients = activity.per_example_gradients()
    return torch.einsum("qb,boi->qoi", coefficients, gradients)


class DataInfPreconditioner(Preconditioner):
    def __init__(
        self,
        model: nn.Module,
        layers: list[TrackedLayer],
        train: Examples,
        loss: LossName,
        dampings: dict[str, float],
        batch_size: int,
        device: torch.device,
        progress: Progress = no_progress,
    ) -> None:
        self.model = model
        self.layers = layers
        self.layer_names = [layer.name for layer in layers]
        self.train = train
        self.loss = loss
        self.dampings = dampings
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.passes = 0

    def precondition(self, vectors: LayerVectors) -> LayerVectors:
        sums = {name: torch.zeros_like(v) for name, v in vectors.items()}
        counter = StageCounter(self.progress, "precondition", len(self.train))
        with evaluation_mode(self.model), ActivityRecorder(self.layers) as recorder:
            for _, batch in batches(self.train, self.batch_size, self.device, model_dtype(self.model)):
                activities = training_activities(self.model, recorder, batch, self.loss)
                for name in self.layer_names:
                    activity = activities[name]
                    damping = self.dampings[name]
                    coefficients = activity.contract(vectors[name]) / (damping + activity.squared_norms())
                    sums[name] += _coefficient_weighted_sum(activity, coefficients)
                counter.advance(len(batch))
        self.passes += 1
        n = len(self.train)
        return {name: (vectors[name] - sums[name] / n) / self.dampings[name] for name in self.layer_names}

    def diagnostics(self) -> dict[str, Any]:
        return {"damping": self.dampings, "training_passes": self.passes}
