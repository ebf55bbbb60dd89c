"""EK-FAC inverse of one task's inner Hessian A = ∇²_θ L_tr + rI (docs/methods.md, meta methods, ``inner.ihvp = "ekfac"``).

Per adapted Linear / Conv2d layer, on the task's train split: Kronecker factors of the layer inputs and of
the pseudo-gradients at the layer outputs, eigendecomposed, with the eigenvalues refitted to the projected
per-example pseudo-gradients (as the engine's EK-FAC). Pseudo-gradients back-propagate the exact factors of
the loss's output Hessian (``output_hessian_factors``), so the refitted eigenvalues are the exact diagonal of
the Gauss-Newton block in the Kronecker eigenbasis: no label sampling, which few-shot splits could not afford.
Adapted parameters outside such layers get the exact Gauss-Newton diagonal. Then, block-diagonally,

    A⁻¹ ≈ Q diag(1 / (Λ + r)) Qᵀ.

It approximates the Gauss-Newton part of ∇²L_tr: residual curvature (and so the inner problem's
nonconvexity) is lost; the proximal r regularises the rank-deficient few-shot factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import grad, vmap

from worker.attribution.hooks import ActivityRecorder, LayerActivity, TrackedLayer, describe_layer, trackable_layers
from worker.attribution.losses import output_hessian_factors
from worker.attribution.meta.data import TaskData
from worker.attribution.meta.functional import FunctionalModel
from worker.attribution.statistics import (
    Covariances,
    activation_covariance_sum,
    apply_in_eigenbasis,
    corrected_eigenvalue_sum,
    eigenbasis,
    gradient_covariance_sum,
)
from worker.attribution.types import tensor_sum


@dataclass
class KroneckerBlock:
    """One layer's part of θ (weight, then bias as the last column) and its inverse in the eigenbasis."""

    weight: slice  # entries of θ
    bias: slice | None
    out_features: int
    q_s: torch.Tensor  # (d_out, d_out)
    q_a: torch.Tensor  # (d_in, d_in), d_in counting the bias column
    inverse: torch.Tensor  # 1 / (Λ + r), (d_out, d_in)

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[:, block] = P x[:, block] for rows x (m, p_θ)."""
        rows = x.shape[0]
        matrix = x[:, self.weight].reshape(rows, self.out_features, -1)
        if self.bias is not None:
            matrix = torch.cat([matrix, x[:, self.bias].reshape(rows, self.out_features, 1)], dim=2)
        result = apply_in_eigenbasis(matrix, self.q_s, self.q_a, self.inverse)
        columns = self.weight.stop - self.weight.start
        out[:, self.weight] = result[:, :, : columns // self.out_features].reshape(rows, columns)
        if self.bias is not None:
            out[:, self.bias] = result[:, :, -1]


@dataclass
class KroneckerInnerInverse:
    """Ã⁻¹: Kronecker blocks for layers, an exact Gauss-Newton diagonal for the other adapted entries."""

    num_theta: int
    blocks: list[KroneckerBlock]
    diagonal_index: torch.Tensor  # entries of θ outside the blocks
    diagonal_inverse: torch.Tensor  # 1 / (diag GGN + r) there

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """Ã⁻¹x for x of shape (p_θ,) or (p_θ, m)."""
        rows = x.reshape(self.num_theta, -1).T
        out = torch.empty_like(rows)
        for block in self.blocks:
            block.apply(rows, out)
        if self.diagonal_index.numel():
            out[:, self.diagonal_index] = rows[:, self.diagonal_index] * self.diagonal_inverse
        return out.T.reshape(x.shape)

    def matrix(self) -> torch.Tensor:
        """The dense Ã⁻¹ (p_θ, p_θ), for tests."""
        eye = torch.eye(self.num_theta, dtype=self.diagonal_inverse.dtype, device=self.diagonal_inverse.device)
        return self.solve(eye)


def _theta_slice(fm: FunctionalModel, name: str) -> slice | None:
    for slot in fm.slots:
        if slot.name == name and slot.theta_start >= 0:
            return slice(slot.theta_start, slot.theta_start + slot.numel)
    return None


def adapted_layers(fm: FunctionalModel) -> list[tuple[TrackedLayer, slice, slice | None]]:
    """Linear / Conv2d layers whose weight (and bias, if any) are all adapted, with their θ entries."""
    modules = dict(fm.module.named_modules())
    found = []
    for name in trackable_layers(fm.module):
        layer = describe_layer(name, modules[name])
        prefix = f"{name}." if name else ""
        weight = _theta_slice(fm, prefix + "weight")
        bias = _theta_slice(fm, prefix + "bias") if layer.has_bias else None
        if weight is not None and (bias is not None or not layer.has_bias):
            found.append((layer, weight, bias))
    return found


def fit_inner_ekfac(
    fm: FunctionalModel, task: TaskData, lam: torch.Tensor, theta: torch.Tensor, reg: float
) -> KroneckerInnerInverse:
    """The EK-FAC Ã⁻¹ of task ``task`` at its inner solution θ*."""
    layers = adapted_layers(fm)
    leaf = theta.detach().requires_grad_(True)
    sqrt_w = task.w_tr.sqrt()
    blocks = []
    if layers:
        with ActivityRecorder([layer for layer, _, _ in layers]) as recorder:
            recorder.clear()
            outputs = fm.forward(lam, leaf, task.x_tr)
            flat = outputs.reshape(outputs.shape[0], -1)
            factors = output_hessian_factors(flat, fm.loss) * sqrt_w[None, :, None]
            last = factors.shape[0] - 1
            activities = [recorder.backward((flat * c).sum(), retain_graph=k < last) for k, c in enumerate(factors)]
        for layer, weight, bias in layers:
            blocks.append(_fit_block(layer, weight, bias, [a[layer.name] for a in activities], sqrt_w, reg))
    covered = torch.zeros(fm.num_theta, dtype=torch.bool, device=theta.device)
    for block in blocks:
        covered[block.weight] = True
        if block.bias is not None:
            covered[block.bias] = True
    rest = torch.nonzero(~covered).reshape(-1)
    diagonal = _gauss_newton_diagonal(fm, task, lam, theta, rest, sqrt_w) if rest.numel() else theta.new_zeros(0)
    return KroneckerInnerInverse(fm.num_theta, blocks, rest, 1.0 / (diagonal + reg))


def _fit_block(
    layer: TrackedLayer,
    weight: slice,
    bias: slice | None,
    activities: list[LayerActivity],
    sqrt_w: torch.Tensor,
    reg: float,
) -> KroneckerBlock:
    first = activities[0]
    weighted_inputs = LayerActivity(first.activations * sqrt_w[:, None, None], first.gradients)
    covariances = Covariances(
        activation_covariance_sum(weighted_inputs), tensor_sum(gradient_covariance_sum(a) for a in activities)
    )
    basis = eigenbasis(covariances)
    dtype = first.gradients.dtype
    q_s, q_a = basis.gradient_eigenvectors.to(dtype), basis.activation_eigenvectors.to(dtype)
    eigenvalues = tensor_sum(corrected_eigenvalue_sum(a, q_s, q_a) for a in activities)
    return KroneckerBlock(weight, bias, layer.out_features, q_s, q_a, 1.0 / (eigenvalues + reg))


def _gauss_newton_diagonal(
    fm: FunctionalModel,
    task: TaskData,
    lam: torch.Tensor,
    theta: torch.Tensor,
    rest: torch.Tensor,
    sqrt_w: torch.Tensor,
) -> torch.Tensor:
    """Σ_z w_z Σ_k (c_zkᵀ ∂o_z/∂θ_j)² for the θ entries ``rest`` (per-example gradients by vmap)."""
    base = theta.detach()

    def output(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        full = base.index_copy(0, rest, values)
        return fm.forward(lam, full, x.unsqueeze(0)).reshape(-1)

    with torch.no_grad():
        flat = fm.forward(lam, base, task.x_tr)
    factors = output_hessian_factors(flat.reshape(flat.shape[0], -1), fm.loss) * sqrt_w[None, :, None]
    pseudo = grad(lambda values, x, c: (output(values, x) * c).sum())
    per_example = vmap(vmap(pseudo, in_dims=(None, 0, 0)), in_dims=(None, None, 0))
    gradients: torch.Tensor = per_example(base[rest], task.x_tr, factors)  # (m, B, |rest|)
    return gradients.pow(2).sum(dim=(0, 1))
