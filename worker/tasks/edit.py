"""Editing without retraining: the first-order estimate of the model trained without some examples or tasks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from sqlalchemy.orm import Session

from service.db.tables import Attribution, Dataset, Fit, Model
from service.storage import BlobStore
from worker import attribution as engine
from worker.attribution import AttributionError
from worker.loading import load_curvatures, load_examples, load_model
from worker.tasks.options import engine_options


def rows_to_remove(ids: Sequence[Any], remove: Sequence[Any]) -> torch.Tensor:
    position = {str(value): index for index, value in enumerate(ids)}
    missing = [value for value in remove if str(value) not in position]
    if missing:
        raise AttributionError(f"ids not in the training dataset: {missing[:10]}")
    return torch.tensor(sorted({position[str(value)] for value in remove}), dtype=torch.long)


def edited_weights(
    session: Session, store: BlobStore, attribution: Attribution, remove: Sequence[Any]
) -> dict[str, torch.Tensor]:
    if len(attribution.model_ids) != 1:
        raise AttributionError("editing needs an attribution of one model, not an ensemble")
    model_row = session.get(Model, attribution.model_ids[0])
    train_row = session.get(Dataset, attribution.train_dataset_id)
    assert model_row is not None and train_row is not None
    module = load_model(store, model_row)
    train, arrays = load_examples(store, train_row)
    loss = model_row.task["loss"]
    method = attribution.method
    options = engine_options(method, attribution.options) if method not in ("source", "tracin") else None
    if method.startswith("meta_"):
        from worker.attribution.meta import edit_meta

        by_task = method == "meta_task_influence"
        if by_task:
            known = {int(t) for t in arrays.task.tolist()}  # type: ignore[union-attr]
            missing = [t for t in remove if not str(t).lstrip("-").isdigit() or int(t) not in known]
            if missing:
                raise AttributionError(f"task ids not in the training dataset: {missing[:10]}")
            removed = torch.tensor(sorted({int(t) for t in remove}), dtype=torch.long)
        else:
            removed = rows_to_remove(arrays.ids.tolist(), remove)
        return edit_meta(module, train, removed, loss=loss, unit="task" if by_task else "instance", options=options)
    removed = rows_to_remove(arrays.ids.tolist(), remove)
    if method == "source":
        from worker.tasks.trajectory import edit_source

        return edit_source(session, store, attribution, model_row, module, removed)
    if method == "tracin":
        raise AttributionError("TracInCP gives no parameter-change estimate; edit a `source` or `influence` attribution")
    fit = None
    fit_ids = attribution.used_fit_ids or []
    if method == "influence" and fit_ids:
        fit_row = session.get(Fit, fit_ids[0])
        fit = load_curvatures(store, fit_row.artifact_sha256)["model"]  # type: ignore[union-attr,arg-type]
        options.strategy = fit.strategy
    return engine.edit_parameters(module, train, removed, loss=loss, method=method, options=options, fit=fit,
                                  edit=engine.EditOptions(estimator="first_order")).state
