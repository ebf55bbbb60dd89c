"""The attribution job: load the models and datasets, call the engine, write ranked rows atomically."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from torch import nn

from service.db.base import new_id, utcnow
from service.db.tables import Attribution, Dataset, Fit, Model
from worker import attribution as engine
from worker.artifacts.datasets import DatasetArrays
from worker.attribution import AttributionScores, Curvature, Examples
from worker.loading import load_curvatures, load_examples, load_model, put_curvatures
from worker.runner import JobContext
from worker.tasks.options import engine_options, fit_options
from worker.tasks.result_writer import write_results
from worker.tasks.rows import ResultColumns, result_columns

FACTOR_STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


@dataclass
class LoadedRequest:
    attribution: Attribution
    models: list[Model]
    modules: list[nn.Module]
    train: Examples
    train_arrays: DatasetArrays
    query: Examples | None
    query_arrays: DatasetArrays | None
    fit: Fit | None

    @property
    def loss(self) -> str:
        return str(self.models[0].task["loss"])


def load_request(context: JobContext) -> LoadedRequest:
    with context.session() as session:
        attribution = session.scalar(select(Attribution).where(Attribution.job_id == context.job_id))
        assert attribution is not None
        models = [session.get(Model, model_id) for model_id in attribution.model_ids]
        train_row = session.get(Dataset, attribution.train_dataset_id)
        query_row = session.get(Dataset, attribution.query_dataset_id) if attribution.query_dataset_id else None
        fit = session.get(Fit, attribution.fit_id) if attribution.fit_id else None
    modules = [load_model(context.store, model) for model in models if model is not None]
    train, train_arrays = load_examples(context.store, train_row)  # type: ignore[arg-type]
    query, query_arrays = load_examples(context.store, query_row) if query_row else (None, None)
    return LoadedRequest(attribution, models, modules, train, train_arrays, query, query_arrays, fit)  # type: ignore[arg-type]


def run_attribution(context: JobContext) -> None:
    request = load_request(context)
    method = request.attribution.method
    if method.startswith("meta_"):
        scores, fits = compute_meta(request, context), {}
    elif method in ("source", "tracin"):
        scores, fits = compute_trajectory(request, context), {}
    else:
        scores, fits = compute_influence(request, context)
    query_ids = request.query_arrays.ids.tolist() if request.query_arrays is not None else None
    rows = result_columns(scores, method, request.attribution.top_k, request.train_arrays.ids.tolist(), query_ids)
    save_results(context, request, scores, rows, fits)


def compute_influence(
    request: LoadedRequest, context: JobContext
) -> tuple[AttributionScores, dict[str, dict[str, Curvature]]]:
    """influence / datainf / gradient_similarity. Factor fits made here are stored as fits for reuse and editing."""
    attribution = request.attribution
    options = engine_options(attribution.method, attribution.options)
    curvatures: list[Curvature] | None = None
    made: dict[str, dict[str, Curvature]] = {}
    if attribution.method == "influence" and request.fit is not None:
        curvatures = [load_curvatures(context.store, request.fit.artifact_sha256)["model"]]  # type: ignore[arg-type]
        options.strategy = curvatures[0].strategy
    elif attribution.method == "influence" and options.strategy in FACTOR_STRATEGIES:
        settings = fit_options(attribution.options)
        curvatures = []
        for model, module in zip(request.models, request.modules):
            curvature = engine.fit_curvature(module, request.train, request.loss, settings, progress=context.progress,
                                              device=context.device)
            curvatures.append(curvature)
            made[model.id] = {"model": curvature}
    scores = engine.attribute(
        request.modules, request.train, request.query, loss=request.loss, method=attribution.method,
        mode=attribution.mode, measurement=attribution.measurement, top_k=attribution.top_k, options=options,
        fits=curvatures, progress=context.progress, device=context.device,
    )
    return scores, made


def compute_meta(request: LoadedRequest, context: JobContext) -> AttributionScores:
    from worker.attribution.meta import attribute_meta

    attribution = request.attribution
    assert request.query is not None
    return attribute_meta(
        request.modules[0], request.train, request.query, loss=request.loss,
        unit="task" if attribution.method == "meta_task_influence" else "instance",
        mode=attribution.mode, top_k=attribution.top_k,
        options=engine_options(attribution.method, attribution.options), progress=context.progress,
    )


def compute_trajectory(request: LoadedRequest, context: JobContext) -> AttributionScores:
    from worker.tasks.trajectory import compute_source_or_tracin

    return compute_source_or_tracin(request, context)


def save_results(
    context: JobContext, request: LoadedRequest, scores: AttributionScores, rows: ResultColumns,
    fits: dict[str, dict[str, Curvature]],
) -> None:
    attribution_id = request.attribution.id
    with context.session() as session:
        context.succeed(session)  # first: ends the transaction early if the job was cancelled or taken over
        used_fit_ids = [request.fit.id] if request.fit is not None else []
        for model_id, curvature in fits.items():
            used_fit_ids.append(_store_fit(session, context, request, model_id, curvature))
        write_results(session, attribution_id, rows)
        stored = session.get(Attribution, attribution_id)
        assert stored is not None
        stored.num_results = len(rows)
        stored.diagnostics = scores.diagnostics
        stored.used_fit_ids = used_fit_ids or None


def _store_fit(session, context: JobContext, request: LoadedRequest, model_id: str,  # type: ignore[no-untyped-def]
               curvature: dict[str, Curvature]) -> str:
    blob = put_curvatures(session, context.store, curvature)
    options = request.attribution.options
    fit = Fit(
        id=new_id("fit"), tenant_id=request.attribution.tenant_id, job_id=context.job_id, model_id=model_id,
        dataset_id=request.attribution.train_dataset_id, strategy=options.get("strategy", "ekfac"),
        options={k: options.get(k) for k in ("strategy", "fisher", "fisher_samples", "seed", "layers", "batch_size")},
        damping=options.get("damping"), artifact_sha256=blob.sha256, created_at=utcnow(),
    )
    session.add(fit)
    session.flush()
    return fit.id
