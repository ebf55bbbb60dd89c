"""The one exception type of the artifact layer."""

from __future__ import annotations


class ArtifactError(ValueError):
    """An uploaded artifact (architecture, weights, dataset) is invalid.

    ``detail`` says what is wrong in words a user can act on; ``field`` names the form field or part at
    fault (``"weights"``, ``"data.inputs"``, ``"metadata.architecture.layers.2"``) or is None.
    The service turns it into a 422 problem.
    """

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field

    def __repr__(self) -> str:
        return f"ArtifactError({self.detail!r}, field={self.field!r})"
