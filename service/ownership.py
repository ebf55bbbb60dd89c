"""One tenant-scoped lookup for every resource: a row of another tenant, or a deleted one, is a 404."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy.orm import Session

from service.db.tables import Attribution, Dataset, Fit, Job, Model
from service.problems import not_found

RowT = TypeVar("RowT", Model, Dataset, Fit, Attribution, Job)

# The word a 404 uses for each table.
WHAT: dict[type, str] = {Model: "model", Dataset: "dataset", Fit: "fit", Attribution: "attribution", Job: "job"}


def owned(session: Session, table: type[RowT], tenant_id: str, row_id: str) -> RowT:
    """The row ``row_id`` of ``table`` if it belongs to the tenant and is not deleted, else a 404 problem."""
    row = session.get(table, row_id)
    if row is None or row.tenant_id != tenant_id or getattr(row, "deleted_at", None) is not None:
        raise not_found(WHAT[table], row_id)
    return row
