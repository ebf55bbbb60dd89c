"""`POST /v1/attributions/{id}/edit`: checks what can be known up front, then stores the edit and its job.

The edit itself runs in the worker (worker/tasks/edit.py); the service never imports task code (docs/architecture.md).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from service.db.base import new_id, utcnow
from service.db.tables import Attribution, Dataset, Edit, Job
from service.jobs import create_job
from service.problems import invalid
from service.schemas.attributions import EditIn
from service.storage import BlobStore
from worker.artifacts.datasets import read_dataset
from worker.artifacts.removal import removal_rows, removal_tasks
from worker.artifacts.text_datasets import STORED_FORMAT as TEXT_FORMAT
from worker.artifacts.text_datasets import read_stored
from worker.methods.registry import all_methods, get_method


def submit_edit(
    session: Session, store: BlobStore, attribution: Attribution, body: EditIn, max_active_jobs: int
) -> tuple[Edit, Job]:
    _check_method(attribution, body)
    _check_ids(session, store, attribution, body)
    job = create_job(session, attribution.tenant_id, "edit", max_active_jobs)
    edit = Edit(
        id=new_id("edit"),
        tenant_id=attribution.tenant_id,
        job_id=job.id,
        attribution_id=attribution.id,
        model_id=new_id("mdl"),
        name=body.name,
        remove=list(body.remove),
        options=body.options.model_dump(),
        created_at=utcnow(),
    )
    session.add(edit)
    session.flush()
    return edit, job


def editable_methods() -> list[str]:
    return [entry.name for entry in all_methods() if entry.edit is not None]


def _check_method(attribution: Attribution, body: EditIn) -> None:
    method = get_method(attribution.method)
    if method.edit is None:
        raise invalid(
            method.not_editable
            or f"method {method.name!r} gives no parameter-change estimate; editable "
            f"methods: {', '.join(editable_methods())}",
            "body",
        )
    if len(attribution.model_ids) != 1:
        raise invalid("editing needs an attribution of one model, not an ensemble", "body")
    estimator = body.options.estimator
    if estimator is not None and estimator not in method.edit.estimators:
        raise invalid(
            method.edit.estimator_note
            or f"method {method.name!r} supports the estimators {', '.join(method.edit.estimators)}, not {estimator!r}",
            "body.options.estimator",
        )


def _check_ids(session: Session, store: BlobStore, attribution: Attribution, body: EditIn) -> None:
    dataset = session.get(Dataset, attribution.train_dataset_id)
    if dataset is None or dataset.deleted_at is not None:
        raise invalid(f"the attribution's training dataset {attribution.train_dataset_id!r} no longer exists", "body")
    with store.local_path(dataset.blob_sha256) as path:
        if dataset.format == TEXT_FORMAT:
            ids, tasks = read_stored(path).ids, None
        else:
            arrays = read_dataset(path, dataset.format, max_rows=max(dataset.num_examples, 1))
            ids, tasks = arrays.ids, arrays.task
    if get_method(attribution.method).train_unit == "task":
        _, missing = removal_tasks(tasks, body.remove)
        what = "task ids not in the training dataset"
    else:
        _, missing = removal_rows(ids, body.remove)
        what = "ids not in the training dataset"
    if missing:
        raise invalid(f"{what}: {missing[:10]}", "body.remove")
