"""The attribution job: load what the method declares it needs, run the method, write ranked rows atomically."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session
from torch import nn

from service.db.base import new_id, utcnow
from service.db.tables import Attribution, Dataset, Fit, Model
from worker.artifacts.datasets import DatasetArrays
from worker.attribution import AttributionError, AttributionScores, Curvature, Examples
from worker.context import JobContext
from worker.loading import load_curvatures, load_examples, load_model, load_model_tokenizer, put_curvatures
from worker.methods.base import MadeFit, Method, RunInputs, RunOutput
from worker.tasks.diagnostics import method_diagnostics
from worker.tasks.options import loss_name, measurement_name, method_of, method_options, mode_name
from worker.tasks.per_token import expand_queries
from worker.tasks.result_writer import write_results
from worker.tasks.rows import QueryTokenLabels, ResultColumns, result_columns
from worker.tasks.trajectory import load_trajectory


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
    # per_token: the queries above are per-token query rows; which query and token each one is
    query_tokens: QueryTokenLabels | None = None

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
    present = [model for model in models if model is not None]
    assert train_row is not None and len(present) == len(models)
    modules = [load_model(context.store, model) for model in present]
    train, train_arrays = load_examples(context.store, train_row)
    query, query_arrays = load_examples(context.store, query_row) if query_row else (None, None)
    query_tokens = None
    if attribution.per_token:
        if query is None:
            raise AttributionError("per_token needs a query dataset")
        query, query_tokens = expand_queries(query, load_model_tokenizer(context.store, present[0]))
    return LoadedRequest(attribution, present, modules, train, train_arrays, query, query_arrays, fit, query_tokens)


def run_attribution(context: JobContext) -> None:
    request = load_request(context)
    method = method_of(request.attribution.method)
    from worker.tasks.sharded import run_sharded, shard_plan  # it builds on this module's loading and saving

    if (ranges := shard_plan(context, request, method)) is not None:
        run_sharded(context, request, method, ranges)
        return
    output = method.run(run_inputs(context, request, method))
    query_ids = request.query_arrays.ids.tolist() if request.query_arrays is not None else None
    rows = result_columns(
        output.scores,
        method.name,
        request.attribution.top_k,
        request.train_arrays.ids.tolist(),
        query_ids,
        request.query_tokens,
    )
    save_results(context, request, output.scores, rows, output.made_fits)


def run_inputs(context: JobContext, request: LoadedRequest, method: Method) -> RunInputs:
    """What the method declared it needs: its typed options, the stored fit, the training trajectory."""
    attribution = request.attribution
    fit: Curvature | None = None
    if request.fit is not None and request.fit.artifact_sha256 is not None:
        fit = load_curvatures(context.store, request.fit.artifact_sha256)["model"]
    trajectory = None
    options = method_options(method, attribution.options)
    if method.needs_checkpoints:
        with context.session() as session:
            trajectory = load_trajectory(session, context.store, attribution, options, request.models[0], request.train)
    return RunInputs(
        options=options,
        model_ids=[model.id for model in request.models],
        modules=request.modules,
        train=request.train,
        query=request.query,
        loss=loss_name(request.loss),
        mode=mode_name(attribution.mode),
        measurement=measurement_name(attribution.measurement),
        top_k=attribution.top_k,
        progress=context.progress,
        fit=fit,
        trajectory=trajectory,
        device=context.device,
    )


def save_results(
    context: JobContext,
    request: LoadedRequest,
    scores: AttributionScores,
    rows: ResultColumns,
    made_fits: list[MadeFit],
) -> None:
    attribution_id = request.attribution.id
    with context.session() as session:
        context.succeed(session)  # first: ends the transaction early if the job was cancelled or taken over
        used_fit_ids = [request.fit.id] if request.fit is not None else []
        for made in made_fits:
            used_fit_ids.append(_store_fit(session, context, request, made))
        write_results(session, attribution_id, rows)
        stored = session.get(Attribution, attribution_id)
        assert stored is not None
        stored.num_results = len(rows)
        stored.diagnostics = method_diagnostics(method_of(request.attribution.method), scores.diagnostics)
        stored.used_fit_ids = used_fit_ids or None


def _store_fit(session: Session, context: JobContext, request: LoadedRequest, made: MadeFit) -> str:
    blob = put_curvatures(session, context.store, {"model": made.curvature})
    settings = made.settings.model_dump()
    fit = Fit(
        id=new_id("fit"),
        tenant_id=request.attribution.tenant_id,
        job_id=context.job_id,
        model_id=made.model_id,
        dataset_id=request.attribution.train_dataset_id,
        strategy=settings["strategy"],
        options=settings,
        damping=made.damping,
        artifact_sha256=blob.sha256,
        created_at=utcnow(),
    )
    session.add(fit)
    session.flush()
    return fit.id


__all__ = ["LoadedRequest", "RunOutput", "load_request", "run_attribution", "save_results", "write_results"]
