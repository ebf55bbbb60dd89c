"""Database row → response schema, by pydantic's `from_attributes` (no hand-written field-by-field copies)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

SchemaT = TypeVar("SchemaT", bound=BaseModel)


class _RowWith:
    """A row's attributes, with the response fields the row does not hold (a job's status, a URL) given over."""

    __slots__ = ("_extra", "_row")

    def __init__(self, row: object, extra: dict[str, Any]) -> None:
        self._row = row
        self._extra = extra

    def __getattr__(self, name: str) -> Any:
        if name in self._extra:
            return self._extra[name]
        return getattr(self._row, name)


def from_row(schema: type[SchemaT], row: object, **extra: Any) -> SchemaT:
    """``schema`` validated from ``row``'s attributes; ``extra`` gives (or overrides) fields by name."""
    return schema.model_validate(_RowWith(row, extra) if extra else row, from_attributes=True)
