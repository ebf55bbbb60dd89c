"""The registry of model formats (`POST /v1/models` `metadata.format`): one module per format.

``spec`` (worker.artifacts.formats.spec), ``hf`` (worker.artifacts.formats.hf) and ``lora`` (a peft adapter on a
stored ``hf`` model, worker.artifacts.formats.lora) implement ``ModelFormat`` (worker.artifacts.formats.base). A
format's module is imported when first used, so that the service does not load ``transformers`` or ``peft``
until a Hugging Face model is uploaded or read.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from worker.artifacts.errors import ArtifactError
from worker.artifacts.formats.base import BaseModelRef, ModelFormat, ModelUpload, PreparedModel, StoredModel

NOT_SUPPORTED_YET: tuple[str, ...] = ("onnx",)


def _spec() -> ModelFormat:
    from worker.artifacts.formats.spec import SpecFormat

    return SpecFormat()


def _hf() -> ModelFormat:
    from worker.artifacts.formats.hf import HfFormat

    return HfFormat()


def _lora() -> ModelFormat:
    from worker.artifacts.formats.lora import LoraFormat

    return LoraFormat()


FORMATS: dict[str, Callable[[], ModelFormat]] = {"spec": _spec, "hf": _hf, "lora": _lora}
# formats whose models are Hugging Face transformers models (their architecture holds the config and head)
HF_FORMATS: tuple[str, ...] = ("hf", "lora")


@cache
def model_format(name: str) -> ModelFormat:
    """The format named ``name``; ArtifactError (a 422) for formats not built yet or unknown."""
    factory = FORMATS.get(name)
    if factory is None:
        state = "is not supported yet" if name in NOT_SUPPORTED_YET else "is unknown"
        raise ArtifactError(f"model format {name!r} {state}; use one of {', '.join(FORMATS)}", field="metadata.format")
    return factory()


__all__ = [
    "FORMATS",
    "HF_FORMATS",
    "NOT_SUPPORTED_YET",
    "BaseModelRef",
    "ModelFormat",
    "ModelUpload",
    "PreparedModel",
    "StoredModel",
    "model_format",
]
