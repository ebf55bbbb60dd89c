"""`POST /v1/attributions/{id}/edit`: store the estimated weights as a new model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from service.db.base import new_id, utcnow
from service.db.tables import Attribution, Model
from service.problems import invalid
from service.storage import BlobStore
from worker.attribution import AttributionError
from worker.loading import put_state_dict
from worker.tasks.edit import edited_weights


def create_edited_model(
    session: Session, store: BlobStore, attribution: Attribution, remove: Sequence[Any], name: str
) -> Model:
    try:
        state = edited_weights(session, store, attribution, remove)
    except AttributionError as exc:
        raise invalid(str(exc), "body.remove") from exc
    source = session.get(Model, attribution.model_ids[0])
    assert source is not None
    blob = put_state_dict(session, store, state)
    model = Model(
        id=new_id("mdl"), tenant_id=attribution.tenant_id, name=name, format=source.format,
        architecture=source.architecture, task=source.task, weights_sha256=blob.sha256,
        num_parameters=source.num_parameters, tracked_layers=source.tracked_layers,
        source_attribution_id=attribution.id, created_at=utcnow(),
    )
    session.add(model)
    session.flush()
    return model
