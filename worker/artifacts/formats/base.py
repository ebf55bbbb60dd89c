"""The interface of a model format: validate an upload into stored files and metadata; build the module.

A format turns the file parts of `POST /v1/models` (staged on local disk) into a ``PreparedModel``: the
architecture JSON kept in the database, one safetensors weights file, other files to keep (a tokenizer), the
parameter count and the layers attribution can track. The worker rebuilds the module from the same stored
pieces with ``build``. Nothing here imports HTTP, database or queue code; every refusal is an ArtifactError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from worker.artifacts.errors import ArtifactError


@dataclass(frozen=True)
class StoredModel:
    """A stored model, as the worker sees it: architecture JSON, task, and local paths of its files."""

    architecture: dict[str, Any]
    task: dict[str, Any]
    weights: Path
    files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class BaseModelRef:
    """A stored model that an upload builds on (``metadata.base_model_id`` of a LoRA adapter)."""

    model_id: str
    format: str
    weights_sha256: str
    files_sha256: dict[str, str]  # the base's kept files (a tokenizer), by name
    stored: StoredModel


@dataclass(frozen=True)
class ModelUpload:
    """An upload, before validation: its metadata and its file parts (part name -> local files, in order)."""

    architecture: dict[str, Any]
    task: dict[str, Any]
    files: dict[str, list[Path]]
    max_parameters: int
    max_unpacked_bytes: int
    base: BaseModelRef | None = None


@dataclass
class PreparedModel:
    """A validated upload: what to store."""

    architecture: dict[str, Any]
    weights: Path  # one safetensors file holding the whole state_dict
    num_parameters: int
    tracked_layers: list[str]
    extra_files: dict[str, Path] = field(default_factory=dict)  # stored as blobs; their sha256 under "files"
    # blobs already stored (a base model's weights) that the model's files refer to: name -> sha256
    linked_files: dict[str, str] = field(default_factory=dict)


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

    def weights_to_store(self, module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors of the weights file stored for ``module`` at ``state`` (its full state_dict, e.g. an
        edit's): what ``build`` reads back."""
        ...

    def describe(self) -> dict[str, Any]:
        """What `GET /v1/models/formats` says about this format."""
        ...


def archive_or_parts(upload: ModelUpload, parts: Sequence[str], format_name: str) -> Path | None:
    """The upload's one ``archive`` part, or None when it came as file parts; refuses a part the format does not
    take (``parts``) and an archive sent with anything else."""
    files = upload.files
    unknown = set(files) - set(parts)
    if unknown:
        raise ArtifactError(
            f'format "{format_name}" takes the parts {", ".join(parts)}; not {", ".join(sorted(unknown))}',
            field=sorted(unknown)[0],
        )
    if "archive" not in files:
        return None
    if set(files) != {"archive"} or len(files["archive"]) != 1:
        raise ArtifactError(
            "an `archive` part replaces the file parts: send one archive and no other file", field="archive"
        )
    return files["archive"][0]
