"""The edit job: estimate the model retrained without some examples (or tasks), store it as a new model.

The new model row, its weights blob and the edit's diagnostics are written in the same transaction as the job's
final status, so the model exists exactly when the job has succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy import select
from torch import nn

from service.db.tables import Attribution, Dataset, Edit, Fit, Model
from worker import attribution as engine
from worker.artifacts.datasets import DatasetArrays
from worker.artifacts.removal import removal_rows, removal_tasks
from worker.attribution import AttributionError, EditOptions, EditResult, Examples
from worker.loading import load_curvatures, load_examples, load_model, put_state_dict
from worker.runner import JobContext
from worker.tasks.options import dataclass_from, engine_options


@dataclass
class LoadedEdit:
    edit: Edit
    attribution: Attribution
    model_row: Model
    module: nn.Module
    train: Examples
    arrays: DatasetArrays
    queries: Examples | None
    fit: Fit | None

    @property
    def loss(self) -> Any:
        return self.model_row.task["loss"]


def run_edit(context: JobContext) -> None:
    context.progress("loading", 0, 1)
    loaded = load_edit(context)
    result = compute_edit(loaded, context)
    save_edit(context, loaded, result)


def load_edit(context: JobContext) -> LoadedEdit:
    with context.session() as session:
        edit = session.scalar(select(Edit).where(Edit.job_id == context.job_id))
        assert edit is not None
        attribution = session.get(Attribution, edit.attribution_id)
        assert attribution is not None
        model_row = session.get(Model, attribution.model_ids[0])
        train_row = session.get(Dataset, attribution.train_dataset_id)
        query_row = session.get(Dataset, attribution.query_dataset_id) if attribution.query_dataset_id else None
        fit_ids = attribution.used_fit_ids or []
        fit = session.get(Fit, fit_ids[0]) if attribution.method == "influence" and fit_ids else None
    if model_row is None or train_row is None:
        raise AttributionError("the attribution's model or training dataset no longer exists")
    train, arrays = load_examples(context.store, train_row)
    queries = load_examples(context.store, query_row)[0] if query_row is not None else None
    module = load_model(context.store, model_row)
    return LoadedEdit(edit, attribution, model_row, module, train, arrays, queries, fit)


def edit_options(loaded: LoadedEdit) -> EditOptions:
    """The stored request options; estimator null = the method's default (meta instance: first_order)."""
    values = dict(loaded.edit.options)
    if values.get("estimator") is None:
        values["estimator"] = "first_order" if loaded.attribution.method == "meta_instance_influence" else "newton"
    return dataclass_from(EditOptions, values)


def compute_edit(loaded: LoadedEdit, context: JobContext) -> EditResult:
    method = loaded.attribution.method
    options = edit_options(loaded)
    if method.startswith("meta_"):
        return _edit_meta(loaded, options)
    rows, missing = removal_rows(loaded.arrays.ids, loaded.edit.remove)
    if missing:
        raise AttributionError(f"ids not in the training dataset: {missing[:10]}")
    removed = torch.tensor(rows, dtype=torch.long)
    if method == "source":
        from worker.tasks.trajectory import edit_source

        with context.session() as session:
            return edit_source(session, context.store, loaded.attribution, loaded.model_row, loaded.module,
                               loaded.train, removed, options, loaded.queries, context.progress)
    method_options = engine_options(method, loaded.attribution.options)
    curvature = None
    if loaded.fit is not None:
        curvature = load_curvatures(context.store, loaded.fit.artifact_sha256)["model"]  # type: ignore[arg-type]
        method_options.strategy = curvature.strategy
    return engine.edit_parameters(loaded.module, loaded.train, removed, loss=loaded.loss, method=method,
                                  options=method_options, fit=curvature, edit=options, queries=loaded.queries,
                                  progress=context.progress, device=context.device)


def _edit_meta(loaded: LoadedEdit, options: EditOptions) -> EditResult:
    from worker.attribution.meta import edit_meta

    by_task = loaded.attribution.method == "meta_task_influence"
    if by_task:
        chosen, missing = removal_tasks(loaded.arrays.task, loaded.edit.remove)
        what = "task ids not in the training dataset"
    else:
        chosen, missing = removal_rows(loaded.arrays.ids, loaded.edit.remove)
        what = "ids not in the training dataset"
    if missing:
        raise AttributionError(f"{what}: {missing[:10]}")
    return edit_meta(loaded.module, loaded.train, torch.tensor(chosen, dtype=torch.long), loss=loaded.loss,
                     unit="task" if by_task else "instance",
                     options=engine_options(loaded.attribution.method, loaded.attribution.options), edit=options,
                     queries=loaded.queries)


def save_edit(context: JobContext, loaded: LoadedEdit, result: EditResult) -> None:
    source = loaded.model_row
    with context.session() as session:
        context.succeed(session)  # first: ends the transaction early if the job was cancelled or taken over
        blob = put_state_dict(session, context.store, result.state)
        session.add(Model(
            id=loaded.edit.model_id, tenant_id=loaded.attribution.tenant_id, name=loaded.edit.name,
            format=source.format, architecture=source.architecture, task=source.task, weights_sha256=blob.sha256,
            num_parameters=source.num_parameters, tracked_layers=source.tracked_layers,
            source_attribution_id=loaded.attribution.id,
        ))
        stored = session.get(Edit, loaded.edit.id)
        assert stored is not None
        stored.diagnostics = result.diagnostics
