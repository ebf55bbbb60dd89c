"""DataInf (Kwon et al., docs/methods.md): a closed-form per-layer inverse, O(N d_l) per layer.

P_l v = (1/lambda_l) [ v - (1/N) sum_j g_jl <g_jl, v> / (lambda_l + ||g_jl||^2) ],
lambda_l = 0.1 x mean_i ||g_il||^2 / d_l by default. Applying P streams the training set once.

The first pass over the training set (the default damping's) keeps every batch's layer activities when they
fit ``DataInfOptions.memory_budget_bytes`` (1 GiB by default; sequence layers with more positions than
min(d_in, d_out) as their per-example gradient matrices, fewer numbers than the rows, formed once; from 64 MB on
in mapped temporary files, see kept_activities.py): preconditioning and scoring that same training set then run
no further model pass, so DataInf costs one training pass instead of three. With LoRA adapters at GPT-2-small
width (rank 8 on c_attn and c_proj) they are 3.2 MB per 64-token sequence.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from worker.attribution.curvature.base import DEFAULT_DAMPING_FRACTION, LayerVectors, Preconditioner
from worker.attribution.gradients import batches, model_dtype, training_activities
from worker.attribution.hooks import Activities, ActivityRecorder, LayerActivity, TrackedLayer, evaluation_mode
from worker.attribution.kept_activities import ActivityKeeper, KeptActivities
from worker.attribution.losses import LossName
from worker.attribution.progress import StageCounter
from worker.attribution.types import Examples, Progress, no_progress


def compact_activity(activity: LayerActivity) -> LayerActivity:
    """The same per-example gradients G = sum_t g_t a_t^T in fewer numbers: with T > min(d_in, d_out) positions,
    G itself (B x d_out x d_in <= B x T x max(d_in, d_out)), formed once here so that no later use (the damping's
    norms, each preconditioning, the scores) forms it again from the rows; else the rows as they are. Padded
    positions contributed zeros to G already."""
    if activity.example_gradients is not None:
        return activity
    positions, d_in = activity.activations.shape[1:]
    d_out = activity.gradients.shape[2]
    if positions <= min(d_in, d_out):
        return activity
    return LayerActivity.of_gradients(activity.per_example_gradients())


def datainf_dampings(
    model: nn.Module,
    layers: list[TrackedLayer],
    train: Examples,
    loss: LossName,
    batch_size: int,
    device: torch.device,
    counter: StageCounter,
    memory_budget_bytes: int,
) -> tuple[dict[str, float], KeptActivities | None]:
    """lambda_l = 0.1 x mean_i ||g_il||^2 / d_l (one pass over the training data), and the pass's activities
    when they fit ``memory_budget_bytes`` (else None)."""
    totals = {layer.name: 0.0 for layer in layers}
    keeper = ActivityKeeper(train, batch_size, memory_budget_bytes)
    with evaluation_mode(model), ActivityRecorder(layers) as recorder:
        for start, batch in batches(train, batch_size, device, model_dtype(model)):
            compact = {
                name: compact_activity(activity)
                for name, activity in training_activities(model, recorder, batch, loss).items()
            }
            for name, activity in compact.items():
                totals[name] += float(activity.squared_norms().to(torch.float64).sum())
            keeper.add(start, compact)
            counter.advance(len(batch))
    dampings = {}
    for layer in layers:
        value = DEFAULT_DAMPING_FRACTION * totals[layer.name] / len(train) / layer.num_parameters
        dampings[layer.name] = value if value > 0 else 1.0
    return dampings, keeper.finish()


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
        cache: KeptActivities | None = None,
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
        self.cache = cache if cache is not None and cache.matches(train, batch_size) else None
        self.passes = 0

    def precondition(self, vectors: LayerVectors) -> LayerVectors:
        sums = {name: torch.zeros_like(v) for name, v in vectors.items()}
        counter = StageCounter(self.progress, "precondition", len(self.train))

        def add(activities: Activities) -> None:
            for name in self.layer_names:
                activity = activities[name]
                damping = self.dampings[name]
                coefficients = activity.contract(vectors[name]) / (damping + activity.squared_norms())
                sums[name] += _coefficient_weighted_sum(activity, coefficients)
            counter.advance(next(iter(activities.values())).batch_size)

        if self.cache is not None:
            for _, activities in self.cache.batches():
                add(activities)
        else:
            with evaluation_mode(self.model), ActivityRecorder(self.layers) as recorder:
                for _, batch in batches(self.train, self.batch_size, self.device, model_dtype(self.model)):
                    add(training_activities(self.model, recorder, batch, self.loss))
            self.passes += 1
        n = len(self.train)
        return {name: (vectors[name] - sums[name] / n) / self.dampings[name] for name in self.layer_names}

    def diagnostics(self) -> dict[str, Any]:
        return {
            "damping": self.dampings,
            "training_passes": self.passes,
            "cached_training_activities": self.cache is not None,
            "cached_activities_spilled": self.cache is not None and self.cache.spilled,
        }
