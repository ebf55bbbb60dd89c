"""The shared interface of curvature approximations and of the preconditioners built from them.

A ``Curvature`` holds fitted statistics (damping-free, serialisable to a flat tensor dict); its
``preconditioner(damping, ...)`` gives the operator P applied to per-layer vectors. Vectors are
dicts {layer name: (Q, d_out, d_in)} in the layer weight-matrix layout (bias as last column).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Any, ClassVar

import torch

from worker.attribution.hooks import Activities, LayerActivity
from worker.attribution.options import FitOptions
from worker.attribution.training_index import INDEX_METADATA_KEY, INDEX_STATISTICS, TrainingIndex
from worker.attribution.types import AttributionError, tensor_sum

LayerVectors = dict[str, torch.Tensor]

FORMAT_VERSION = "1"
KEY_SEPARATOR = "::"  # between a layer (or fit) name and a statistic in stored tensor keys
# Default damping: this fraction of the mean eigenvalue (or of trace / D, or of the mean squared gradient norm per
# parameter for DataInf) when the request gives none.
DEFAULT_DAMPING_FRACTION = 0.1


class Preconditioner(ABC):
    """P: an approximation of the inverse damped curvature over the tracked layers."""

    layer_names: list[str]

    @abstractmethod
    def precondition(self, vectors: LayerVectors) -> LayerVectors:
        """P V for vectors {layer: (Q, d_out, d_in)}."""

    def self_scores(self, activities: Activities) -> torch.Tensor:
        """grad_i^T P grad_i for each example of a batch: (B,). Default: precondition per-example gradients."""
        gradients = {name: activities[name].per_example_gradients() for name in self.layer_names}
        preconditioned = self.precondition(gradients)
        return tensor_sum((preconditioned[name] * gradients[name]).flatten(1).sum(1) for name in self.layer_names)

    def diagnostics(self) -> dict[str, Any]:
        return {}


class LayerwisePreconditioner(Preconditioner):
    """A block-diagonal P: one operator per layer."""

    def precondition(self, vectors: LayerVectors) -> LayerVectors:
        return {name: self.precondition_layer(name, vectors[name]) for name in self.layer_names}

    @abstractmethod
    def precondition_layer(self, name: str, vectors: torch.Tensor) -> torch.Tensor:
        """P_l V for V (Q, d_out, d_in)."""

    def layer_self_scores(self, name: str, activity: LayerActivity) -> torch.Tensor:
        gradients = activity.per_example_gradients()
        return (self.precondition_layer(name, gradients) * gradients).flatten(1).sum(1)

    def self_scores(self, activities: Activities) -> torch.Tensor:
        return tensor_sum(self.layer_self_scores(name, activities[name]) for name in self.layer_names)


def default_damping(values: torch.Tensor, fraction: float = DEFAULT_DAMPING_FRACTION) -> float:
    """``fraction`` x the mean of ``values``; 1.0 if that is not positive (a layer with no curvature)."""
    damping = fraction * float(values.to(torch.float64).mean())
    return damping if damping > 0 and damping != float("inf") else 1.0


def resolve_damping(damping: float | None, values: torch.Tensor) -> float:
    return float(damping) if damping is not None else default_damping(values)


class Curvature(ABC):
    """Fitted curvature statistics of the tracked layers of one model."""

    strategy: ClassVar[str]
    _registry: ClassVar[dict[str, type[Curvature]]] = {}
    # per-example training-loss rows of the training set it was fitted on (None: not kept / over budget)
    training_index: TrainingIndex | None = None

    def __init__(self, layer_names: list[str], options: FitOptions):
        self.layer_names = list(layer_names)
        self.options = options

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "strategy" in cls.__dict__:
            Curvature._registry[cls.strategy] = cls

    @abstractmethod
    def preconditioner(
        self, damping: float | None, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> Preconditioner:
        """The damped preconditioner (``damping`` None: the strategy's default per layer)."""

    @abstractmethod
    def layer_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """{layer: {statistic name: tensor}}."""

    @classmethod
    @abstractmethod
    def from_layer_tensors(
        cls, layer_names: list[str], options: FitOptions, tensors: dict[str, dict[str, torch.Tensor]]
    ) -> Curvature:
        """Inverse of ``layer_tensors``."""

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """A flat dict {"<layer>::<statistic>": tensor}, for safetensors.torch.save_file."""
        flat: dict[str, torch.Tensor] = {}
        stats_per_layer = [self.layer_tensors()]
        if self.training_index is not None:
            stats_per_layer.append(self.training_index.layer_tensors())
        for layer_tensors in stats_per_layer:
            for layer, stats in layer_tensors.items():
                for key, tensor in stats.items():
                    flat[f"{layer}{KEY_SEPARATOR}{key}"] = tensor.detach().to("cpu").contiguous()
        return flat

    def metadata(self) -> dict[str, str]:
        metadata = {
            "format_version": FORMAT_VERSION,
            "strategy": self.strategy,
            "layer_names": json.dumps(self.layer_names),
            "options": json.dumps(asdict(self.options)),
        }
        if self.training_index is not None:
            metadata[INDEX_METADATA_KEY] = self.training_index.metadata()
        return metadata


def load_curvature(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Curvature:
    """Rebuilds a Curvature from ``to_tensors()`` and ``metadata()``."""
    try:
        strategy = metadata["strategy"]
        layer_names = list(json.loads(metadata["layer_names"]))
        options = FitOptions(**json.loads(metadata["options"]))
    except (KeyError, TypeError, ValueError) as error:
        raise AttributionError(f"invalid curvature metadata: {error}") from error
    if strategy not in Curvature._registry:
        raise AttributionError(f"unknown curvature strategy {strategy!r}")
    per_layer: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layer_names}
    index_tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, _, statistic = key.rpartition(KEY_SEPARATOR)
        if layer not in per_layer:
            raise AttributionError(f"curvature tensor {key!r} names no tracked layer")
        if statistic in INDEX_STATISTICS:
            index_tensors.setdefault(layer, {})[statistic] = tensor
        else:
            per_layer[layer][statistic] = tensor
    curvature = Curvature._registry[strategy].from_layer_tensors(layer_names, options, per_layer)
    if index_tensors and INDEX_METADATA_KEY in metadata:
        curvature.training_index = TrainingIndex.from_layer_tensors(metadata[INDEX_METADATA_KEY], index_tensors)
    return curvature
