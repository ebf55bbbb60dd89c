"""``attribute``: scores of training examples for queries, with one model or an ensemble.

score(q, i) = grad f(z_q)^T P grad l(z_i), in the 1/N-free form; positive = z_i helps z_q. With several
models the scores are averaged over the models (per pair, before the top-k).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from worker.attribution.curvature.base import Curvature, LayerVectors
from worker.attribution.curvature.fit import fit_layers, fit_passes
from worker.attribution.gradients import model_dtype, place_model
from worker.attribution.hooks import Activities, resolve_layers
from worker.attribution.losses import LossName, MeasurementName, check_examples, check_scoring_request
from worker.attribution.methods.datainf import DataInfPreconditioner, datainf_dampings
from worker.attribution.methods.gradient_similarity import gradient_similarity_scorer
from worker.attribution.methods.influence import influence_layers, influence_preconditioner
from worker.attribution.options import (
    FIT_STRATEGIES,
    DataInfOptions,
    GradientSimilarityOptions,
    InfluenceOptions,
)
from worker.attribution.progress import StageCounter
from worker.attribution.scoring import (
    ModelScorer,
    TopKAccumulator,
    check_finite_scores,
    mean_over_models,
    query_chunk_size,
    stream_training_activities,
)
from worker.attribution.types import AttributionError, AttributionScores, Examples, Progress, TopK, no_progress

MethodName = Literal["influence", "datainf", "gradient_similarity"]
ModeName = Literal["pairwise", "aggregate", "self"]
MethodOptions = InfluenceOptions | DataInfOptions | GradientSimilarityOptions

OPTION_TYPES: dict[str, type[MethodOptions]] = {
    "influence": InfluenceOptions,
    "datainf": DataInfOptions,
    "gradient_similarity": GradientSimilarityOptions,
}


def attribute(
    models: Sequence[nn.Module],
    train: Examples,
    queries: Examples | None,
    *,
    loss: LossName,
    method: MethodName,
    mode: ModeName,
    measurement: MeasurementName = "loss",
    top_k: int = 10,
    options: MethodOptions | None = None,
    fits: Sequence[Curvature] | None = None,
    progress: Progress = no_progress,
    device: torch.device | str | None = None,
) -> AttributionScores:
    """Attribution scores (see the module docstring). Progress stages: "fit", "queries", "score"."""
    models = list(models) if not isinstance(models, nn.Module) else [models]
    options = _check_request(models, train, queries, loss, method, mode, measurement, top_k, options, fits)
    placed = [place_model(model, device) for model in models]
    scorers = build_scorers(placed, train, loss, method, options, fits, progress)
    batch_size = options.batch_size
    if mode == "self":
        scores = self_scores(scorers, train, batch_size, progress)
        result = AttributionScores(mode="self", scores=scores)
    elif mode == "aggregate":
        assert queries is not None
        scores = aggregate_scores(scorers, train, queries, measurement, batch_size, progress)
        result = AttributionScores(mode="aggregate", scores=scores)
    else:
        assert queries is not None
        topk, chunks = pairwise_top_k(scorers, train, queries, measurement, top_k, batch_size, progress)
        result = AttributionScores(mode="pairwise", topk=topk)
        result.diagnostics["query_chunks"] = chunks
    result.diagnostics.update(_diagnostics(scorers, train, queries, method, mode, measurement, options))
    return result


# ---------------------------------------------------------------- checks


def _check_request(
    models: list[nn.Module],
    train: Examples,
    queries: Examples | None,
    loss: str,
    method: str,
    mode: str,
    measurement: str,
    top_k: int,
    options: MethodOptions | None,
    fits: Sequence[Curvature] | None,
) -> MethodOptions:
    if not models:
        raise AttributionError("at least one model is needed")
    check_scoring_request(loss, mode, measurement, top_k)
    if method not in OPTION_TYPES:
        raise AttributionError(f"unknown method {method!r}; expected one of {sorted(OPTION_TYPES)}")
    options = options if options is not None else OPTION_TYPES[method]()
    if not isinstance(options, OPTION_TYPES[method]):
        raise AttributionError(f"method {method!r} takes {OPTION_TYPES[method].__name__}, got {type(options).__name__}")
    if mode == "self" and isinstance(options, GradientSimilarityOptions) and options.normalize:
        raise AttributionError(
            "self mode is not defined for normalized gradient_similarity (it is 1 for every "
            "example); leave normalize false for squared gradient norms"
        )
    options.validate()
    check_examples(train, "training")
    if mode != "self":
        if queries is None:
            raise AttributionError(f"mode {mode!r} needs a query dataset")
        check_examples(queries, "query")
    if fits is not None:
        fits = list(fits)
        if not isinstance(options, InfluenceOptions) or options.strategy not in FIT_STRATEGIES:
            raise AttributionError("precomputed fits are only used by method 'influence' with a factor strategy")
        if len(fits) != len(models):
            raise AttributionError(f"{len(fits)} fits given for {len(models)} models")
    _check_same_architecture(models)
    return options


def _check_same_architecture(models: list[nn.Module]) -> None:
    reference = {k: tuple(v.shape) for k, v in models[0].state_dict().items()}
    for position, model in enumerate(models[1:], start=1):
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if shapes != reference:
            raise AttributionError(f"model {position} of the ensemble does not have the first model's architecture")


# ---------------------------------------------------------------- scorers (one per model)


def build_scorers(
    placed: list[tuple[nn.Module, torch.device]],
    train: Examples,
    loss: LossName,
    method: str,
    options: MethodOptions,
    fits: Sequence[Curvature] | None,
    progress: Progress,
) -> list[ModelScorer]:
    """One scorer per model, by the type of ``options`` (each engine method has its own options class)."""
    fit_counter = StageCounter(progress, "fit", _fit_total(train, options, fits, len(placed))).start()
    scorers = []
    for position, (model, device) in enumerate(placed):
        dtype = model_dtype(model)
        if isinstance(options, GradientSimilarityOptions):
            scorers.append(
                gradient_similarity_scorer(
                    model, resolve_layers(model, options.layers), loss, device, dtype, normalize=options.normalize
                )
            )
        elif isinstance(options, DataInfOptions):
            layers = resolve_layers(model, options.layers)
            cache = None
            if options.damping is None:
                dampings, cache = datainf_dampings(
                    model, layers, train, loss, options.batch_size, device, fit_counter, options.memory_budget_bytes
                )
            else:
                dampings = {layer.name: float(options.damping) for layer in layers}
            datainf = DataInfPreconditioner(
                model, layers, train, loss, dampings, options.batch_size, device, progress, cache
            )
            scorers.append(ModelScorer(model, layers, loss, device, dtype, datainf, cached=cache))
        else:
            assert isinstance(options, InfluenceOptions)
            fit = None if fits is None else fits[position]
            layers = influence_layers(model, options, fit)
            if fit is None and options.strategy in FIT_STRATEGIES:
                fit = fit_layers(model, layers, train, loss, options.fit_options(), fit_counter, device)
            preconditioner = influence_preconditioner(
                model, layers, train, loss, options, fit, fit_counter, device, dtype, progress
            )
            index = None
            if (
                fit is not None
                and fit.training_index is not None
                and fit.training_index.matches(model, train, loss, [layer.name for layer in layers])
            ):
                index = fit.training_index
            scorer = ModelScorer(model, layers, loss, device, dtype, preconditioner, index=index)
            scorer.diagnostics["training_gradients"] = "index" if index is not None else "recomputed"
            scorers.append(scorer)
    return scorers


def _fit_total(train: Examples, options: MethodOptions, fits: Sequence[Curvature] | None, models: int) -> int:
    if isinstance(options, DataInfOptions):
        return len(train) * models if options.damping is None else 0
    if isinstance(options, InfluenceOptions) and fits is None and options.strategy in FIT_STRATEGIES:
        return fit_passes(options.fit_options()) * len(train) * models
    return 0


# ---------------------------------------------------------------- modes


def self_scores(scorers: list[ModelScorer], train: Examples, batch_size: int, progress: Progress) -> torch.Tensor:
    """grad l(z_i)^T P grad l(z_i) for every training example, averaged over models: (N,) float32."""
    scores = torch.empty(len(train), dtype=torch.float32)
    counter = StageCounter(progress, "score", len(train)).start()

    def visit(start: int, per_model: list[Activities]) -> None:
        values = mean_over_models([s.self_scores(a) for s, a in zip(scorers, per_model, strict=True)])
        check_finite_scores(values)
        scores[start : start + values.shape[0]] = values.cpu()

    stream_training_activities(scorers, train, batch_size, counter, visit)
    return scores


def aggregate_scores(
    scorers: list[ModelScorer],
    train: Examples,
    queries: Examples,
    measurement: MeasurementName,
    batch_size: int,
    progress: Progress,
) -> torch.Tensor:
    """sum_q score(q, i) for every training example (one summed query vector), averaged over models."""
    query_counter = StageCounter(progress, "queries", len(queries) * len(scorers)).start()
    vectors = [s.query_vectors(queries, measurement, batch_size, query_counter, aggregate=True) for s in scorers]
    scores = torch.empty(len(train), dtype=torch.float32)
    counter = StageCounter(progress, "score", len(train)).start()

    def visit(start: int, per_model: list[Activities]) -> None:
        values = mean_over_models([s.train_scores(a, v) for s, a, v in zip(scorers, per_model, vectors, strict=True)])[
            0
        ]
        check_finite_scores(values)
        scores[start : start + values.shape[0]] = values.cpu()

    stream_training_activities(scorers, train, batch_size, counter, visit, queries=1)
    return scores


def pairwise_top_k(
    scorers: list[ModelScorer],
    train: Examples,
    queries: Examples,
    measurement: MeasurementName,
    top_k: int,
    batch_size: int,
    progress: Progress,
) -> tuple[TopK, int]:
    """Top-k in both directions per query. Queries are handled in chunks that fit the memory budget;
    each chunk takes one pass over the training data."""
    chunk = query_chunk_size(scorers)
    num_chunks = math.ceil(len(queries) / chunk)
    query_counter = StageCounter(progress, "queries", len(queries) * len(scorers)).start()
    score_counter = StageCounter(progress, "score", len(train) * num_chunks).start()
    results: list[TopK] = []
    for first in range(0, len(queries), chunk):
        rows = torch.arange(first, min(first + chunk, len(queries)))
        chunk_queries = queries.subset(rows)
        vectors = [
            s.query_vectors(chunk_queries, measurement, batch_size, query_counter, aggregate=False) for s in scorers
        ]
        accumulator = TopKAccumulator(len(rows), top_k, scorers[0].device)

        def visit(
            start: int,
            per_model: list[Activities],
            vectors: list[LayerVectors] = vectors,
            accumulator: TopKAccumulator = accumulator,
        ) -> None:  # bound now: called within this iteration
            values = mean_over_models(
                [s.train_scores(a, v) for s, a, v in zip(scorers, per_model, vectors, strict=True)]
            )
            check_finite_scores(values)
            accumulator.update(values, start)

        stream_training_activities(scorers, train, batch_size, score_counter, visit, queries=len(rows))
        results.append(accumulator.result())
    return _concatenate_top_k(results), num_chunks


def _concatenate_top_k(parts: list[TopK]) -> TopK:
    return TopK(
        positive_indices=torch.cat([p.positive_indices for p in parts]),
        positive_scores=torch.cat([p.positive_scores for p in parts]).float(),
        negative_indices=torch.cat([p.negative_indices for p in parts]),
        negative_scores=torch.cat([p.negative_scores for p in parts]).float(),
    )


def _diagnostics(
    scorers: list[ModelScorer],
    train: Examples,
    queries: Examples | None,
    method: str,
    mode: str,
    measurement: str,
    options: MethodOptions,
) -> dict[str, Any]:
    per_model = []
    for scorer in scorers:
        info = dict(scorer.diagnostics)
        if scorer.preconditioner is not None:
            info.update(scorer.preconditioner.diagnostics())
        per_model.append(info)
    return {
        "method": method,
        "mode": mode,
        "measurement": measurement,
        "strategy": getattr(options, "strategy", None),
        "num_models": len(scorers),
        "num_layers": len(scorers[0].layers),
        "layers": scorers[0].layer_names,
        "num_parameters_tracked": scorers[0].vector_size,
        "num_train": len(train),
        "num_queries": None if queries is None else len(queries),
        "scale": "1/N-free: score = grad f(z_q)^T P grad l(z_i)",
        "models": per_model,
    }
