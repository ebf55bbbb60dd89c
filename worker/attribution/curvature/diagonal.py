"""P = diag(E[grad^2] + delta)^-1, per layer; default delta = 0.1 x the mean of the diagonal."""

from __future__ import annotations

from typing import Any

import torch

from worker.attribution.curvature.base import Curvature, LayerwisePreconditioner, resolve_damping
from worker.attribution.hooks import LayerActivity
from worker.attribution.options import FitOptions


class DiagonalPreconditioner(LayerwisePreconditioner):
    def __init__(self, inverse_diagonals: dict[str, torch.Tensor], dampings: dict[str, float]):
        self.layer_names = list(inverse_diagonals)
        self.inverse_diagonals = inverse_diagonals
        self.dampings = dampings

    def precondition_layer(self, name: str, vectors: torch.Tensor) -> torch.Tensor:
        return vectors * self.inverse_diagonals[name]

    def layer_self_scores(self, name: str, activity: LayerActivity) -> torch.Tensor:
        inverse = self.inverse_diagonals[name]
        if activity.rank_one:
            g2 = activity.gradients[:, 0, :].pow(2)
            a2 = activity.activations[:, 0, :].pow(2)
            return ((g2 @ inverse) * a2).sum(1)
        return (activity.per_example_gradients().pow(2) * inverse).flatten(1).sum(1)

    def diagnostics(self) -> dict[str, Any]:
        return {"damping": self.dampings}


class DiagonalCurvature(Curvature):
    strategy = "diagonal"

    def __init__(self, layer_names: list[str], options: FitOptions, diagonals: dict[str, torch.Tensor]):
        super().__init__(layer_names, options)
        self.diagonals = diagonals  # {layer: E[G * G] (d_out, d_in)} float64

    def preconditioner(
        self, damping: float | None, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> DiagonalPreconditioner:
        dampings = {name: resolve_damping(damping, d) for name, d in self.diagonals.items()}
        inverse = {
            name: (1.0 / (d + dampings[name])).to(device=device, dtype=dtype) for name, d in self.diagonals.items()
        }
        return DiagonalPreconditioner(inverse, dampings)

    def layer_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {"diagonal": d} for name, d in self.diagonals.items()}

    @classmethod
    def from_layer_tensors(
        cls, layer_names: list[str], options: FitOptions, tensors: dict[str, dict[str, torch.Tensor]]
    ) -> DiagonalCurvature:
        return cls(layer_names, options, {name: tensors[name]["diagonal"] for name in layer_names})
