"""The edit job: estimate the model retrained without some examples (or tasks), store it as a new model.

The method's declaration says how it edits (`Method.edit`) and whether removed ids name examples or tasks
(`Method.train_unit`). The new model row, its weights blob and the edit's diagnostics are written in the same
transaction as the job's final status, so the model exists exactly when the job has succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from torch import nn

from service.db.tables import Attribution, Dataset, Edit, Fit, Model
from service.schemas.diagnostics import EditCurvatureScale
from worker.artifacts.datasets import DatasetArrays
from worker.artifacts.formats import model_format
from worker.artifacts.removal import removal_rows, removal_tasks
from worker.attribution import AttributionError, CurvatureScale, EditResult, Examples
from worker.context import JobContext
from worker.loading import load_curvatures, load_examples, load_model, put_state_dict
from worker.methods.base import EditInputs, Method, Trajectory
from worker.methods.engine_options import edit_options as engine_edit_options
from worker.tasks.diagnostics import edit_diagnostics
from worker.tasks.options import edit_options, loss_name, method_of, method_options
from worker.tasks.trajectory import load_trajectory

EARLIER_EDITS_READ = 20


@dataclass
class LoadedEdit:
    edit: Edit
    attribution: Attribution
    method: Method
    model_row: Model
    module: nn.Module
    train: Examples
    arrays: DatasetArrays
    queries: Examples | None
    fit: Fit | None
    curvature_scale: CurvatureScale | None  # an earlier edit's of the same attribution


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
        method = method_of(attribution.method)
        model_row = session.get(Model, attribution.model_ids[0])
        train_row = session.get(Dataset, attribution.train_dataset_id)
        query_row = session.get(Dataset, attribution.query_dataset_id) if attribution.query_dataset_id else None
        fit_ids = attribution.used_fit_ids or []
        fit = session.get(Fit, fit_ids[0]) if method.accepts_fit and fit_ids else None
        scale = earlier_curvature_scale(session, edit)
    if model_row is None or train_row is None:
        raise AttributionError("the attribution's model or training dataset no longer exists")
    train, arrays = load_examples(context.store, train_row)
    queries = load_examples(context.store, query_row)[0] if query_row is not None else None
    module = load_model(context.store, model_row)
    return LoadedEdit(edit, attribution, method, model_row, module, train, arrays, queries, fit, scale)


def earlier_curvature_scale(session: Session, edit: Edit) -> CurvatureScale | None:
    """The curvature scale of the latest succeeded edit of the same attribution (the same model, training rows,
    method options and loss, so the same trace(G)/D), if one computed it. Diagnostics are written only when an
    edit succeeds; the latest few are read, which is enough, as every edit whose λ came from the curvature rule
    records its scale (and an attribution's default-λ edits all take the same rule: the L2 penalty the model's
    gradient shows does not depend on the removed rows)."""
    earlier = session.scalars(
        select(Edit.diagnostics)
        .where(Edit.attribution_id == edit.attribution_id, Edit.id != edit.id, Edit.diagnostics.is_not(None))
        .order_by(Edit.created_at.desc())
        .limit(EARLIER_EDITS_READ)
    )
    for diagnostics in earlier:
        recorded = (diagnostics or {}).get("curvature_scale")
        if isinstance(recorded, dict):
            try:  # positive and finite, as the engine requires
                scale = EditCurvatureScale.model_validate(recorded)
            except ValidationError:
                continue
            return CurvatureScale(scale.mean_eigenvalue, scale.rule)
    return None


def removed_units(loaded: LoadedEdit) -> torch.Tensor:
    """The removed ids as the method's units: task ids (methods that rank tasks) or rows of the training set."""
    if loaded.method.train_unit == "task":
        chosen, missing = removal_tasks(loaded.arrays.task, loaded.edit.remove)
        what = "task ids not in the training dataset"
    else:
        chosen, missing = removal_rows(loaded.arrays.ids, loaded.edit.remove)
        what = "ids not in the training dataset"
    if missing:
        raise AttributionError(f"{what}: {missing[:10]}")
    return torch.tensor(chosen, dtype=torch.long)


def compute_edit(loaded: LoadedEdit, context: JobContext) -> EditResult:
    method = loaded.method
    if method.edit is None:
        raise AttributionError(f"method {method.name!r} gives no parameter-change estimate")
    options = method_options(method, loaded.attribution.options)
    curvature = None
    if loaded.fit is not None and loaded.fit.artifact_sha256 is not None:
        curvature = load_curvatures(context.store, loaded.fit.artifact_sha256)["model"]

    def trajectory() -> Trajectory:
        with context.session() as session:
            return load_trajectory(session, context.store, loaded.attribution, options, loaded.model_row, loaded.train)

    inputs = EditInputs(
        options=options,
        module=loaded.module,
        train=loaded.train,
        removed=removed_units(loaded),
        loss=loss_name(loaded.model_row.task["loss"]),
        edit=engine_edit_options(edit_options(loaded.edit.options), method.edit.default_estimator),
        queries=loaded.queries,
        progress=context.progress,
        fit=curvature,
        trajectory=trajectory,
        device=context.device,
        curvature_scale=loaded.curvature_scale,
    )
    return method.edit.run(inputs)


def _lock_live_base(session: Session, source: Model) -> None:
    """A LoRA model's edit is a new adapter on the same base: the base row is locked (PostgreSQL; SQLite has one
    writer at a time) and must still be live, or the edit fails and stores nothing. ``DELETE`` of the base locks
    the same row, so it either ran first (the edit fails here) or waits and then sees the new adapter (409)."""
    base_id = source.architecture.get("base_model_id") if source.format == "lora" else None
    if base_id is None:
        return
    base = session.get(Model, base_id, with_for_update=True, populate_existing=True)
    if base is None or base.deleted_at is not None:
        raise AttributionError(
            f"the base model {base_id!r} of {source.id!r} was deleted while the edit ran: no adapter is stored"
        )


def save_edit(context: JobContext, loaded: LoadedEdit, result: EditResult) -> None:
    source = loaded.model_row
    with context.session() as session:
        _lock_live_base(session, source)
        context.succeed(session)  # first: ends the transaction early if the job was cancelled or taken over
        # the weights file of the source's format: a LoRA model's edit is new adapter weights on the same base
        weights = model_format(source.format).weights_to_store(loaded.module, result.state)
        blob = put_state_dict(session, context.store, weights)
        session.add(
            Model(
                id=loaded.edit.model_id,
                tenant_id=loaded.attribution.tenant_id,
                name=loaded.edit.name,
                format=source.format,
                architecture=source.architecture,
                task=source.task,
                weights_sha256=blob.sha256,
                num_parameters=source.num_parameters,
                tracked_layers=source.tracked_layers,
                source_attribution_id=loaded.attribution.id,
            )
        )
        stored = session.get(Edit, loaded.edit.id)
        assert stored is not None
        stored.diagnostics = edit_diagnostics(result.diagnostics)
