"""K-FAC: H_l ~ A ⊗ S (weight-matrix layout: S ⊗ A), inverted in the Kronecker eigenbasis.

P V = Q_S [(Q_S^T V Q_A) / (lambda_S lambda_A^T + delta)] Q_A^T; default delta = 0.1 x the mean of the
Kronecker eigenvalue products per layer.
"""

from __future__ import annotations

import torch

from worker.attribution.curvature.base import Curvature
from worker.attribution.curvature.ekfac import (
    EigenbasisPreconditioner,
    basis_from_tensors,
    basis_tensors,
    eigenbasis_preconditioner,
)
from worker.attribution.options import FitOptions
from worker.attribution.statistics import Covariances, Eigenbasis, factors_of


def kronecker_eigenvalues(basis: Eigenbasis) -> torch.Tensor:
    """lambda_S lambda_A^T (d_out, d_in), negative round-off clamped to 0."""
    return basis.gradient_eigenvalues.clamp_min(0).unsqueeze(1) * basis.activation_eigenvalues.clamp_min(0).unsqueeze(0)


class KfacCurvature(Curvature):
    strategy = "kfac"

    def __init__(
        self,
        layer_names: list[str],
        options: FitOptions,
        bases: dict[str, Eigenbasis],
    ):
        super().__init__(layer_names, options)
        self.bases = bases

    def preconditioner(
        self, damping: float | None, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> EigenbasisPreconditioner:
        eigenvalues = {name: kronecker_eigenvalues(self.bases[name]) for name in self.layer_names}
        return eigenbasis_preconditioner(self.bases, eigenvalues, damping, device, dtype)

    def layer_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: basis_tensors(self.bases[name]) for name in self.layer_names}

    @classmethod
    def from_layer_tensors(
        cls, layer_names: list[str], options: FitOptions, tensors: dict[str, dict[str, torch.Tensor]]
    ) -> KfacCurvature:
        return cls(layer_names, options, {name: basis_from_tensors(tensors[name]) for name in layer_names})

    @property
    def covariances(self) -> dict[str, Covariances]:
        """The fitted factors A and S, rebuilt from their eigendecompositions (float64)."""
        return {name: factors_of(self.bases[name]) for name in self.layer_names}
