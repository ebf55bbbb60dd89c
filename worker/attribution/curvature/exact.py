"""Exact curvature of the tracked parameters (small models, ground truth): dense, CG and LiSSA solvers.

C = the Gauss-Newton matrix (1/N) sum_i w_i J_i^T H_i J_i (H_i = the loss Hessian w.r.t. the outputs) or
the Hessian of the mean training loss (1/N) sum_i w_i l_i, over the flat vector of tracked weight
matrices (layer order, each row-major, bias as last column). P = (C + delta I)^-1 with default
delta = 0.1 x trace(C) / D (exact for ``exact``; a seeded Hutchinson estimate for ``cg`` / ``lissa``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from worker.attribution.curvature.base import DEFAULT_DAMPING_FRACTION, LayerVectors, Preconditioner
from worker.attribution.gradients import batches, model_dtype
from worker.attribution.hooks import TrackedLayer, evaluation_mode, split_weight_matrix, weight_matrix
from worker.attribution.losses import (
    LossName,
    check_targets,
    forward,
    output_tensor,
    scored_positions,
    training_objective,
)
from worker.attribution.text import position_ids
from worker.attribution.types import AttributionError, Examples, Progress, no_progress

MAX_DENSE_PARAMETERS = 10_000
HUTCHINSON_PROBES = 16

# ---------------------------------------------------------------- flat parameter layout


def flat_parameters(layers: list[TrackedLayer]) -> torch.Tensor:
    return torch.cat([weight_matrix(layer).reshape(-1) for layer in layers])


def flatten_vectors(vectors: LayerVectors, layers: list[TrackedLayer]) -> torch.Tensor:
    """{layer: (Q, d_out, d_in)} -> (Q, D)."""
    return torch.cat([vectors[layer.name].flatten(1) for layer in layers], dim=1)


def unflatten_vectors(flat: torch.Tensor, layers: list[TrackedLayer]) -> LayerVectors:
    """(Q, D) -> {layer: (Q, d_out, d_in)}."""
    result, offset = {}, 0
    for layer in layers:
        size = layer.num_parameters
        result[layer.name] = flat[:, offset : offset + size].reshape(-1, layer.out_features, layer.in_features)
        offset += size
    return result


def parameters_from_flat(flat: torch.Tensor, layers: list[TrackedLayer]) -> dict[str, torch.Tensor]:
    """The model's parameter dict (state_dict names) for the tracked layers, from a flat vector."""
    params: dict[str, torch.Tensor] = {}
    for layer, matrix in unflatten_vectors(flat.unsqueeze(0), layers).items():
        tracked = next(t for t in layers if t.name == layer)
        params.update(split_weight_matrix(tracked, matrix[0]))
    return params


class FlatModel:
    """The model's outputs and training objective as functions of the flat tracked parameters."""

    def __init__(self, model: nn.Module, layers: list[TrackedLayer], loss: LossName):
        self.model = model
        self.layers = layers
        self.loss = loss
        self.theta = flat_parameters(layers)

    def outputs(
        self, flat: torch.Tensor, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Model outputs with the tracked weights replaced (tied weights are not swapped together: a weight
        shared by two modules counts, as in the hooks, only through the tracked module)."""
        params = parameters_from_flat(flat, self.layers)
        if attention_mask is None:
            return output_tensor(functional_call(self.model, params, (inputs,), tie_weights=False))
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids(attention_mask)}
        return output_tensor(functional_call(self.model, params, (inputs,), kwargs, tie_weights=False))

    def objective(self, flat: torch.Tensor, batch: Examples) -> torch.Tensor:
        """sum_i w_i l_i over the batch."""
        outputs = self.outputs(flat, batch.inputs, batch.attention_mask)
        return training_objective(outputs, batch.targets, batch.weights, self.loss)


def output_hessian_product(
    outputs: torch.Tensor, vectors: torch.Tensor, loss: LossName, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """H_out v for outputs (B, C) and v (..., B, C): softmax Hessian diag(p) - p p^T, or I for mse.
    causal_lm: outputs (B, T, V), the softmax Hessian at the positions scored by ``targets``, 0 elsewhere."""
    if loss == "mse":
        return vectors
    p = torch.softmax(outputs, dim=-1)
    product = p * vectors - p * (p * vectors).sum(-1, keepdim=True)
    if loss == "causal_lm" and targets is not None:
        product = product * scored_positions(targets).unsqueeze(-1).to(product.dtype)
    return product


def _checked_batches(
    model: nn.Module, data: Examples, loss: LossName, batch_size: int, device: torch.device
) -> Iterator[tuple[int, Examples]]:
    """Batches with validated targets (in the form the loss needs)."""
    dtype = model_dtype(model)
    for start, batch in batches(data, batch_size, device, dtype):
        with torch.no_grad():
            targets = check_targets(forward(model, batch.inputs, batch.attention_mask), batch.targets, loss)
        yield (
            start,
            Examples(inputs=batch.inputs, targets=targets, weights=batch.weights, attention_mask=batch.attention_mask),
        )


# ---------------------------------------------------------------- dense matrices


def dense_curvature(
    model: nn.Module,
    layers: list[TrackedLayer],
    data: Examples,
    loss: LossName,
    kind: str,
    batch_size: int,
    device: torch.device,
    progress: Progress = no_progress,
) -> torch.Tensor:
    """The dense (D, D) Gauss-Newton matrix or Hessian of the mean training loss, float64."""
    flat_model = FlatModel(model, layers, loss)
    size = flat_model.theta.numel()
    if size > MAX_DENSE_PARAMETERS:
        raise AttributionError(
            f"strategy 'exact' needs a dense {size} x {size} matrix (limit {MAX_DENSE_PARAMETERS} tracked "
            "parameters): use 'cg', 'lissa' or a factored strategy"
        )
    total = torch.zeros(size, size, dtype=torch.float64, device=device)
    with evaluation_mode(model):
        for start, batch in _checked_batches(model, data, loss, batch_size, device):
            total += _batch_curvature(flat_model, batch, kind).detach().to(torch.float64)
            progress("curvature", start + len(batch), len(data))
    return total / len(data)


def _batch_curvature(flat_model: FlatModel, batch: Examples, kind: str) -> torch.Tensor:
    theta = flat_model.theta
    if kind == "hessian":
        hessian: torch.Tensor = torch.func.hessian(lambda f: flat_model.objective(f, batch))(theta)
        return hessian
    outputs = flat_model.outputs(theta, batch.inputs, batch.attention_mask).detach()
    jacobian = jacrev(lambda f: flat_model.outputs(f, batch.inputs, batch.attention_mask))(theta)  # (B, [T,] C, D)
    if flat_model.loss == "mse":
        h_j = jacobian
    else:
        p = torch.softmax(outputs, dim=-1).unsqueeze(-1)  # (B, [T,] C, 1)
        h_j = p * jacobian - p * (p * jacobian).sum(-2, keepdim=True)
        if flat_model.loss == "causal_lm":
            h_j = h_j * scored_positions(batch.targets).reshape(*outputs.shape[:2], 1, 1).to(h_j.dtype)
    if batch.weights is not None:
        h_j = h_j * batch.weights.reshape(-1, *([1] * (h_j.dim() - 1)))
    jacobian = jacobian.reshape(outputs.shape[0], -1, theta.numel())
    h_j = h_j.reshape(outputs.shape[0], -1, theta.numel())
    return torch.einsum("bcd,bce->de", jacobian, h_j)


class DensePreconditioner(Preconditioner):
    """P = (C + delta I)^-1 by a Cholesky factorisation (float64)."""

    def __init__(self, layers: list[TrackedLayer], curvature: torch.Tensor, damping: float | None, kind: str):
        self.layers = layers
        self.layer_names = [layer.name for layer in layers]
        size = curvature.shape[0]
        trace = float(torch.diagonal(curvature).sum())
        self.damping = float(damping) if damping is not None else _default_damping(trace, size)
        self.kind = kind
        damped = curvature + self.damping * torch.eye(size, dtype=curvature.dtype, device=curvature.device)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) != 0:
            raise AttributionError(
                f"the damped {kind} matrix is not positive definite (damping {self.damping:g}): "
                "increase the damping or use curvature 'gauss_newton'"
            )
        self.factor = factor

    def precondition(self, vectors: LayerVectors) -> LayerVectors:
        flat = flatten_vectors(vectors, self.layers)
        solved = torch.cholesky_solve(flat.T.to(self.factor.dtype), self.factor).T
        return unflatten_vectors(solved.to(flat.dtype), self.layers)

    def diagnostics(self) -> dict[str, Any]:
        return {"damping": self.damping, "curvature": self.kind, "solver": "cholesky"}


def _default_damping(trace: float, size: int) -> float:
    damping = DEFAULT_DAMPING_FRACTION * trace / size
    return damping if damping > 0 else 1.0


# ---------------------------------------------------------------- matrix-free products


def curvature_product(
    model: nn.Module,
    layers: list[TrackedLayer],
    data: Examples,
    loss: LossName,
    kind: str,
    batch_size: int,
    device: torch.device,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """V (Q, D) -> C V (Q, D), by Gauss-Newton-vector or Hessian-vector products over the whole data."""
    flat_model = FlatModel(model, layers, loss)
    theta = flat_model.theta
    checked = list(_checked_batches(model, data, loss, batch_size, device))

    def product(vectors: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(vectors)
        with evaluation_mode(model):
            for _, batch in checked:
                total += _batch_product(flat_model, theta, batch, vectors, kind)
        return total / len(data)

    return product


def _batch_product(
    flat_model: FlatModel, theta: torch.Tensor, batch: Examples, vectors: torch.Tensor, kind: str
) -> torch.Tensor:
    if kind == "hessian":
        gradient = grad(lambda f: flat_model.objective(f, batch))
        products: torch.Tensor = vmap(lambda v: jvp(gradient, (theta,), (v,))[1])(vectors)
        return products

    def outputs_fn(f: torch.Tensor) -> torch.Tensor:
        return flat_model.outputs(f, batch.inputs, batch.attention_mask)

    outputs, vjp_fn = vjp(outputs_fn, theta)[:2]
    j_v = vmap(lambda v: jvp(outputs_fn, (theta,), (v,))[1])(vectors)  # (Q, B, C)
    h_j_v = output_hessian_product(outputs.detach(), j_v, flat_model.loss, batch.targets)
    if batch.weights is not None:
        h_j_v = h_j_v * batch.weights.reshape(1, -1, *([1] * (h_j_v.dim() - 2)))
    pulled: torch.Tensor = vmap(lambda u: vjp_fn(u)[0])(h_j_v)
    return pulled


def hutchinson_trace(
    product: Callable[[torch.Tensor], torch.Tensor], size: int, device: torch.device, dtype: torch.dtype, seed: int
) -> float:
    generator = torch.Generator().manual_seed(seed)
    probes = (torch.randint(0, 2, (HUTCHINSON_PROBES, size), generator=generator) * 2 - 1).to(device, dtype)
    return float((product(probes) * probes).sum(1).mean())


class IterativePreconditioner(Preconditioner):
    """P V = (C + delta I)^-1 V by conjugate gradients or LiSSA, each column to relative residual ``tol``."""

    def __init__(
        self,
        layers: list[TrackedLayer],
        product: Callable[[torch.Tensor], torch.Tensor],
        solver: str,
        damping: float,
        max_iter: int,
        tol: float,
        kind: str,
        progress: Progress = no_progress,
    ):
        self.layers = layers
        self.layer_names = [layer.name for layer in layers]
        self.product = product
        self.solver = solver
        self.damping = damping
        self.max_iter = max_iter
        self.tol = tol
        self.kind = kind
        self.progress = progress
        self.iterations: list[int] = []
        self.residuals: list[float] = []
        self.scale: float | None = None

    def damped_product(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.product(vectors) + self.damping * vectors

    def precondition(self, vectors: LayerVectors) -> LayerVectors:
        flat = flatten_vectors(vectors, self.layers)
        solved = self._cg(flat) if self.solver == "cg" else self._lissa(flat)
        return unflatten_vectors(solved, self.layers)

    def _cg(self, b: torch.Tensor) -> torch.Tensor:
        """Conjugate gradients on every row of b (Q, D) at once."""
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        b_norm = b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
        iteration = 0
        for iteration in range(1, self.max_iter + 1):
            if bool((rs.sqrt() <= self.tol * b_norm).all()):
                iteration -= 1
                break
            ap = self.damped_product(p)
            alpha = rs / (p * ap).sum(1).clamp_min(torch.finfo(b.dtype).tiny)
            x = x + alpha.unsqueeze(1) * p
            r = r - alpha.unsqueeze(1) * ap
            rs_new = (r * r).sum(1)
            p = r + (rs_new / rs.clamp_min(torch.finfo(b.dtype).tiny)).unsqueeze(1) * p
            rs = rs_new
            self.progress("solve", iteration, self.max_iter)
        self._record(iteration, float((rs.sqrt() / b_norm).max()))
        return x

    def estimate_scale(self, size: int, device: torch.device, dtype: torch.dtype) -> float:
        """1.1 x the largest eigenvalue of C + delta I, by 30 power iterations."""
        v = torch.randn(1, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device, dtype)
        eigenvalue = 1.0
        for _ in range(30):
            w = self.damped_product(v / v.norm())
            eigenvalue = float(w.norm())
            v = w
        return 1.1 * eigenvalue

    def _lissa(self, b: torch.Tensor) -> torch.Tensor:
        """Deterministic LiSSA (Neumann series of (C + delta I)/s): v <- b + v - (C + delta I) v / s; x = v / s."""
        if self.scale is None:
            self.scale = self.estimate_scale(b.shape[1], b.device, b.dtype)
        s = self.scale
        v = b.clone()
        b_norm = b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
        relative = float("inf")
        iteration = 0
        for iteration in range(1, self.max_iter + 1):
            av = self.damped_product(v)
            relative = float(((b - av / s).norm(dim=1) / b_norm).max())
            if relative <= self.tol:
                break
            v = b + v - av / s
            self.progress("solve", iteration, self.max_iter)
        self._record(iteration, relative)
        return v / s

    def _record(self, iterations: int, residual: float) -> None:
        self.iterations.append(iterations)
        self.residuals.append(residual)

    def diagnostics(self) -> dict[str, Any]:
        return {
            "damping": self.damping,
            "curvature": self.kind,
            "solver": self.solver,
            "iterations": self.iterations,
            "max_relative_residual": max(self.residuals) if self.residuals else None,
            "lissa_scale": self.scale,
            "converged": bool(self.residuals) and max(self.residuals) <= self.tol,
        }


def exact_preconditioner(
    model: nn.Module,
    layers: list[TrackedLayer],
    data: Examples,
    loss: LossName,
    solver: str,
    kind: str,
    damping: float | None,
    max_iter: int,
    tol: float,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    progress: Progress = no_progress,
) -> Preconditioner:
    """The ``exact`` (dense Cholesky), ``cg`` or ``lissa`` preconditioner of the tracked parameters."""
    if solver == "exact":
        return DensePreconditioner(
            layers, dense_curvature(model, layers, data, loss, kind, batch_size, device, progress), damping, kind
        )
    product = curvature_product(model, layers, data, loss, kind, batch_size, device)
    size = sum(layer.num_parameters for layer in layers)
    if damping is None:
        trace = hutchinson_trace(product, size, device, model_dtype(model), seed)
        damping = _default_damping(trace, size)
    return IterativePreconditioner(layers, product, solver, float(damping), max_iter, tol, kind, progress)
