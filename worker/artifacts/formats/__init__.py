"""The registry of model formats (`POST /v1/models` `metadata.format`): one module per format.

``spec`` (worker.artifacts.formats.spec) and ``hf`` (worker.artifacts.formats.hf) implement ``ModelFormat``
(worker.artifacts.formats.base). A format's module is imported when first used, so that the service does not
load ``transformers`` until a Hugging Face model is uploaded or read.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from worker.artifacts.errors import ArtifactError
from worker.artifacts.formats.base import ModelFormat, ModelUpload, PreparedModel, StoredModel

NOT_SUPPORTED_YET: tuple[str, ...] = ("onnx",)


def _spec() -> ModelFormat:
    from worker.artifacts.formats.spec import SpecFormat

    return SpecFormat()


def _hf() -> ModelFormat:
    from worker.artifacts.formats.hf import HfFormat

    return HfFormat()


FORMATS: dict[str, Callable[[], ModelFormat]] = {"spec": _spec, "hf": _hf}


@cache
def model_format(name: str) -> ModelFormat:
    """The format named ``name``; ArtifactError (a 422) for formats not built yet or unknown."""
    factory = FORMATS.get(name)
    if factory is None:
        state = "is not supported yet" if name in NOT_SUPPORTED_YET else "is unknown"
        raise ArtifactError(f"model format {name!r} {state}; use one of {', '.join(FORMATS)}", field="metadata.format")
    return factory()


__all__ = ["FORMATS", "NOT_SUPPORTED_YET", "ModelFormat", "ModelUpload", "PreparedModel", "StoredModel", "model_format"]
