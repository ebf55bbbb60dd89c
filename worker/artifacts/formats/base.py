"""The interface of a model format: validate an upload into stored files and metadata; build the module.

A format turns the file parts of `POST /v1/models` (staged on local disk) into a ``PreparedModel``: the
architecture JSON kept in the database, one safetensors weights file, other files to keep (a tokenizer), the
parameter count and the layers attribution can track. The worker rebuilds the module from the same stored
pieces with ``build``. Nothing here imports HTTP, database or queue code; every refusal is an ArtifactError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn


@dataclass(frozen=True)
class ModelUpload:
    """An upload, before validation: its metadata and its file parts (part name -> local files, in order)."""

    architecture: dict[str, Any]
    task: dict[str, Any]
    files: dict[str, list[Path]]
    max_parameters: int
    max_unpacked_bytes: int


@dataclass
class PreparedModel:
    """A validated upload: what to store."""

    architecture: dict[str, Any]
    weights: Path  # one safetensors file holding the whole state_dict
    num_parameters: int
    tracked_layers: list[str]
    extra_files: dict[str, Path] = field(default_factory=dict)  # stored as blobs; their sha256 under "files"


@dataclass(frozen=True)
class StoredModel:
    """A stored model, as the worker sees it: architecture JSON, task, and local paths of its files."""

    architecture: dict[str, Any]
    task: dict[str, Any]
    weights: Path
    files: dict[str, Path] = field(default_factory=dict)


class ModelFormat(Protocol):
    name: str
    parts: tuple[str, ...]  # the file parts the format accepts besides `metadata`
    description: str

    def prepare(self, upload: ModelUpload, work_dir: Path) -> PreparedModel:
        """Validate the upload (ArtifactError if anything is off); new files go under ``work_dir``."""
        ...

    def build(self, stored: StoredModel) -> nn.Module:
        """The module with the stored weights, in eval mode (the worker's loader)."""
        ...

    def check_weights(self, architecture: dict[str, Any], task: dict[str, Any], weights: Path) -> None:
        """Checkpoint weights must fit the stored architecture (ArtifactError otherwise)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What `GET /v1/models/formats` says about this format."""
        ...
