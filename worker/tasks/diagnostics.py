"""The engine's diagnostics, read through the typed models before they are stored (`service/schemas/diagnostics.py`)."""

from __future__ import annotations

from typing import Any

from service.schemas.diagnostics import EditDiagnostics, read_diagnostics
from worker.methods.base import Method


def method_diagnostics(method: Method, raw: dict[str, Any]) -> dict[str, Any]:
    """An attribution's diagnostics as its method declares them (``method`` added where the engine leaves it out).
    A key the method's model does not declare fails the job: it would otherwise reach users undocumented."""
    typed = read_diagnostics(method.diagnostics, {**raw, "method": method.name})
    return typed.model_dump(mode="json", exclude_unset=True)


def edit_diagnostics(raw: dict[str, Any]) -> dict[str, Any]:
    """An edit's diagnostics, checked against `EditDiagnostics` the same way."""
    return read_diagnostics(EditDiagnostics, raw).model_dump(mode="json", exclude_unset=True)
