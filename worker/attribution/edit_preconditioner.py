"""A Kronecker-factored preconditioner for an edit's CG solves, fitted from the square-root rows of G.

The Gauss-Newton matrix of an edit is G = Σ_m r_m r_mᵀ over square-root rows r_m (proximal.py); a tracked
layer's part of r_m is a (d_out, d_in) matrix R_m (a per-example gradient: g aᵀ for a linear layer). Each layer's
block of G is approximated by a Kronecker product in the eigenbases of the two Gram factors

    S = Σ_m R_m R_mᵀ  (d_out × d_out) = Q_S diag(σ) Q_Sᵀ,    A = Σ_m R_mᵀ R_m  (d_in × d_in) = Q_A diag(α) Q_Aᵀ,

with eigenvalues Λ_jk = σ_j α_k · trace / (Σσ · Σα), so that Σ Λ = the block's trace. Where the block is a
Kronecker product (every R_m = g aᵀ with one g, or with one a, or a linear model with the mse loss) this is the
block itself. Applying (Λ + damping)⁻¹ in those eigenbases costs four small matrix products per layer, and
preconditioned CG then gets as close to the solution in 8 products as plain CG in 15-20 on the benchmark's digits
models (docs/editing.md). Layers without curvature, or with a side above MAX_FACTOR_SIDE, are scaled by their mean
eigenvalue instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from worker.attribution.hooks import TrackedLayer

Flat = torch.Tensor
MAX_FACTOR_SIDE = 2048  # the largest Gram factor that is eigendecomposed (a larger layer gets a scalar)
GRAM_TERMS = 256  # the most rows per chunk of a dense layer part whose Gram factors are summed (an even sample)


@dataclass
class RankOneRows:
    """A linear layer's part of square-root rows: term m's gradient g_m a_{row m}ᵀ, a held once per row."""

    a: torch.Tensor  # (rows, d_in)
    g: torch.Tensor  # (terms, d_out)
    row: torch.Tensor  # (terms,) index into a


RowPart = torch.Tensor | RankOneRows  # a layer's part of a chunk of rows: (terms, d_out · d_in) or factors


@dataclass
class _LayerFit:
    left: torch.Tensor | None  # Σ_m R_m R_mᵀ over the summed rows (float64); None: a side is too large
    right: torch.Tensor | None  # Σ_m R_mᵀ R_m
    gram_trace: float  # Σ_m ‖R_m‖² over the rows whose Gram factors were summed
    trace: float  # Σ_m ‖R_m‖² over every row


@dataclass
class _LayerBasis:
    left: torch.Tensor  # Q_S (float64, like the factors)
    right: torch.Tensor  # Q_A
    eigenvalues: torch.Tensor  # Λ (d_out, d_in)
    cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def in_dtype(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q_S, Q_A, Λ) in the vectors' dtype, cast once (every CG iteration applies them)."""
        if dtype not in self.cast:
            self.cast[dtype] = (self.left.to(dtype), self.right.to(dtype), self.eigenvalues.to(dtype))
        return self.cast[dtype]


class KroneckerPreconditioner:
    """Fitted with ``add`` (each chunk of square-root rows) and ``finish``; then ``apply(v, damping)`` ≈
    (G + damping I)⁻¹ v over the tracked layers' flat parameters (the layout of ``proximal.flat_parameters``)."""

    def __init__(self, layers: list[TrackedLayer]) -> None:
        self.layers = layers
        self.fits: dict[str, _LayerFit] = {}
        self.bases: dict[str, _LayerBasis | float] = {}  # per layer: an eigenbasis, or a mean eigenvalue

    def add(self, parts: list[RowPart]) -> None:
        """Sum the Gram factors of one chunk of rows (``parts``: each tracked layer's part, in order)."""
        for layer, part in zip(self.layers, parts, strict=True):
            fit = self.fits.get(layer.name)
            if fit is None:
                small = max(layer.out_features, layer.in_features) <= MAX_FACTOR_SIDE
                fit = _LayerFit(
                    torch.zeros(layer.out_features, layer.out_features, dtype=torch.float64) if small else None,
                    torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64) if small else None,
                    0.0,
                    0.0,
                )
                self.fits[layer.name] = fit
            _add_part(fit, layer, part)

    def finish(self, left_out_share: float) -> None:
        """Eigendecompose the factors; ``left_out_share``: the share of G's trace whose rows were not added (their
        weight is spread over the eigenvalues)."""
        scale = 1.0 / (1.0 - left_out_share)
        for layer in self.layers:
            fit = self.fits.get(layer.name)
            if fit is None or fit.left is None or fit.right is None or fit.gram_trace <= 0:
                self.bases[layer.name] = scale * (fit.trace if fit is not None else 0.0) / layer.num_parameters
                continue
            sigma, left = torch.linalg.eigh(fit.left)
            alpha, right = torch.linalg.eigh(fit.right)
            sigma, alpha = sigma.clamp_min(0), alpha.clamp_min(0)
            norm = float(sigma.sum()) * float(alpha.sum())
            eigenvalues = torch.outer(sigma, alpha) * (scale * fit.trace / norm if norm > 0 else 0.0)
            self.bases[layer.name] = _LayerBasis(left, right, eigenvalues)
        self.fits.clear()

    def apply(self, vector: Flat, damping: float) -> Flat:
        """≈ (G + damping I)⁻¹ ``vector``."""
        parts, start = [], 0
        for layer in self.layers:
            size = layer.num_parameters
            block = vector[start : start + size].reshape(layer.out_features, layer.in_features)
            start += size
            basis = self.bases[layer.name]
            if isinstance(basis, float):
                parts.append((block / (basis + damping)).reshape(-1))
                continue
            left, right, eigenvalues = basis.in_dtype(vector.dtype)
            rotated = left.T @ block @ right
            scaled = rotated / (eigenvalues + damping)
            parts.append((left @ scaled @ right.T).reshape(-1))
        return torch.cat(parts)


def _add_part(fit: _LayerFit, layer: TrackedLayer, part: RowPart) -> None:
    """Add one chunk's Gram factors (computed in the rows' dtype, summed in float64) and squared norms."""
    if isinstance(part, RankOneRows):  # R_m = g_m a_mᵀ: R Rᵀ = ‖a‖² g gᵀ, Rᵀ R = ‖g‖² a aᵀ
        a_norms, g_norms = part.a.pow(2).sum(1), part.g.pow(2).sum(1)
        fit.trace += float((g_norms.double() * a_norms.double()[part.row]).sum())
        fit.gram_trace = fit.trace
        if fit.left is not None and fit.right is not None:
            fit.left += ((part.g * a_norms[part.row].unsqueeze(1)).T @ part.g).double()
            per_row = torch.zeros_like(a_norms).index_add_(0, part.row, g_norms)
            fit.right += ((part.a * per_row.unsqueeze(1)).T @ part.a).double()
        return
    fit.trace += float(torch.linalg.vector_norm(part).double()) ** 2
    if fit.left is None or fit.right is None:
        return
    stride = max(1, -(-part.shape[0] // GRAM_TERMS))
    sample = part[::stride].reshape(-1, layer.out_features, layer.in_features)
    fit.gram_trace += float(sample.double().pow(2).sum())
    by_output = sample.transpose(0, 1).reshape(layer.out_features, -1)
    fit.left += (by_output @ by_output.T).double()
    by_input = sample.reshape(-1, layer.in_features)
    fit.right += (by_input.T @ by_input).double()
