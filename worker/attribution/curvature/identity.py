"""P = I: the plain gradient dot product."""

from __future__ import annotations

from typing import Any

import torch

from worker.attribution.curvature.base import Curvature, LayerwisePreconditioner, Preconditioner
from worker.attribution.hooks import LayerActivity
from worker.attribution.options import FitOptions


class IdentityPreconditioner(LayerwisePreconditioner):
    def __init__(self, layer_names: list[str]):
        self.layer_names = list(layer_names)

    def precondition_layer(self, name: str, vectors: torch.Tensor) -> torch.Tensor:
        return vectors

    def layer_self_scores(self, name: str, activity: LayerActivity) -> torch.Tensor:
        return activity.squared_norms()

    def diagnostics(self) -> dict[str, Any]:
        return {"damping": None}


class IdentityCurvature(Curvature):
    strategy = "identity"

    def preconditioner(
        self, damping: float | None, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> Preconditioner:
        return IdentityPreconditioner(self.layer_names)

    def layer_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}

    @classmethod
    def from_layer_tensors(
        cls, layer_names: list[str], options: FitOptions, tensors: dict[str, dict[str, torch.Tensor]]
    ) -> IdentityCurvature:
        return cls(layer_names, options)
