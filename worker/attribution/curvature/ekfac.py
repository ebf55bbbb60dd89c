"""Eigenvalue-corrected K-FAC: P V = Q_S [(Q_S^T V Q_A) / (Lambda + delta)] Q_A^T per layer.

Lambda = E[(Q_S^T G Q_A)^2] are the corrected eigenvalues; default delta = 0.1 x mean(Lambda) per layer.
With the true Fisher, Lambda is averaged over each factor's numerical null space (``statistics.pool_null_spaces``)
before use.
"""

from __future__ import annotations

from typing import Any

import torch

from worker.attribution.curvature.base import Curvature, LayerwisePreconditioner, resolve_damping
from worker.attribution.hooks import LayerActivity
from worker.attribution.options import FitOptions
from worker.attribution.statistics import (
    Covariances,
    Eigenbasis,
    apply_in_eigenbasis,
    factors_of,
    pool_null_spaces,
    rotate,
)


class EigenbasisPreconditioner(LayerwisePreconditioner):
    """P_l V = Q_S [(Q_S^T V Q_A) * inverse_l] Q_A^T with inverse_l = 1 / (eigenvalues_l + delta_l)."""

    def __init__(
        self,
        gradient_eigenvectors: dict[str, torch.Tensor],
        activation_eigenvectors: dict[str, torch.Tensor],
        inverse_eigenvalues: dict[str, torch.Tensor],
        dampings: dict[str, float],
    ):
        self.layer_names = list(inverse_eigenvalues)
        self.q_s = gradient_eigenvectors
        self.q_a = activation_eigenvectors
        self.inverse = inverse_eigenvalues
        self.dampings = dampings

    def precondition_layer(self, name: str, vectors: torch.Tensor) -> torch.Tensor:
        return apply_in_eigenbasis(vectors, self.q_s[name], self.q_a[name], self.inverse[name])

    def layer_self_scores(self, name: str, activity: LayerActivity) -> torch.Tensor:
        """sum (Q_S^T G_i Q_A)^2 * inverse, computed in the eigenbasis."""
        q_s, q_a, inverse = self.q_s[name], self.q_a[name], self.inverse[name]
        if activity.rank_one:
            g2 = (activity.gradients[:, 0, :] @ q_s).pow(2)
            a2 = (activity.activations[:, 0, :] @ q_a).pow(2)
            return ((g2 @ inverse) * a2).sum(1)
        rotated = rotate(activity.per_example_gradients(), q_s, q_a)
        return (rotated.pow(2) * inverse).flatten(1).sum(1)

    def diagnostics(self) -> dict[str, Any]:
        return {"damping": self.dampings}


def eigenbasis_preconditioner(
    bases: dict[str, Eigenbasis],
    eigenvalues: dict[str, torch.Tensor],
    damping: float | None,
    device: torch.device | None,
    dtype: torch.dtype,
) -> EigenbasisPreconditioner:
    dampings = {name: resolve_damping(damping, values) for name, values in eigenvalues.items()}
    inverse = {
        name: (1.0 / (values + dampings[name])).to(device=device, dtype=dtype) for name, values in eigenvalues.items()
    }
    q_s = {name: bases[name].gradient_eigenvectors.to(device=device, dtype=dtype) for name in eigenvalues}
    q_a = {name: bases[name].activation_eigenvectors.to(device=device, dtype=dtype) for name in eigenvalues}
    return EigenbasisPreconditioner(q_s, q_a, inverse, dampings)


def basis_tensors(basis: Eigenbasis) -> dict[str, torch.Tensor]:
    """A layer's factors as stored: their eigendecompositions (the factors are Q diag(lambda) Q^T)."""
    return {
        "activation_eigenvalues": basis.activation_eigenvalues,
        "activation_eigenvectors": basis.activation_eigenvectors,
        "gradient_eigenvalues": basis.gradient_eigenvalues,
        "gradient_eigenvectors": basis.gradient_eigenvectors,
    }


def basis_from_tensors(tensors: dict[str, torch.Tensor]) -> Eigenbasis:
    """The stored eigendecompositions (fits stored before they were dropped also hold the factor matrices
    themselves, ``activation_covariance`` / ``gradient_covariance``: ignored)."""
    return Eigenbasis(
        tensors["activation_eigenvalues"],
        tensors["activation_eigenvectors"],
        tensors["gradient_eigenvalues"],
        tensors["gradient_eigenvectors"],
    )


class EkfacCurvature(Curvature):
    strategy = "ekfac"

    def __init__(
        self,
        layer_names: list[str],
        options: FitOptions,
        bases: dict[str, Eigenbasis],
        eigenvalues: dict[str, torch.Tensor],
    ):
        super().__init__(layer_names, options)
        self.bases = bases
        self.eigenvalues = eigenvalues  # corrected Lambda (d_out, d_in), float64

    def preconditioner(
        self, damping: float | None, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> EigenbasisPreconditioner:
        if self.options.fisher != "true":
            # the empirical Fisher fits Lambda on the very gradients its factors came from: they have no component in
            # the factors' null spaces, whatever basis eigh picked there, so nothing is pooled (pooling with the
            # float32 tolerance would also flatten real, small directions of wide layers: GPT-2's 3072-wide inputs)
            return eigenbasis_preconditioner(self.bases, self.eigenvalues, damping, device, dtype)
        # the true Fisher's fresh labels reach into the null spaces: pooled there, the preconditioner does not
        # depend on the basis picked
        pooled = {name: pool_null_spaces(values, self.bases[name], dtype) for name, values in self.eigenvalues.items()}
        return eigenbasis_preconditioner(self.bases, pooled, damping, device, dtype)

    def layer_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            name: {
                **basis_tensors(self.bases[name]),
                "corrected_eigenvalues": self.eigenvalues[name],
            }
            for name in self.layer_names
        }

    @classmethod
    def from_layer_tensors(
        cls, layer_names: list[str], options: FitOptions, tensors: dict[str, dict[str, torch.Tensor]]
    ) -> EkfacCurvature:
        bases = {name: basis_from_tensors(tensors[name]) for name in layer_names}
        eigenvalues = {name: tensors[name]["corrected_eigenvalues"] for name in layer_names}
        return cls(layer_names, options, bases, eigenvalues)

    @property
    def covariances(self) -> dict[str, Covariances]:
        """The fitted factors A and S, rebuilt from their eigendecompositions (float64)."""
        return {name: factors_of(self.bases[name]) for name in self.layer_names}
