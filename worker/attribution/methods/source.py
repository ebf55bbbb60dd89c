"""SOURCE (Bae et al.): attribution through the training trajectory by segmented stationary unrolling.

score(q, i) = sum over the attributed segments s of < U_s E_{s+1} ... E_M grad f(z_q; theta_final), g_s(z_i) >
with g_s(z_i) the mean over segment s's checkpoints of grad l(z_i; theta_c) (docs/methods.md, source). The 1/N_s
of the predicted change is left out (the same 1/N-free scale as influence); positive = z_i helps z_q.
``self`` mode: sum over the attributed segments of < g_s(z_i), U_s g_s(z_i) > (the segment's own
unrolled self-influence, without the later forgetting).
Editing: theta_final + sum_s (1/N_s) E_M ... E_{s+1} U_s sum_{removed z} g_s(z).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from worker.attribution.curvature.base import LayerVectors
from worker.attribution.editing import removed_rows
from worker.attribution.gradients import FisherLabels, batches, model_dtype, place_model, training_activities
from worker.attribution.hooks import (
    Activities,
    ActivityRecorder,
    evaluation_mode,
    resolve_layers,
    split_weight_matrix,
    weight_matrix,
)
from worker.attribution.losses import LossName, MeasurementName, check_examples, check_loss_name, check_scoring_request
from worker.attribution.options import check_damping
from worker.attribution.progress import StageCounter
from worker.attribution.scoring import ModelScorer, check_finite_vectors
from worker.attribution.segment_curvature import (
    SegmentFit,
    Variant,
    check_same_architecture,
    fit_passes_per_segment,
    fit_segment,
    unrolled_parameter_change,
    walk_query_vectors,
)
from worker.attribution.statistics import rotate
from worker.attribution.trajectory import Segment, SegmentSpec, TrajectoryCheckpoint, build_segments
from worker.attribution.trajectory_scoring import QueryVectors, aggregate_scores, pairwise_top_k, self_scores
from worker.attribution.types import AttributionError, AttributionScores, Examples, Progress, no_progress, tensor_sum


@dataclass
class SourceOptions:
    """Options of method ``source``. ``damping`` None adds nothing to the eigenvalues (U handles Lambda -> 0)."""

    segments: SegmentSpec = None
    variant: Variant = "full"
    damping: float | None = None
    fisher: Literal["true", "empirical"] = "true"
    fisher_samples: int = 1
    seed: int = 0
    layers: list[str] | None = None
    batch_size: int = 256

    def validate(self) -> None:
        if self.variant not in ("full", "averaged_parameters"):
            raise AttributionError(f"variant must be 'full' or 'averaged_parameters', got {self.variant!r}")
        if not (
            self.segments is None
            or self.segments == "stages"
            or (isinstance(self.segments, int) and self.segments >= 1)
        ):
            raise AttributionError(f"segments must be a positive integer, 'stages' or null, got {self.segments!r}")
        if self.fisher not in ("true", "empirical"):
            raise AttributionError(f"fisher must be 'true' or 'empirical', got {self.fisher!r}")
        if self.fisher_samples < 1:
            raise AttributionError(f"fisher_samples must be >= 1, got {self.fisher_samples}")
        if self.batch_size < 1:
            raise AttributionError(f"batch_size must be >= 1, got {self.batch_size}")
        check_damping(self.damping)

    def labels(self) -> FisherLabels:
        return FisherLabels(self.fisher, self.fisher_samples, self.seed)


@dataclass
class SourceTrajectory:
    """The fitted segments of a trajectory and what is needed to score with them."""

    final_model: nn.Module
    layer_names: list[str]
    fits: list[SegmentFit]
    attributed: set[int]  # indices of the segments whose data are the attributed training set
    device: torch.device


def fit_source(
    final_model: nn.Module,
    checkpoints: Sequence[TrajectoryCheckpoint],
    stage_data: Mapping[int, Examples],
    *,
    loss: LossName,
    options: SourceOptions,
    attributed_stages: Sequence[int] | None = None,
    progress: Progress = no_progress,
    device: torch.device | str | None = None,
) -> SourceTrajectory:
    """Segments the trajectory and fits every segment (progress stage "fit", in examples over all passes).

    ``stage_data`` gives each stage's training data (its curvature fits and N_s); ``attributed_stages`` (default
    all) says whose segments score the attributed training set.
    """
    check_loss_name(loss)
    options.validate()
    segments = build_segments(checkpoints, options.segments)
    stages = sorted({s.stage for s in segments})
    missing = [s for s in stages if s not in stage_data]
    if missing:
        raise AttributionError(f"no training dataset for stage(s) {missing}")
    attributed_stages = stages if attributed_stages is None else list(attributed_stages)
    unknown = [s for s in attributed_stages if s not in stages]
    if unknown:
        raise AttributionError(f"stage(s) {unknown} have no checkpoint (stages: {stages})")
    for stage in stages:
        check_examples(stage_data[stage], f"stage {stage} training")
    final, target = place_model(final_model, device)
    check_same_architecture(final, [(f"at step {c.step} (stage {c.stage})", c.model) for c in checkpoints])
    names = [layer.name for layer in resolve_layers(final, options.layers)]
    total = sum(fit_passes_per_segment(s, options.variant) * len(stage_data[s.stage]) for s in segments)
    counter = StageCounter(progress, "fit", total).start()
    fits = []
    for segment in segments:
        placed = _placed_segment(segment, target)
        fits.append(
            fit_segment(
                placed,
                stage_data[segment.stage],
                names,
                loss,
                options.labels(),
                options.variant,
                options.damping,
                options.batch_size,
                target,
                counter,
            )
        )
    attributed = {s.index for s in segments if s.stage in attributed_stages}
    return SourceTrajectory(final, names, fits, attributed, target)


def _placed_segment(segment: Segment, device: torch.device) -> Segment:
    moved = tuple(
        TrajectoryCheckpoint(
            place_model(c.model, device)[0].eval(), c.step, c.learning_rate, c.momentum, c.stage, c.optimizer, c.name
        )
        for c in segment.checkpoints
    )
    return Segment(segment.index, segment.stage, moved, segment.start_step, segment.end_step)


# ---------------------------------------------------------------- attribution


def attribute_source(
    final_model: nn.Module,
    checkpoints: Sequence[TrajectoryCheckpoint],
    stage_data: Mapping[int, Examples],
    train: Examples,
    queries: Examples | None,
    *,
    loss: LossName,
    mode: Literal["pairwise", "aggregate", "self"],
    measurement: MeasurementName = "loss",
    top_k: int = 10,
    options: SourceOptions | None = None,
    attributed_stages: Sequence[int] | None = None,
    progress: Progress = no_progress,
    device: torch.device | str | None = None,
) -> AttributionScores:
    """SOURCE scores of the examples of ``train`` (the attributed stages' data). Stages: fit, queries, score."""
    options = options or SourceOptions()
    check_request(train, queries, loss, mode, measurement, top_k)
    trajectory = fit_source(
        final_model,
        checkpoints,
        stage_data,
        loss=loss,
        options=options,
        attributed_stages=attributed_stages,
        progress=progress,
        device=device,
    )
    if not trajectory.attributed:
        raise AttributionError("no segment belongs to an attributed stage")
    scorers, groups = _gradient_scorers(trajectory, loss)
    query_scorer = _query_scorer(trajectory, loss)
    counter = StageCounter(progress, "queries", 0 if queries is None else len(queries)).start()

    def vectors_for(chunk: Examples, aggregate: bool) -> list[LayerVectors]:
        gradients = query_scorer.query_vectors(chunk, measurement, options.batch_size, counter, aggregate)
        per_segment = walk_query_vectors(trajectory.fits, gradients, trajectory.attributed)
        return [_scaled(per_segment[segment], weight) for segment, weight in groups]

    result = _run_mode(trajectory, scorers, groups, train, queries, vectors_for, mode, top_k, options, progress)
    result.diagnostics.update(_diagnostics(trajectory, options, mode, measurement, train, queries))
    return result


def _run_mode(
    trajectory: SourceTrajectory,
    scorers: list[ModelScorer],
    groups: list[tuple[int, float]],
    train: Examples,
    queries: Examples | None,
    vectors_for: QueryVectors,
    mode: str,
    top_k: int,
    options: SourceOptions,
    progress: Progress,
) -> AttributionScores:
    if mode == "self":
        fits = {fit.segment.index: fit for fit in trajectory.fits}
        score_batch = lambda per_model: _self_batch(fits, scorers, groups, per_model)  # noqa: E731
        return AttributionScores(
            mode="self", scores=self_scores(scorers, train, options.batch_size, progress, score_batch)
        )
    assert queries is not None
    if mode == "aggregate":
        scores = aggregate_scores(scorers, train, queries, vectors_for, options.batch_size, progress)
        return AttributionScores(mode="aggregate", scores=scores)
    topk, chunks = pairwise_top_k(
        scorers,
        train,
        queries,
        vectors_for,
        top_k,
        options.batch_size,
        progress,
        vector_sets=len(scorers) + len(trajectory.fits) + 1,
    )
    result = AttributionScores(mode="pairwise", topk=topk)
    result.diagnostics["query_chunks"] = chunks
    return result


def _gradient_scorers(
    trajectory: SourceTrajectory, loss: LossName
) -> tuple[list[ModelScorer], list[tuple[int, float]]]:
    """One scorer per gradient model of the attributed segments, with (segment index, 1 / models in segment)."""
    scorers, groups = [], []
    for fit in trajectory.fits:
        if fit.segment.index not in trajectory.attributed:
            continue
        for model in fit.gradient_models:
            layers = resolve_layers(model, trajectory.layer_names)
            scorers.append(ModelScorer(model, layers, loss, trajectory.device, model_dtype(model), None))
            groups.append((fit.segment.index, 1.0 / len(fit.gradient_models)))
    return scorers, groups


def _query_scorer(trajectory: SourceTrajectory, loss: LossName) -> ModelScorer:
    final = trajectory.final_model
    layers = resolve_layers(final, trajectory.layer_names)
    return ModelScorer(final, layers, loss, trajectory.device, model_dtype(final), None)


def _scaled(vectors: LayerVectors, weight: float) -> LayerVectors:
    return {name: v * weight for name, v in vectors.items()}


def _self_batch(
    fits: dict[int, SegmentFit],
    scorers: list[ModelScorer],
    groups: list[tuple[int, float]],
    per_model: list[Activities],
) -> torch.Tensor:
    """sum_s <g_s, U_s g_s> for one batch, g_s the mean per-example gradient over segment s's models."""
    means: dict[int, dict[str, torch.Tensor]] = {}
    for scorer, (segment, weight), activities in zip(scorers, groups, per_model, strict=True):
        mean = means.setdefault(segment, {})
        for name in scorer.layer_names:
            g = activities[name].per_example_gradients() * weight
            mean[name] = g if name not in mean else mean[name] + g
    total: torch.Tensor | None = None
    for segment, mean in means.items():
        fit = fits[segment]
        for name, g in mean.items():
            rotated = rotate(g, fit.q_s[name], fit.q_a[name])
            part = (rotated.pow(2).to(torch.float64) * fit.accumulate[name]).flatten(1).sum(1)
            total = part if total is None else total + part
    assert total is not None
    return total


def check_request(
    train: Examples, queries: Examples | None, loss: str, mode: str, measurement: str, top_k: int
) -> None:
    check_scoring_request(loss, mode, measurement, top_k)
    check_examples(train, "training")
    if mode != "self":
        if queries is None:
            raise AttributionError(f"mode {mode!r} needs a query dataset")
        check_examples(queries, "query")


def _diagnostics(
    trajectory: SourceTrajectory,
    options: SourceOptions,
    mode: str,
    measurement: str,
    train: Examples,
    queries: Examples | None,
) -> dict[str, Any]:
    return {
        "method": "source",
        "mode": mode,
        "measurement": measurement,
        "variant": options.variant,
        "damping": options.damping,
        "segments": [fit.describe() for fit in trajectory.fits],
        "attributed_segments": sorted(trajectory.attributed),
        "layers": trajectory.layer_names,
        "num_train": len(train),
        "num_queries": None if queries is None else len(queries),
        "scale": "1/N-free: score = <U_s E_{s+1}..E_M grad f(z_q; theta_final), mean_c grad l(z_i; theta_c)>, "
        "summed over attributed segments",
        "self_mode": "sum over attributed segments of <g_s(z_i), U_s g_s(z_i)>" if mode == "self" else None,
    }


# ---------------------------------------------------------------- editing


def predicted_parameter_change(
    trajectory: SourceTrajectory, train: Examples, remove: torch.Tensor, loss: LossName, batch_size: int
) -> LayerVectors:
    """sum_s (1/N_s) E_M ... E_{s+1} U_s sum_{removed z} g_s(z), per tracked layer (d_out, d_in)."""
    removed = train.subset(removed_rows(remove, len(train)))
    steps: dict[int, LayerVectors] = {}
    for fit in trajectory.fits:
        if fit.segment.index not in trajectory.attributed:
            continue
        summed = [
            _summed_gradients(model, trajectory.layer_names, removed, loss, batch_size, trajectory.device)
            for model in fit.gradient_models
        ]
        steps[fit.segment.index] = {
            name: (tensor_sum(s[name] for s in summed) / (len(summed) * fit.num_examples)).unsqueeze(0)
            for name in trajectory.layer_names
        }
    change = unrolled_parameter_change(trajectory.fits, steps)
    check_finite_vectors(change, "parameter edits")
    return {name: v[0] for name, v in change.items()}


def edit_source(
    final_model: nn.Module,
    checkpoints: Sequence[TrajectoryCheckpoint],
    stage_data: Mapping[int, Examples],
    train: Examples,
    remove: torch.Tensor,
    *,
    loss: LossName,
    options: SourceOptions | None = None,
    attributed_stages: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """The final model's state_dict moved by SOURCE's predicted change from removing ``remove`` (rows of train)."""
    options = options or SourceOptions()
    check_examples(train, "training")
    trajectory = fit_source(
        final_model,
        checkpoints,
        stage_data,
        loss=loss,
        options=options,
        attributed_stages=attributed_stages,
        device=device,
    )
    change = predicted_parameter_change(trajectory, train, remove, loss, options.batch_size)
    state = {key: value.detach().clone() for key, value in final_model.state_dict().items()}
    for layer in resolve_layers(trajectory.final_model, trajectory.layer_names):
        matrix = weight_matrix(layer) + change[layer.name].to(weight_matrix(layer).dtype)
        for key, value in split_weight_matrix(layer, matrix).items():
            state[key] = value.detach().to(state[key].device, state[key].dtype).clone()
    return state


def _summed_gradients(
    model: nn.Module, names: list[str], data: Examples, loss: LossName, batch_size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    layers = resolve_layers(model, names)
    summed = {
        layer.name: torch.zeros(layer.out_features, layer.in_features, device=device, dtype=model_dtype(model))
        for layer in layers
    }
    with evaluation_mode(model), ActivityRecorder(layers) as recorder:
        for _, batch in batches(data, batch_size, device, model_dtype(model)):
            activities = training_activities(model, recorder, batch, loss)
            for name in names:
                summed[name] += activities[name].summed_gradient()
    return summed
