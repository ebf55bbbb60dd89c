"""The proximal retrain objective of an edit, and its minimisation by Gauss-Newton steps solved with CG.

Removing the rows S of the training data from a model at θ₀ is estimated as the minimiser of

    J_S(θ) = (1/M) Σ_{i ∉ S} w_i ℓ_i(θ) − ⟨g₀, θ − θ₀⟩ + (λ/2) ‖θ − θ₀‖²,    g₀ = ∇ (1/N) Σ_i w_i ℓ_i (θ₀)

over the tracked layers' parameters θ (everything else stays fixed). N is the full training count; M the count of
the rows kept, N − |S| (``reduction`` "mean": a model trained on its rows' mean loss is retrained on the mean over
those it keeps, so each of them weighs N / M times more against the other terms) or N ("sum": each row keeps its
weight). The anchor term −⟨g₀, θ − θ₀⟩ makes θ₀ stationary when nothing is removed (so an edit answers the removal
only, not the leftover gradient of an unfinished training run); for a model trained with an L2 penalty (δ/2)‖θ‖²
and λ = δ, J_S equals that penalised retrain objective up to a constant. The proximal term (λ/2)‖θ − θ₀‖² keeps
the retrain near θ₀: it stands in for the finite training that a real retrain from the same start would do
(docs/editing.md).

The code works with (M/N) J_S, whose minimiser is the same: the kept rows' terms stay in units of 1/N (as the
curvature products G = (1/N) Σ … below), and the anchor and proximal terms are scaled by M/N (``kept_share``).

Curvature products use the Gauss-Newton matrix G = (1/N) Σ w_i J_iᵀ H_i J_i (H_i: the loss Hessian in the
outputs, PSD), so every linear system (G_{−S} + (M/N)λI + μI) d = −∇J is positive definite.

Each product G v costs two backward passes over the kept rows (matrix-free), or, when the model's outputs are few
(classification or regression, not token logits) and the memory allows, next to nothing once the rows of a square
root of G are stored: H_i = L_i L_iᵀ with L_i's columns l_ik = √p_k (e_k − p) (cross-entropy) or e_k (mse), so
G = Σ_{i,k} (w_i/N) (J_iᵀ l_ik)(J_iᵀ l_ik)ᵀ, and the terms with the smallest ‖l_ik‖² whose sum is at most
``curvature_tol`` of the total (confidently classified rows, unlikely classes) are left out
(``StoredGaussNewton``, docs/editing.md).

The CG solves can be preconditioned (``EditOptions.preconditioner``): each layer's block of G is approximated by
a Kronecker product in the eigenbases of the Gram factors of its part of those square-root rows
(``edit_preconditioner.KroneckerPreconditioner``), fitted from the stored rows, or, asked for with matrix-free
products, from one pass over the kept rows' terms holding 1 − TRACE_TOL of the output-curvature weight.

Token datasets (an ``attention_mask``: Hugging Face and LoRA models) are run as the rest of the engine runs them
(``text.run_text_model``); for loss ``causal_lm`` H_i is the sum over the scored positions of the softmax
Hessians of the next-token logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from worker.attribution.edit_preconditioner import KroneckerPreconditioner, RankOneRows, RowPart
from worker.attribution.gradients import FisherLabels, batches, fitting_activities, model_dtype
from worker.attribution.hooks import (
    ActivityRecorder,
    TrackedLayer,
    evaluation_mode,
    layer_activations,
    layer_output_gradients,
    split_weight_matrix,
    weight_matrix,
)
from worker.attribution.losses import (
    LossName,
    check_targets,
    output_tensor,
    per_example_loss,
    scored_positions,
    without_padding,
)
from worker.attribution.options import (
    PLAIN_CG_ITERATIONS,
    PRECONDITIONED_CG_ITERATIONS,
    STORED_NEWTON_STEPS,
    CurvatureProducts,
    EditOptions,
    EditPreconditioner,
    KeptReduction,
)
from worker.attribution.pooling_layout import channels_last_max_pooling, max_pooling_layers
from worker.attribution.text import text_model_kwargs
from worker.attribution.types import AttributionError, Examples, Progress, no_progress

Flat = torch.Tensor
CURVATURE_SCALE_ROWS = 2048  # rows on which the mean Gauss-Newton eigenvalue is sampled (when not computed)
TRACE_TOL = 0.05  # the mean eigenvalue from the output terms that hold 1 − this of the output curvature weight
STORED_CURVATURE_BYTES = 512 * 2**20  # the most memory the stored square root of G may take ("auto" falls back)
STORED_CURVATURE_OUTPUTS = 1024  # the most model outputs per row for which the square root of G is stored
STORED_COST_SHARE = 0.5  # "auto" stores the rows of G when that costs at most this share of matrix-free products
LINE_SEARCH_HALVINGS = 12  # the line search's tries at 1, ½, ¼, … of its first scale
BOUNDARY_TOLERANCE = 1 / 32  # ``boundary`` line search: the edge is bracketed to within this share of its scale
EDGE_EVALUATIONS = 20  # ``boundary`` line search: the most values of J_S it computes
ARMIJO = 1e-4  # a scale s is acceptable when J_S falls by at least this share of the slope's prediction s ⟨∇J_S, d⟩
PRODUCT_BLOCK_ROWS = 256  # stored rows per block of a product (a block of a small model's rows stays in the cache)


# ---------------------------------------------------------------- flat vectors <-> layer matrices


def flat_parameters(layers: list[TrackedLayer]) -> Flat:
    """The tracked layers' weight matrices (bias as last column), flattened and concatenated."""
    return torch.cat([weight_matrix(layer).reshape(-1) for layer in layers])


def layer_matrices(layers: list[TrackedLayer], flat: Flat) -> dict[str, torch.Tensor]:
    """{layer name: (out_features, in_features)} views of a flat vector."""
    matrices, start = {}, 0
    for layer in layers:
        size = layer.out_features * layer.in_features
        matrices[layer.name] = flat[start : start + size].reshape(layer.out_features, layer.in_features)
        start += size
    return matrices


def state_entries(layers: list[TrackedLayer], flat: Flat) -> dict[str, torch.Tensor]:
    """{state_dict key: tensor} of the tracked layers for a flat vector."""
    entries: dict[str, torch.Tensor] = {}
    matrices = layer_matrices(layers, flat)
    for layer in layers:
        entries.update(split_weight_matrix(layer, matrices[layer.name]))
    return entries


def flat_from_state(layers: list[TrackedLayer], state: dict[str, torch.Tensor], like: Flat) -> Flat:
    """The tracked layers' entries of a state_dict as a flat vector (the layout of ``flat_parameters``)."""
    parts = []
    for layer in layers:
        prefix = f"{layer.name}." if layer.name else ""
        weight = state[prefix + "weight"].reshape(layer.out_features, -1)
        if layer.has_bias:
            weight = torch.cat([weight, state[prefix + "bias"].reshape(-1, 1)], dim=1)
        parts.append(weight.reshape(-1))
    return torch.cat(parts).to(like.device, like.dtype)


# ---------------------------------------------------------------- the objective


def output_hessian(
    outputs: torch.Tensor, loss: LossName, targets: torch.Tensor, scale: torch.Tensor | float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """u ↦ scale · H_i u_i for each row of a batch's ``outputs``: cross-entropy p ⊙ (u − ⟨p, u⟩) = (diag(p) − p pᵀ)
    u, mse (½‖·‖²) u; causal_lm: the cross-entropy product at each scored position of the (B, T, vocabulary)
    logits, 0 at the others. ``scale``: w_i / N (broadcast over the rows). Cross-entropy keeps the softmax of its
    few outputs for every product; causal_lm computes it at each product (kept, it would double the memory the
    operator holds: a batch's logits are already kept in its graph)."""
    if loss == "mse":
        return lambda tangent: tangent * scale
    if loss == "causal_lm":
        mask = scored_positions(targets).unsqueeze(-1)

        def token_product(tangent: torch.Tensor) -> torch.Tensor:
            p = torch.softmax(outputs.detach(), dim=-1) * mask.to(tangent.dtype)
            return p * scale * (tangent - (p * tangent).sum(-1, keepdim=True))

        return token_product
    p = torch.softmax(outputs.detach(), dim=-1)
    weighted = p * scale

    def product(tangent: torch.Tensor) -> torch.Tensor:
        return weighted * (tangent - (p * tangent).sum(-1, keepdim=True))

    return product


@dataclass
class ProximalObjective:
    """J_S of the module docstring for one model, its removed rows and a proximity λ (set later)."""

    model: nn.Module
    layers: list[TrackedLayer]
    train: Examples
    removed: torch.Tensor  # sorted unique row indices into train
    loss: LossName
    batch_size: int
    progress: Progress = no_progress
    proximity: float = 0.0
    linearised: bool = True  # build the curvature operator at θ₀ with the objective (False: no solve will follow)
    curvature_products: CurvatureProducts = "matrix_free"  # how G v is computed (EditOptions.curvature_products)
    curvature_tol: float = 0.0  # stored products: the share of the output-curvature terms' weight left out
    cg_max_iter: int | None = None  # products per solve (None: by the preconditioner; ``cg_iterations``)
    preconditioner_kind: EditPreconditioner = "none"  # the solves' preconditioner (EditOptions.preconditioner)
    reduction: KeptReduction = "mean"  # the retrain's loss over the kept rows: their mean, or Σ / N (EditOptions)
    theta0: Flat = field(init=False)
    removal_gradient: Flat = field(init=False)  # r = (1/N) Σ_{i∈S} w_i ∇ℓ_i(θ₀)
    anchor: Flat = field(init=False)  # g₀ = ∇L(θ₀) over all rows
    kept: Examples = field(init=False)
    passes: int = field(init=False, default=0)  # passes over the kept rows (forward, gradient or GN product)
    curvature_report: dict[str, Any] = field(init=False, default_factory=dict)  # how the last operator was built
    # the kept rows' curvature trace at θ₀ when their square-root rows were formed (stored, or fitting the
    # preconditioner): (trace of the terms kept, share of the weight left out, the tolerance that left it out)
    kept_curvature_trace: tuple[float, float, float] | None = field(init=False, default=None)
    preconditioner: KroneckerPreconditioner | None = field(init=False, default=None)  # fitted at θ₀
    preconditioner_report: str | None = field(init=False, default=None)  # which, or why none (set at θ₀)

    def __post_init__(self) -> None:
        self.device = next(self.model.parameters()).device
        self.dtype = model_dtype(self.model)
        self.theta0 = flat_parameters(self.layers).to(self.device, self.dtype)
        tracked = set(state_entries(self.layers, self.theta0))
        self.frozen = {key: value.detach() for key, value in self.model.named_parameters() if key not in tracked}
        self.pooling_layers = max_pooling_layers(self.model)  # pooled channels-last in forward-only passes
        keep = torch.ones(len(self.train), dtype=torch.bool)
        keep[self.removed] = False
        self.kept = self.train.subset(torch.nonzero(keep).reshape(-1))
        self.n = len(self.train)
        # one forward pass over the kept rows at θ₀ gives their loss, their gradient and the curvature operator
        # of the first solve (kept until that solve takes it: ``curvature_operator``)
        self._start_operator: Callable[[Flat], Flat] | None = None
        if self.linearised:
            kept_loss, kept_gradient, self._start_operator = self.linearise(self.theta0)
        else:
            kept_loss, kept_gradient = self.kept_loss_and_gradient(self.theta0)
        self.kept_loss0 = kept_loss  # (M/N) J_S(θ₀) = this
        removed_rows = self.train.subset(self.removed)
        self.removal_gradient = self._loss_and_gradient(removed_rows, self.theta0)[1]
        self.anchor = kept_gradient + self.removal_gradient
        # (M/N) J_S: the kept rows' terms in units of 1/N, the anchor and proximal terms scaled by M/N
        self.kept_share = len(self.kept) / self.n if self.reduction == "mean" else 1.0
        self.anchor_term = self.kept_share * self.anchor
        # ∇(M/N) J_S at θ₀: −r with the sum; (1 − M/N) g₀ − r with the mean (the kept rows' gradient − (M/N) g₀)
        self.gradient0 = -self.removal_gradient if self.reduction == "sum" else kept_gradient - self.anchor_term
        self._last_kept_loss: tuple[Flat, float] | None = None  # (θ, Σ_{kept} w ℓ / N) of the last value()

    # -- the model as a function of the flat tracked parameters
    def _outputs(self, flat: Flat, batch: Examples) -> torch.Tensor:
        """The model's outputs on ``batch`` with the tracked parameters ``flat``. Forward-only passes (gradients
        off: the line search's, the curvature trace's) max-pool channels-last on the CPU (``pooling_layout``)."""
        mask = batch.attention_mask
        kwargs = {} if mask is None else text_model_kwargs(mask)
        forward_only = bool(self.pooling_layers) and not torch.is_grad_enabled()
        layout = channels_last_max_pooling(self.pooling_layers) if forward_only else nullcontext()
        with layout:
            outputs = functional_call(
                self.model, {**self.frozen, **state_entries(self.layers, flat)}, (batch.inputs,), kwargs
            )
        return without_padding(output_tensor(outputs), mask)

    def _batches(self, examples: Examples) -> list[Examples]:
        return [batch for _, batch in batches(examples, self.batch_size, self.device, self.dtype)]

    def _loss_and_gradient(self, examples: Examples, flat: Flat) -> tuple[float, Flat]:
        """(Σ w_i ℓ_i / N, its gradient) over ``examples`` at ``flat``."""
        total, gradient = 0.0, torch.zeros_like(flat)
        for batch in self._batches(examples):
            point = flat.detach().requires_grad_(True)
            value, _ = self._batch_loss(point, batch)
            gradient += torch.autograd.grad(value, point)[0]
            total += float(value.detach())
        return total, gradient

    def _batch_loss(self, point: Flat, batch: Examples) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ w_i ℓ_i / N over ``batch`` at ``point``, the batch's outputs)."""
        outputs = self._outputs(point, batch)
        targets = check_targets(outputs, batch.targets, self.loss)
        values = per_example_loss(outputs, targets, self.loss)
        if batch.weights is not None:
            values = values * batch.weights
        return values.sum() / self.n, outputs

    def kept_loss_and_gradient(self, flat: Flat) -> tuple[float, Flat]:
        self.passes += 1
        return self._loss_and_gradient(self.kept, flat)

    def kept_loss(self, flat: Flat) -> float:
        """Σ_{i∉S} w_i ℓ_i / N at ``flat`` (forward passes only; θ₀ and the last point of ``value`` are cached)."""
        if torch.equal(flat, self.theta0):
            return self.kept_loss0
        if self._last_kept_loss is not None and torch.equal(flat, self._last_kept_loss[0]):
            return self._last_kept_loss[1]
        self.passes += 1
        with torch.no_grad():
            total = 0.0
            for batch in self._batches(self.kept):
                outputs = self._outputs(flat, batch)
                values = per_example_loss(outputs, check_targets(outputs, batch.targets, self.loss), self.loss)
                total += float((values * batch.weights).sum() if batch.weights is not None else values.sum())
        self._last_kept_loss = (flat.detach().clone(), total / self.n)
        return total / self.n

    def mean_eigenvalue(self) -> tuple[float, str] | None:
        """(trace(G)/D at θ₀ over every training row, how it was computed), without sampling; None when the rows
        of G cannot be formed (``mean_curvature_eigenvalue`` then samples it). Each trace is the square-root rows'
        squared norms over the output terms kept, divided by the share of the output-curvature weight they hold:
        where the kept rows' were stored, with those (exact but for ``curvature_tol``) plus the removed rows'; else
        over every row from the terms holding 1 − TRACE_TOL of the weight (within 1% of the exact trace on the
        benchmark's models)."""
        parts: list[tuple[float, float]] | None = None  # (trace of some rows' kept terms, share left out)
        rule = "exact trace"
        if self.kept_curvature_trace is not None:
            kept_trace, kept_share, tol = self.kept_curvature_trace
            removed = curvature_trace(self, self.train.subset(self.removed), self.theta0, tol)
            if removed is not None:
                parts = [(kept_trace, kept_share), removed]
                if tol > self.curvature_tol:
                    rule = f"trace over the output terms holding {1 - tol:.0%} of the weight"
        if parts is None:
            whole = curvature_trace(self, self.train, self.theta0, TRACE_TOL)
            if whole is None:
                return None
            parts, rule = [whole], f"trace over the output terms holding {1 - TRACE_TOL:.0%} of the weight"
        trace = sum(value / (1 - share) for value, share in parts)
        return _checked_eigenvalue(trace / self.theta0.numel()), rule

    @cached_property
    def implied_weight_decay(self) -> tuple[float, float]:
        """(δ̂, cos(g₀, −θ₀)): the L2 penalty that the full data's loss gradient g₀ at θ₀ shows, δ̂ = −⟨g₀, θ₀⟩ /
        ‖θ₀‖², the least-squares δ of g₀ = −δ θ₀ (a stationary point of the loss + (δ/2)‖θ‖²), and how much of g₀
        it explains (1: all of it). (0, 0) where θ₀ or g₀ is zero. Free: g₀ is the objective's anchor; read once."""
        gradient_norm, weight_norm = float(self.anchor.norm()), float(self.theta0.norm())
        if gradient_norm == 0.0 or weight_norm == 0.0:
            return 0.0, 0.0
        along = -float(self.anchor @ self.theta0)
        return along / weight_norm**2, along / (gradient_norm * weight_norm)

    @property
    def damping(self) -> float:
        """(M/N) λ: the proximal term's weight in (M/N) J_S, the damping of its Gauss-Newton solves."""
        return self.kept_share * self.proximity

    def mean_kept_loss(self, flat: Flat) -> float:
        """The remaining rows' mean loss Σ_{i∉S} w_i ℓ_i / |kept| at ``flat`` (a diagnostic)."""
        return self.kept_loss(flat) * self.n / max(len(self.kept), 1)

    def value(self, flat: Flat) -> float:
        """(M/N) J_S(θ) alone (forward passes only)."""
        step = flat - self.theta0
        return self.kept_loss(flat) - float(self.anchor_term @ step) + 0.5 * self.damping * float(step @ step)

    def value_and_gradient(self, flat: Flat) -> tuple[float, Flat]:
        """(M/N) J_S(θ) and its gradient."""
        return self._with_kept_terms(flat, *self.kept_loss_and_gradient(flat))

    def linearised_objective(self, flat: Flat) -> tuple[float, Flat, Callable[[Flat], Flat]]:
        """(M/N) J_S(θ), its gradient and v ↦ G_{−S}(θ) v at θ = ``flat``, from one linearisation of the kept rows."""
        kept_loss, kept_gradient, operator = self.linearise(flat)
        return *self._with_kept_terms(flat, kept_loss, kept_gradient), operator

    def _with_kept_terms(self, flat: Flat, kept_loss: float, kept_gradient: Flat) -> tuple[float, Flat]:
        """(M/N) J_S(θ) and its gradient from the kept rows' Σ w_i ℓ_i / N and its gradient at θ = ``flat``."""
        step = flat - self.theta0
        value = kept_loss - float(self.anchor_term @ step) + 0.5 * self.damping * float(step @ step)
        return value, kept_gradient - self.anchor_term + self.damping * step

    def curvature_product(self, flat: Flat, vector: Flat) -> Flat:
        """G_{−S}(θ) v: the kept rows' Gauss-Newton product (1/N) Σ w_i J_iᵀ H_i J_i v."""
        return self.curvature_operator(flat)(vector)

    def curvature_operator(self, flat: Flat) -> Callable[[Flat], Flat]:
        """v ↦ G_{−S}(θ) v at a fixed θ (at θ₀ the first call takes the operator built with the objective)."""
        if self._start_operator is not None and flat is self.theta0:
            operator, self._start_operator = self._start_operator, None
            return operator
        return self.linearise(flat)[2]

    def linearise(self, flat: Flat) -> tuple[float, Flat, Callable[[Flat], Flat]]:
        """The kept rows' Σ w_i ℓ_i / N, its gradient, and v ↦ G_{−S}(θ) v, all at θ = ``flat``: with stored
        square-root rows of G (``StoredGaussNewton``) when ``curvature_products`` allows it, else matrix-free.
        At θ₀ it also fits the solves' preconditioner (``preconditioner_kind`` ``kronecker``, or ``auto`` with
        stored rows)."""
        linearised = self._linearise_products(flat)
        if flat is self.theta0 and self.preconditioner_report is None:
            if self.preconditioner is not None:
                self.preconditioner_report = "kronecker"
            elif self.preconditioner_kind == "auto":
                self.preconditioner_report = "none (auto: the preconditioner is fitted where the rows of G are stored)"
            else:
                self.preconditioner_report = "none"
        if self.preconditioner_report is not None:  # the one fitted at θ₀ serves every later solve
            self.curvature_report["preconditioner"] = self.preconditioner_report
        return linearised

    def cg_iterations(self) -> int:
        """Products per CG solve: ``cg_max_iter``, or by default PRECONDITIONED_CG_ITERATIONS with the fitted
        preconditioner and PLAIN_CG_ITERATIONS without."""
        if self.cg_max_iter is not None:
            return self.cg_max_iter
        return PRECONDITIONED_CG_ITERATIONS if self.preconditioner is not None else PLAIN_CG_ITERATIONS

    def default_iterations(self, stored: bool) -> int:
        """``cg_iterations`` for stored (True) or matrix-free products, before the operator is built."""
        if self.cg_max_iter is not None:
            return self.cg_max_iter
        fitted = self.preconditioner_kind == "kronecker" or (stored and self.preconditioner_kind == "auto")
        return PRECONDITIONED_CG_ITERATIONS if fitted else PLAIN_CG_ITERATIONS

    def _linearise_products(self, flat: Flat) -> tuple[float, Flat, Callable[[Flat], Flat]]:
        if self.curvature_products != "matrix_free":
            reason = self._stored_unavailable()
            if reason is None:
                stored = self._linearise_stored(flat)
                if isinstance(stored, str):
                    reason = stored
                else:
                    return stored
            if self.curvature_products == "stored":
                raise AttributionError(f"curvature_products 'stored' is not possible here: {reason}")
            self.curvature_report = {"products": "matrix_free", "reason": reason}
        else:
            self.curvature_report = {"products": "matrix_free", "reason": "asked for"}
        return self._linearise_matrix_free(flat)

    def _stored_unavailable(self) -> str | None:
        """Why the square root of G cannot be stored for these rows (None: it can, if the memory allows)."""
        if len(self.kept) == 0:
            return "no remaining rows"
        if self.loss == "causal_lm" or self.kept.attention_mask is not None:
            return "token datasets have an output per token and vocabulary entry"
        if self.kept.weights is not None and bool((self.kept.weights < 0).any()):
            return "negative row weights (the Gauss-Newton matrix is then not a sum of squares)"
        return None

    def _linearise_stored(self, flat: Flat) -> tuple[float, Flat, Callable[[Flat], Flat]] | str:
        """``linearise`` with stored square-root rows of G_{−S}(θ); a string (why not) when the model has too
        many outputs per row or the rows would not fit in STORED_CURVATURE_BYTES (``StoredGaussNewton.build``),
        or (``auto``) the tracked layers are linear layers only or the stored rows would save too little."""
        positions = self._positions(flat)
        if self.curvature_products == "auto" and all(count <= 1 for count in positions.values()):
            return "linear layers only: a stored product costs about as much as a matrix-free one"
        self.passes += 1
        point = flat.detach().requires_grad_(True)
        total, gradient = 0.0, torch.zeros_like(flat)
        outputs = []
        for batch in self._batches(self.kept):
            value, output = self._batch_loss(point, batch)
            gradient += torch.autograd.grad(value, point)[0]
            total += float(value.detach())
            outputs.append(output.detach().flatten(1))
        stored = StoredGaussNewton.build(self, point, torch.cat(outputs).cpu(), self.curvature_tol, positions)
        if isinstance(stored, str):
            return stored
        self.passes += 1
        self.curvature_report = stored.report()
        if flat is self.theta0:
            self.kept_curvature_trace = (stored.trace, stored.dropped_share, self.curvature_tol)
            if self.preconditioner_kind in ("kronecker", "auto"):
                self.preconditioner = KroneckerPreconditioner(self.layers)
                for parts in stored.chunks:
                    self.preconditioner.add(parts)
                self.preconditioner.finish(stored.dropped_share)
        return total, gradient, stored.product

    def _positions(self, flat: Flat) -> dict[str, int]:
        """Each tracked layer's positions per row (convolutions: output pixels; summed over a layer's calls),
        from a forward pass over one kept row."""
        positions = {layer.name: 0 for layer in self.layers}

        def counter(layer: TrackedLayer) -> Callable[..., None]:
            def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                positions[layer.name] += output.numel() // max(1, output.shape[0] * layer.out_features)

            return hook

        handles = [layer.module.register_forward_hook(counter(layer)) for layer in self.layers]
        try:
            with torch.no_grad():
                self._outputs(flat, self._batches(self.kept.subset(torch.arange(1)))[0])
        finally:
            for handle in handles:
                handle.remove()
        return positions

    def _linearise_matrix_free(self, flat: Flat) -> tuple[float, Flat, Callable[[Flat], Flat]]:
        """The kept rows' Σ w_i ℓ_i / N, its gradient, and v ↦ G_{−S}(θ) v, all at θ = ``flat`` from one forward
        pass per batch. The graph of each batch's vector-Jacobian map u ↦ Jᵀu is kept while the operator lives;
        a product then costs backward passes only: J v as the derivative of ⟨Jᵀu, v⟩ in u (the double-backward
        trick), and Jᵀ (H J v). (Forward-mode ``jvp`` re-runs the forward pass at every product, and
        ``torch.func.linearize`` traces the model first: both cost more on the benchmark's models.)"""
        self.passes += 1
        point = flat.detach().requires_grad_(True)
        maps = []
        total, gradient = 0.0, torch.zeros_like(flat)
        for batch in self._batches(self.kept):
            # the products differentiate Jᵀu again: attention must run as plain ops (the fused scaled-dot-product
            # kernels have no double backward)
            with sdpa_kernel(SDPBackend.MATH):
                outputs = self._outputs(point, batch)
                targets = check_targets(outputs, batch.targets, self.loss)
                dual = torch.zeros_like(outputs, requires_grad=True)
                transposed = torch.autograd.grad(outputs, point, dual, create_graph=True)[0]  # Jᵀu, linear in u
            scale: torch.Tensor | float = 1.0 / self.n
            if batch.weights is not None:
                scale = batch.weights.reshape(-1, *([1] * (outputs.dim() - 1))) / self.n
            maps.append((outputs, dual, transposed, output_hessian(outputs, self.loss, targets, scale)))
            logits = outputs.detach().requires_grad_(True)
            values = per_example_loss(logits, targets, self.loss)
            if batch.weights is not None:
                values = values * batch.weights
            value = values.sum() / self.n
            output_gradient = torch.autograd.grad(value, logits)[0]
            total += float(value.detach())
            gradient += torch.autograd.grad(outputs, point, output_gradient, retain_graph=True)[0].detach()
        if flat is self.theta0 and self.preconditioner_kind == "kronecker":
            self._fit_preconditioner()

        def apply(vector: Flat) -> Flat:
            self.passes += 1
            result = torch.zeros_like(vector)
            for outputs, dual, transposed, hessian in maps:
                pushed = torch.autograd.grad(transposed, dual, vector, retain_graph=True)[0]  # J v
                result += torch.autograd.grad(outputs, point, hessian(pushed), retain_graph=True)[0].detach()
            return result

        return total, gradient, apply

    def _fit_preconditioner(self) -> None:
        """Matrix-free edits: the preconditioner at θ₀ from the square-root rows of the kept rows' terms that hold
        1 − TRACE_TOL of the output curvature weight (formed chunk by chunk, not kept; their trace is the kept
        part of ``mean_eigenvalue``). Left unset where those rows cannot be formed (``curvature_trace``)."""
        preconditioner = KroneckerPreconditioner(self.layers)
        traced = curvature_trace(self, self.kept, self.theta0, TRACE_TOL, preconditioner)
        if traced is None:
            self.preconditioner_report = "none: the square-root rows of G cannot be formed here"
            return
        preconditioner.finish(traced[1])
        self.preconditioner = preconditioner
        self.kept_curvature_trace = (traced[0], traced[1], TRACE_TOL)


def output_curvature_weights(outputs: torch.Tensor, loss: LossName, weights: torch.Tensor | None, n: int) -> Flat:
    """(rows, C) ‖c_ik‖² of the columns c_ik = √(w_i/N) l_ik of the output-Hessian square roots, H_i = L_i L_iᵀ:
    cross-entropy l_ik = √p_k (e_k − p) (‖l_ik‖² = p_k (1 − 2 p_k + ‖p‖²), summing to trace H_i = 1 − ‖p‖²);
    mse l_ik = e_k."""
    scale = torch.full((outputs.shape[0], 1), 1.0 / n, dtype=torch.float64, device=outputs.device)
    if weights is not None:
        scale = scale * weights.to(outputs.device, torch.float64).reshape(-1, 1)
    if loss == "mse":
        return scale.expand(-1, outputs.shape[1]).clone()
    p = torch.softmax(outputs.double(), dim=1)
    return scale * p * (1 - 2 * p + p.pow(2).sum(1, keepdim=True)).clamp_min(0)


def kept_output_terms(values: Flat, tol: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The (row, output) terms kept from the (rows, C) weights ``values``: all but the smallest ones whose sum
    is at most ``tol`` of the total. Returns rows and outputs (sorted by row) and the share of the total left out."""
    flat = values.reshape(-1)
    total = float(flat.sum())
    order = torch.argsort(flat)
    dropped = int(torch.searchsorted(torch.cumsum(flat[order], 0), tol * total, right=True)) if total > 0 else 0
    chosen = torch.sort(order[dropped:]).values
    share = float(flat[order[:dropped]].sum()) / total if total > 0 else 0.0
    columns = values.shape[1]
    return chosen // columns, chosen % columns, share


def stored_cost_share(
    layers: list[TrackedLayer],
    positions: dict[str, int],
    terms: int,
    rows: int,
    kept: int,
    iterations: int,
    free_iterations: int | None = None,
) -> float:
    """Multiply-adds of stored products over those of matrix-free products for one solve of ``iterations`` stored
    CG products against ``free_iterations`` (default: as many) matrix-free ones (a rough model: the preconditioner
    that stored rows come with takes fewer products). With F = Σ_l T_l D_l per row (T_l positions, D_l parameters
    of layer l), matrix-free costs 3 F per row and product; stored costs 3 F per term to build (a forward and a
    backward pass), T_l D_l per term for each layer with positions (its per-example gradient), and per product
    2 D_l per term (layers with positions) or 2 D_l per row (linear layers, held as factors)."""
    spread = sum(positions.get(layer.name, 1) * layer.num_parameters for layer in layers)
    with_positions = [layer for layer in layers if positions.get(layer.name, 1) > 1]
    single = [layer for layer in layers if positions.get(layer.name, 1) <= 1]
    build = terms * (3 * spread + sum(positions[layer.name] * layer.num_parameters for layer in with_positions))
    products = (
        iterations
        * 2
        * (
            terms * sum(layer.num_parameters for layer in with_positions)
            + rows * sum(layer.num_parameters for layer in single)
            + terms * sum(layer.out_features for layer in single)
        )
    )
    free = iterations if free_iterations is None else free_iterations
    return (build + products) / max(1, free * 3 * kept * spread)


def _whole_row_chunks(rows: torch.Tensor, size: int) -> list[tuple[int, int]]:
    """[first, last) ranges of the term list ``rows`` (a row's terms consecutive) with at most ``size`` terms
    each, or one row's terms, never splitting a row."""
    _, counts = torch.unique_consecutive(rows, return_counts=True)
    chunks, first, last = [], 0, 0
    for count in counts.tolist():
        if last > first and last + count - first > size:
            chunks.append((first, last))
            first = last
        last += count
    if last > first:
        chunks.append((first, last))
    return chunks


def _grouped_example_gradients(a: torch.Tensor, g: torch.Tensor, groups: list[tuple[int, int]]) -> torch.Tensor:
    """(terms, d_out · d_in) per-example gradients Σ_t g_mt a_ut ᵀ of terms m with output gradients g (terms, T,
    d_out) and their rows u's inputs a (rows, T, d_in), for terms grouped as ``groups``: (k, rows with k terms)
    in order, each row's k terms consecutive."""
    terms, positions, d_out = g.shape
    d_in = a.shape[2]
    result = g.new_empty(terms, d_out * d_in)
    term, row = 0, 0
    for k, count in groups:
        gradients = g[term : term + count * k].reshape(count, k, positions, d_out).transpose(2, 3)
        torch.bmm(
            gradients.reshape(count, k * d_out, positions),
            a[row : row + count],
            out=result[term : term + count * k].view(count, k * d_out, d_in),
        )
        term, row = term + count * k, row + count
    return result


@dataclass
class StoredGaussNewton:
    """G_{−S}(θ) = Σ_{(i,k) kept} (J_iᵀ c_ik)(J_iᵀ c_ik)ᵀ held as its rows J_iᵀ c_ik, one per kept (row, output)
    term (``output_curvature_weights``, ``kept_output_terms``). Each layer's part of the rows is held as the
    per-example gradient matrices (layers with positions: convolutions) or as the factors a and g of g aᵀ (one
    position: linear layers). Built with one forward and one backward pass over the terms' rows (a row repeated
    once per kept output); a product is then two matrix-vector products per layer, without the data."""

    layers: list[TrackedLayer]
    chunks: list[list[RowPart]]  # per chunk of whole rows, per layer
    terms: int
    rows: int
    candidates: int
    dropped_share: float
    trace: float  # Σ_m ‖r_m‖² = trace(G_{−S}(θ)) less the terms left out

    @classmethod
    def build(
        cls, objective: ProximalObjective, point: Flat, outputs: torch.Tensor, tol: float, positions: dict[str, int]
    ) -> StoredGaussNewton | str:
        """The rows at θ = ``point`` (requiring grad) for the kept rows' ``outputs`` (rows, C, on the CPU) at θ; a string
        (why not) when C > STORED_CURVATURE_OUTPUTS, the rows would take more than STORED_CURVATURE_BYTES, or
        (``auto``) they would not save half of the matrix-free products' work (``stored_cost_share``).
        ``positions``: each tracked layer's positions per row."""
        if outputs.shape[1] > STORED_CURVATURE_OUTPUTS:
            return f"{outputs.shape[1]} outputs per row (more than {STORED_CURVATURE_OUTPUTS})"
        kept = objective.kept
        values = output_curvature_weights(outputs, objective.loss, kept.weights, objective.n)
        rows, columns, share = kept_output_terms(values, tol)
        if objective.curvature_products == "auto":
            cost = stored_cost_share(
                objective.layers,
                positions,
                len(rows),
                int(torch.unique(rows).numel()),
                len(kept),
                objective.default_iterations(stored=True),
                objective.default_iterations(stored=False),
            )
            if cost > STORED_COST_SHARE:
                return (
                    f"storing the {len(rows)} square-root rows of G and their products would cost about "
                    f"{cost:.2f} of the matrix-free products' work (linear layers gain little)"
                )
        chunks: list[list[RowPart]] = []
        stored_bytes, stored_terms, trace = 0, 0, 0.0
        for parts in square_root_rows(objective, kept, point, outputs, rows, columns):
            if isinstance(parts, str):
                return parts
            chunks.append(parts)
            stored_bytes += sum(_part_bytes(part) for part in parts)
            stored_terms += _part_terms(parts[0])
            trace += sum(_part_squared_norm(part) for part in parts)
            estimate = stored_bytes * len(rows) / stored_terms
            if estimate > STORED_CURVATURE_BYTES:
                return (
                    f"the {len(rows)} square-root rows of G would take about {estimate / 2**20:.0f} MiB "
                    f"(more than {STORED_CURVATURE_BYTES / 2**20:.0f} MiB)"
                )
        return cls(objective.layers, chunks, len(rows), int(values.shape[0]), int(values.numel()), share, trace)

    def product(self, vector: Flat) -> Flat:
        """G v = Σ_m r_m ⟨r_m, v⟩ over the stored rows r_m. Per-example gradient matrices are read in blocks of
        PRODUCT_BLOCK_ROWS terms, for ⟨r_m, v⟩ and again, from the cache, for Σ_m r_m ⟨r_m, v⟩; the factors of
        linear layers multiply V once per row, not per term."""
        matrices = layer_matrices(self.layers, vector)
        result = {layer.name: torch.zeros_like(matrices[layer.name]) for layer in self.layers}
        for parts in self.chunks:
            factored: list[tuple[str, RankOneRows]] = []
            dense: list[tuple[str, torch.Tensor]] = []
            for layer, part in zip(self.layers, parts, strict=True):
                if isinstance(part, RankOneRows):
                    factored.append((layer.name, part))
                else:
                    dense.append((layer.name, part))
            terms = factored[0][1].g.shape[0] if factored else dense[0][1].shape[0]
            dots = vector.new_zeros(terms)
            for name, factors in factored:
                dots += ((factors.a @ matrices[name].T)[factors.row] * factors.g).sum(1)
            for first in range(0, terms, PRODUCT_BLOCK_ROWS):
                block = slice(first, first + PRODUCT_BLOCK_ROWS)
                for name, gradients in dense:
                    dots[block] += gradients[block] @ matrices[name].reshape(-1)
                for name, gradients in dense:
                    result[name] += (dots[block] @ gradients[block]).reshape(result[name].shape)
            for name, factors in factored:
                per_row = factors.a.new_zeros(factors.a.shape[0], factors.g.shape[1])
                per_row.index_add_(0, factors.row, factors.g * dots.unsqueeze(1))
                result[name] += per_row.T @ factors.a
        return torch.cat([result[layer.name].reshape(-1) for layer in self.layers])

    def report(self) -> dict[str, Any]:
        return {
            "products": "stored",
            "stored_terms": self.terms,
            "candidate_terms": self.candidates,
            "left_out_share": self.dropped_share,
        }


def square_root_rows(
    objective: ProximalObjective,
    examples: Examples,
    point: Flat,
    outputs: torch.Tensor,
    rows: torch.Tensor,
    columns: torch.Tensor,
) -> Iterator[list[RowPart] | str]:
    """The square-root rows J_iᵀ c_ik of the terms (rows, columns) of ``examples`` at θ = ``point`` (requiring
    grad), one list per chunk of whole rows with each tracked layer's part (``StoredGaussNewton``), from one
    forward and one backward pass over the terms' rows. ``outputs``: the examples' outputs (rows, C) at θ, on the
    CPU. Yields a string (why not) when a tracked layer is not called in the forward pass."""
    probabilities = torch.softmax(outputs.double(), dim=1) if objective.loss == "cross_entropy" else None
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {layer.name: [] for layer in objective.layers}

    def recorder(layer: TrackedLayer) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            calls[layer.name].append((inputs[0].detach(), output))
            return output.clone()  # later in-place ops (ReLU(inplace=True)) act on the copy

        return hook

    # terms ordered by their row's number of terms, then by row: each chunk holds whole rows, and the rows with
    # k terms are consecutive, so a layer's per-example gradients are one batched product per k with the
    # inputs of each row (unfolded once per row, never copied per term)
    counts = torch.bincount(rows, minlength=int(outputs.shape[0]))
    order = torch.sort(counts[rows], stable=True).indices
    rows, columns = rows[order], columns[order]
    handles = [layer.module.register_forward_hook(recorder(layer)) for layer in objective.layers]
    try:
        for first, last in _whole_row_chunks(rows, max(1, objective.batch_size)):
            row, column = rows[first:last], columns[first:last]
            coefficients = _coefficients(objective.n, examples.weights, probabilities, outputs.shape[1], row, column)
            for recorded in calls.values():
                recorded.clear()
            batch = objective._batches(examples.subset(row))[0]
            output = objective._outputs(point, batch).flatten(1)
            layer_outputs = [out for layer in objective.layers for _, out in calls[layer.name]]
            if any(not calls[layer.name] for layer in objective.layers):
                yield "a tracked layer is not called in the forward pass"
                return
            objective_value = (output * coefficients.to(output.device, output.dtype)).sum()
            grads = torch.autograd.grad(objective_value, layer_outputs, allow_unused=True)
            _, inverse, per_row = torch.unique_consecutive(row, return_inverse=True, return_counts=True)
            firsts = (torch.cumsum(per_row, 0) - per_row).to(output.device)
            inverse = inverse.to(output.device)
            sizes, rows_of_size = torch.unique_consecutive(per_row, return_counts=True)
            groups = list(zip(sizes.tolist(), rows_of_size.tolist(), strict=True))
            parts: list[RowPart] = []
            position = 0
            for layer in objective.layers:
                acts, gs = [], []
                for x, out in calls[layer.name]:
                    grad = grads[position]
                    position += 1
                    gs.append(layer_output_gradients(layer, torch.zeros_like(out) if grad is None else grad))
                    acts.append(layer_activations(layer, x[firsts]))
                a, g = (acts[0], gs[0]) if len(acts) == 1 else (torch.cat(acts, dim=1), torch.cat(gs, dim=1))
                if a.shape[1] == 1:  # g aᵀ: keep the factors, a once per row
                    parts.append(RankOneRows(a[:, 0], g[:, 0].contiguous(), inverse))
                else:
                    parts.append(_grouped_example_gradients(a, g, groups))
            yield parts
    finally:
        for handle in handles:
            handle.remove()


def _coefficients(
    n: int,
    weights: torch.Tensor | None,
    probabilities: torch.Tensor | None,
    width: int,
    row: torch.Tensor,
    column: torch.Tensor,
) -> torch.Tensor:
    """c_ik = √(w_i/N) l_ik for the terms (row, column), in the model outputs' layout (float64)."""
    picks = torch.arange(len(row))
    if probabilities is None:  # mse
        coefficients = torch.zeros(len(row), width, dtype=torch.float64)
        coefficients[picks, column] = 1.0
    else:
        p = probabilities[row]
        picked = p[picks, column].sqrt()
        coefficients = -picked.unsqueeze(1) * p
        coefficients[picks, column] += picked
    scale = torch.full((len(row), 1), 1.0 / n, dtype=torch.float64)
    if weights is not None:
        scale = scale * weights[row].double().reshape(-1, 1)
    return coefficients * scale.sqrt()


def _part_terms(part: RowPart) -> int:
    return int(part.g.shape[0]) if isinstance(part, RankOneRows) else int(part.shape[0])


def _part_bytes(part: RowPart) -> int:
    tensors = (part.a, part.g, part.row) if isinstance(part, RankOneRows) else (part,)
    return sum(t.numel() * t.element_size() for t in tensors)


def _part_squared_norm(part: RowPart) -> float:
    """Σ_m ‖r_m‖² of a layer's part of the rows (‖g aᵀ‖² = ‖g‖² ‖a‖² for factors)."""
    if isinstance(part, RankOneRows):
        return float((part.g.double().pow(2).sum(1) * part.a.double().pow(2).sum(1)[part.row]).sum())
    return float(torch.linalg.vector_norm(part)) ** 2  # no copy of the (terms, D) matrix


def curvature_trace(
    objective: ProximalObjective,
    examples: Examples,
    point: Flat,
    tol: float,
    preconditioner: KroneckerPreconditioner | None = None,
) -> tuple[float, float] | None:
    """(trace((1/N) Σ_{i ∈ examples} w_i J_iᵀ H_i J_i) less the output terms worth at most ``tol`` of the output
    curvature weight, that share) at θ = ``point``, from the square-root rows of the terms kept (chunk by chunk, not
    kept). None when they cannot be formed: token datasets, more than STORED_CURVATURE_OUTPUTS outputs per row,
    negative row weights, or a tracked layer that the forward pass does not call. ``preconditioner``: also
    given every chunk of those rows."""
    if len(examples) == 0:
        return 0.0, 0.0
    if objective.loss == "causal_lm" or examples.attention_mask is not None:
        return None
    if examples.weights is not None and bool((examples.weights < 0).any()):
        return None
    with torch.no_grad():
        outputs = torch.cat([objective._outputs(point, batch).flatten(1) for batch in objective._batches(examples)])
    if outputs.shape[1] > STORED_CURVATURE_OUTPUTS:
        return None
    outputs = outputs.cpu()
    values = output_curvature_weights(outputs, objective.loss, examples.weights, objective.n)
    rows, columns, share = kept_output_terms(values, tol)
    total = 0.0
    for parts in square_root_rows(objective, examples, point.detach().requires_grad_(True), outputs, rows, columns):
        if isinstance(parts, str):
            return None
        total += sum(_part_squared_norm(part) for part in parts)
        if preconditioner is not None:
            preconditioner.add(parts)
    return total, share


def _checked_eigenvalue(value: float) -> float:
    if not value > 0 or value == float("inf"):
        raise AttributionError(
            "the model has no curvature on the training data (zero or non-finite gradients); "
            "give options.proximity explicitly"
        )
    return value


def mean_curvature_eigenvalue(
    model: nn.Module, layers: list[TrackedLayer], train: Examples, loss: LossName, batch_size: int, seed: int = 0
) -> float:
    """trace(G) / D over the tracked parameters: the mean squared norm of per-example gradients with labels
    sampled from the model (the true Fisher, = Gauss-Newton for these losses), on up to CURVATURE_SCALE_ROWS rows."""
    rows = (
        train
        if len(train) <= CURVATURE_SCALE_ROWS
        else train.subset(
            torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:CURVATURE_SCALE_ROWS]
        )
    )
    device, dtype = next(model.parameters()).device, model_dtype(model)
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with evaluation_mode(model), ActivityRecorder(layers) as recorder:
        for _, batch in batches(rows, batch_size, device, dtype):
            for activities in fitting_activities(
                model, recorder, batch, loss, FisherLabels("true", 1, seed), generator
            ):
                total += float(sum(activities[layer.name].squared_norms().sum() for layer in layers))
    size = sum(layer.num_parameters for layer in layers)
    return _checked_eigenvalue(total / (len(rows) * size))


# ---------------------------------------------------------------- solvers


@dataclass
class CGResult:
    solution: Flat
    iterations: int
    relative_residual: float


def conjugate_gradient(
    matvec: Callable[[Flat], Flat],
    rhs: Flat,
    tol: float,
    max_iter: int,
    preconditioner: Callable[[Flat], Flat] | None = None,
) -> CGResult:
    """CG for an SPD system A x = rhs, from x = 0, preconditioned by the SPD map ``preconditioner`` ≈ A⁻¹ if
    given; stops at ‖r‖ ≤ tol ‖rhs‖ or after max_iter iterations."""
    precondition = preconditioner if preconditioner is not None else (lambda vector: vector)
    x = torch.zeros_like(rhs)
    residual = rhs.clone()
    norm0 = float(rhs.norm())
    if norm0 == 0.0:
        return CGResult(x, 0, 0.0)
    preconditioned = precondition(residual)
    direction = preconditioned.clone()
    rz = float(residual @ preconditioned)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007  (the count is reported after the loop)
        product = matvec(direction)
        curvature = float(direction @ product)
        if not curvature > 0:
            raise AttributionError("the edit's curvature system is not positive definite (non-finite values?)")
        alpha = rz / curvature
        x = x + alpha * direction
        residual = residual - alpha * product
        if float(residual.norm()) <= tol * norm0:
            break
        preconditioned = precondition(residual)
        rz_next = float(residual @ preconditioned)
        direction = preconditioned + (rz_next / rz) * direction
        rz = rz_next
    return CGResult(x, iterations, float(residual.norm()) / norm0)


@dataclass
class SolveReport:
    """How the estimate was computed (stored in the edit's diagnostics)."""

    steps: int = 0
    accepted_steps: int = 0
    cg_iterations: list[int] = field(default_factory=list)
    gradient_norm_ratio: float | None = 1.0  # ‖∇J_S‖ at the answer / ‖∇J_S(θ₀)‖ (newton: None)
    converged: bool = False
    step_scale: float = 1.0  # the newton step's line-search factor
    boundary: float | None = None  # ``boundary`` line search: the edge of the acceptable scales it found
    clipped: bool = False
    further_step_scales: list[float] = field(default_factory=list)  # ``newton``: the later steps' line-search factors
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "accepted_steps": self.accepted_steps,
            "cg_iterations": self.cg_iterations,
            "gradient_norm_ratio": self.gradient_norm_ratio,
            "converged": self.converged,
            "line_search_step": self.step_scale,
            "line_search_boundary": self.boundary,
            "clipped_to_trust_radius": self.clipped,
            "further_step_scales": self.further_step_scales,
        }


def _solve(objective: ProximalObjective, point: Flat, rhs: Flat, damping: float, cg_tol: float) -> CGResult:
    return _solve_with(objective, objective.curvature_operator(point), rhs, damping, cg_tol)


def _solve_with(
    objective: ProximalObjective, curvature: Callable[[Flat], Flat], rhs: Flat, damping: float, cg_tol: float
) -> CGResult:
    """(G + damping I) x = rhs by CG with the curvature operator v ↦ G v (preconditioned where one is fitted)."""
    fitted = objective.preconditioner

    def matvec(v: Flat) -> Flat:
        return curvature(v) + damping * v

    precondition = None if fitted is None else partial(fitted.apply, damping=damping)
    return conjugate_gradient(matvec, rhs, cg_tol, objective.cg_iterations(), precondition)


def newton_step_count(objective: ProximalObjective, edit: EditOptions) -> int:
    """``edit.newton_steps``, or (None, auto) STORED_NEWTON_STEPS where the kept rows' curvature at θ₀ was stored
    (a further step costs a linearisation and a solve with cheap products) and 1 where it is matrix-free (a further
    step would cost as much as the first)."""
    if edit.newton_steps is not None:
        return edit.newton_steps
    return STORED_NEWTON_STEPS if objective.curvature_report.get("products") == "stored" else 1


def newton_step(
    objective: ProximalObjective, edit: EditOptions, progress: Progress = no_progress, steps: int = 1
) -> tuple[Flat, SolveReport]:
    """Gauss-Newton steps on J_S from θ₀, each shortened to the trust radius and line-searched on the real J_S
    (``_line_search``): the first (G_{−S}(θ₀) + λI) d = r; then, while the last line search stopped short of its
    full step and fewer than ``steps`` were taken, (G_{−S}(θ) + λI) d = −∇J_S(θ) from the point θ reached, with
    the kept rows linearised afresh there (one pass that gives J_S's gradient and the curvature operator
    together). A line search that stops short says J_S left its quadratic model along the straight line; the next
    step follows J_S's valley from where it turned up (docs/editing.md)."""
    report = SolveReport(steps=1)
    theta0 = objective.theta0
    value0, gradient0 = objective.kept_loss0, objective.gradient0
    radius = edit.trust_radius * float(theta0.norm())
    direction = _clipped_direction(objective, objective.curvature_operator(theta0), -gradient0, edit, radius, report)
    found, report.boundary = _line_search(objective, theta0, value0, gradient0, direction, edit, progress, 1)
    if found is None:
        halving = edit.line_search == "halving"
        found = 0.5**LINE_SEARCH_HALVINGS if halving else 0.0
        report.warnings.append(
            "the line search found no decrease of the proximal objective along the Newton step; the edit is "
            + ("θ₀ moved by a tiny step" if halving else "the unedited model")
        )
    scale = report.step_scale = found
    report.accepted_steps = 1
    report.gradient_norm_ratio = None  # not computed: it would cost a gradient pass (the line search needs values)
    point = theta0 + scale * direction
    while report.steps < steps and 0.0 < scale < 1.0:
        value, gradient, curvature = objective.linearised_objective(point)
        direction = _clipped_direction(objective, curvature, -gradient, edit, radius, report)
        report.steps += 1
        found = None
        if float(gradient @ direction) < 0:
            found = _line_search(objective, point, value, gradient, direction, edit, progress, report.steps)[0]
        if found is None:  # J_S does not decrease along it: the point reached stands
            report.further_step_scales.append(0.0)
            break
        scale = found
        report.further_step_scales.append(scale)
        point = point + scale * direction
        report.accepted_steps += 1
    return point, report


def _clipped_direction(
    objective: ProximalObjective,
    curvature: Callable[[Flat], Flat],
    rhs: Flat,
    edit: EditOptions,
    radius: float,
    report: SolveReport,
) -> Flat:
    """The solve (G + λI) d = rhs, clipped to the trust radius (noted in ``report``)."""
    solved = _solve_with(objective, curvature, rhs, objective.damping, edit.cg_tol)
    report.cg_iterations.append(solved.iterations)
    direction = solved.solution
    if float(direction.norm()) > radius > 0:
        direction = direction * (radius / float(direction.norm()))
        report.clipped = True
    return direction


def _line_search(
    objective: ProximalObjective,
    origin: Flat,
    value: float,
    gradient: Flat,
    direction: Flat,
    edit: EditOptions,
    progress: Progress,
    step: int,
) -> tuple[float | None, float | None]:
    """(the scale s of the step ``direction`` from ``origin``, where J_S = ``value`` and ∇J_S = ``gradient``; the
    ``boundary`` search's edge, 0 where it found none, None for ``halving``). A scale is acceptable when
    J_S(origin + s d) ≤ J_S(origin) + c s ⟨∇J_S, d⟩ (Armijo, c = ARMIJO); ``step`` numbers the progress reports.

    ``edit.line_search`` ``halving``: the first acceptable scale of 1, ½, ¼, …  ``boundary``: the edge b of the
    acceptable scales up to 1/share (``_acceptable_edge``: secant tries, to within BOUNDARY_TOLERANCE), and the
    step s = min(1, share × b), share = ``edit.boundary_share``. The halving's answer jumps by factors of two as
    the removal or λ change; the boundary's moves continuously (docs/editing.md). Scale None: none acceptable."""
    slope = float(gradient @ direction)

    def excess(scale: float) -> float:  # φ(s) = (J_S(origin + s d) − J_S(origin)) / s − c ⟨∇J_S, d⟩: acceptable ≤ 0
        progress("edit", step, 1)
        return (objective.value(origin + scale * direction) - value) / scale - ARMIJO * slope

    if edit.line_search == "halving":
        return _first_acceptable(lambda scale: excess(scale) <= 0, 1.0), None
    boundary = _acceptable_edge(excess, 1.0 / edit.boundary_share, (1 - ARMIJO) * slope)
    if boundary is None:
        return None, 0.0
    return min(1.0, edit.boundary_share * boundary), boundary


def _first_acceptable(acceptable: Callable[[float], bool], start: float) -> float | None:
    """The first acceptable scale of start, start/2, start/4, … (LINE_SEARCH_HALVINGS tries), or None."""
    scale = start
    for _ in range(LINE_SEARCH_HALVINGS):
        if acceptable(scale):
            return scale
        scale *= 0.5
    return None


def _acceptable_edge(excess: Callable[[float], float], top: float, at_zero: float) -> float | None:
    """The largest acceptable scale up to ``top`` (``top`` itself when acceptable), to within BOUNDARY_TOLERANCE,
    from φ = ``excess`` (acceptable where φ ≤ 0; ``at_zero`` = φ(0+) < 0). For a quadratic J_S, φ is linear in the
    scale, so each try goes to the secant estimate of φ's root: first from φ(0+) and the last rejected scale
    (kept within 0.1 and 0.9 of that scale) until a scale is acceptable, then by regula falsi (the Illinois
    variant) between the acceptable and the rejected scale, each try at least half the tolerance inside them, so
    that a close estimate ends the search with one more try. The secants run on asinh(φ / |φ(0+)|), the same sign
    and nearly φ near the root: where J_S explodes further along, φ at the rejected scale is huge and would pin
    every secant estimate to the acceptable end. None when no scale above ``top`` × ½^12 is acceptable within
    EDGE_EVALUATIONS tries."""
    scale = abs(at_zero)

    def compressed(value: float) -> float:
        return math.asinh(value / scale)

    high, f_high = top, compressed(excess(top))
    if f_high <= 0:
        return top
    tries, floor, f_zero = 1, top * 0.5**LINE_SEARCH_HALVINGS, compressed(at_zero)
    while True:  # step back towards 0 until a scale is acceptable
        if tries >= EDGE_EVALUATIONS or high <= floor:
            return None
        guess = min(max(_secant_root(0.0, f_zero, high, f_high), 0.1 * high), 0.9 * high)
        value, tries = compressed(excess(guess)), tries + 1
        if value <= 0:
            low, f_low = guess, value
            break
        high, f_high = guess, value
    moved = ""  # the end the last try replaced
    while high - low > BOUNDARY_TOLERANCE * low and tries < EDGE_EVALUATIONS:
        margin = 0.5 * BOUNDARY_TOLERANCE * low
        guess = min(max(_secant_root(low, f_low, high, f_high), low + margin), high - margin)
        value, tries = compressed(excess(guess)), tries + 1
        if value <= 0:
            low, f_low = guess, value
            f_high = 0.5 * f_high if moved == "low" else f_high  # Illinois: the kept end's value halved
            moved = "low"
        else:
            high, f_high = guess, value
            f_low = 0.5 * f_low if moved == "high" else f_low
            moved = "high"
    return low


def _secant_root(low: float, f_low: float, high: float, f_high: float) -> float:
    """Where the line through (low, f_low ≤ 0) and (high, f_high > 0) crosses zero."""
    return low - f_low * (high - low) / (f_high - f_low)


def minimise(
    objective: ProximalObjective, edit: EditOptions, progress: Progress = no_progress
) -> tuple[Flat, SolveReport]:
    """Levenberg-Marquardt on J_S from θ₀: steps (G_{−S}(θ) + (λ + μ)I) d = −∇J_S(θ), accepted when the real
    decrease is a fair share of the model's, μ adapted by that ratio; stops at ‖∇J_S‖ ≤ tol · ‖∇J_S(θ₀)‖.

    The first step is `newton_step` (clipped to the trust radius, then a line search on J_S): started at μ = 0,
    the plain first step of a large removal overshoots so far that the next few, with μ still small, are all
    rejected too, and a run of a few steps ended where it began (at θ₀, the model unedited)."""
    tol, max_steps = edit.tol, edit.max_steps
    report = SolveReport()
    point = objective.theta0
    value, gradient = objective.kept_loss0, objective.gradient0  # J_S(θ₀), ∇J_S(θ₀)
    norm0 = float(gradient.norm())
    if norm0 == 0.0:
        report.converged, report.gradient_norm_ratio = True, 0.0
        return point, report
    point, first = newton_step(objective, edit, progress)
    value, gradient = objective.value_and_gradient(point)
    report.steps, report.accepted_steps, report.cg_iterations = 1, 1, list(first.cg_iterations)
    report.clipped, report.step_scale, report.warnings = first.clipped, first.step_scale, list(first.warnings)
    report.boundary = first.boundary
    report.gradient_norm_ratio = float(gradient.norm()) / norm0
    if report.gradient_norm_ratio <= tol:
        report.converged = True
    mu = 0.0
    for step in range(2, max_steps + 1):
        if report.converged:
            break
        progress("edit", step - 1, max_steps)
        report.steps = step
        solved = _solve(objective, point, -gradient, objective.damping + mu, edit.cg_tol)
        report.cg_iterations.append(solved.iterations)
        direction = solved.solution
        # model decrease of the real objective (without μ): −gᵀd − ½ dᵀ(G + λ)d, with (G + λ + μ)d ≈ −g
        predicted = -0.5 * float(gradient @ direction) + 0.5 * mu * float(direction @ direction)
        candidate_value, candidate_gradient = objective.value_and_gradient(point + direction)
        ratio = (value - candidate_value) / predicted if predicted > 0 else -1.0
        # near the minimiser the decrease is lost in rounding: then a smaller gradient decides
        rounding = abs(value - candidate_value) <= 1e-13 * max(1.0, abs(value))
        if ratio > 1e-4 or (rounding and float(candidate_gradient.norm()) < float(gradient.norm())):
            point, value, gradient = point + direction, candidate_value, candidate_gradient
            report.accepted_steps += 1
            if ratio > 0.75:
                mu = mu / 3.0
        if ratio < 0.25:
            mu = max(4.0 * mu, objective.damping)
        report.gradient_norm_ratio = float(gradient.norm()) / norm0
        if report.gradient_norm_ratio <= tol:
            report.converged = True
            break
    progress("edit", max_steps, max_steps)
    if not report.converged:
        report.warnings.append(
            f"the proximal retrain objective was not minimised to tolerance in {max_steps} steps "
            f"(‖∇J‖ fell to {report.gradient_norm_ratio:.2e} of its start; tol {tol:g}): raise options.max_steps"
        )
    return point, report
