"""``format: "spec"``: a declarative torch.nn.Sequential (see worker.artifacts.spec) and one safetensors file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.artifacts.errors import ArtifactError
from worker.artifacts.formats.base import ModelUpload, PreparedModel, StoredModel
from worker.artifacts.spec import LAYER_TYPES, build_module, count_parameters, parameter_count, parse_architecture
from worker.artifacts.weights import load_weights
from worker.attribution import trackable_layers

LOSSES = ("cross_entropy", "mse")


class SpecFormat:
    name = "spec"
    parts: tuple[str, ...] = ("weights",)
    description = "A declarative torch.nn.Sequential (`metadata.architecture`) and one safetensors `weights` part."

    def prepare(self, upload: ModelUpload, work_dir: Path) -> PreparedModel:
        if upload.task.get("loss") not in LOSSES:
            raise ArtifactError(
                f'task loss {upload.task.get("loss")!r} needs format "hf"; format "spec" takes {" or ".join(LOSSES)}',
                field="metadata.task.loss",
            )
        if upload.task.get("head") is not None:
            raise ArtifactError('task.head applies to format "hf"', field="metadata.task.head")
        weights = upload.files.get("weights", [])
        if len(weights) != 1 or set(upload.files) != {"weights"}:
            raise ArtifactError('format "spec" takes exactly one `weights` part', field="weights")
        spec = parse_architecture(upload.architecture)
        count = count_parameters(spec)
        if count > upload.max_parameters:
            raise ArtifactError(
                f"the architecture has {count} parameters, over the limit of {upload.max_parameters}",
                field="metadata.architecture",
            )
        module = build_module(spec)
        load_weights(module, weights[0], field="weights")
        return PreparedModel(
            architecture=upload.architecture,
            weights=weights[0],
            num_parameters=parameter_count(module),
            tracked_layers=trackable_layers(module),
        )

    def build(self, stored: StoredModel) -> nn.Module:
        module = build_module(parse_architecture(stored.architecture))
        load_weights(module, stored.weights)
        return module.eval()

    def check_weights(self, architecture: dict[str, Any], task: dict[str, Any], weights: Path) -> None:
        load_weights(build_module(parse_architecture(architecture)), weights, field="weights")

    def weights_to_store(self, module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "parts": list(self.parts),
            "losses": list(LOSSES),
            "layer_types": list(LAYER_TYPES),
        }
