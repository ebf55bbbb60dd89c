"""A torch.nn model as a pure function of a flat meta-parameter vector λ and task parameters θ.

λ ∈ R^p holds every trainable parameter (in ``named_parameters`` order); θ ∈ R^{p_θ} holds the adapted
ones (``adapted_params``, default all). The forward pass takes adapted tensors from θ and the others
from λ, so λ may also enter the task losses directly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from worker.attribution.losses import LOSS_NAMES, loss_name
from worker.attribution.types import AttributionError


@dataclass(frozen=True)
class ParamSlot:
    name: str
    shape: torch.Size
    start: int  # offset in λ
    theta_start: int  # offset in θ, or -1 when the parameter is not adapted

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


class FunctionalModel:
    """Pure-function view of ``model`` with per-sample losses ``cross_entropy`` or ``mse`` (½ Σ over outputs of
    the squared error, as everywhere in the engine, so a proximal r means the same as in docs/methods.md)."""

    def __init__(
        self, model: nn.Module, loss: str, adapted_params: list[str] | None, dtype: torch.dtype, device: torch.device
    ) -> None:
        if loss not in LOSS_NAMES:
            raise AttributionError(f"meta influence supports the losses 'cross_entropy' and 'mse', got {loss!r}")
        self.loss = loss_name(loss)
        self.dtype = dtype
        self.device = device
        self.module = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not named:
            raise AttributionError("the model has no trainable parameters")
        names = [n for n, _ in named]
        adapted = set(names) if adapted_params is None else set(adapted_params)
        unknown = sorted(adapted - set(names))
        if unknown:
            raise AttributionError(f"options.adapted_params names unknown parameters {unknown}; the model has {names}")
        if not adapted:
            raise AttributionError("options.adapted_params is empty: the inner loop must adapt at least one parameter")
        slots, start, theta_start = [], 0, 0
        for name, p in named:
            is_adapted = name in adapted
            slots.append(ParamSlot(name, p.shape, start, theta_start if is_adapted else -1))
            start += p.numel()
            theta_start += p.numel() if is_adapted else 0
        self.slots: list[ParamSlot] = slots
        self.num_lambda = start
        self.num_theta = theta_start
        self.adapted_index = torch.cat(
            [torch.arange(s.start, s.start + s.numel, device=device) for s in slots if s.theta_start >= 0]
        )
        self.buffers = {n: b for n, b in self.module.named_buffers()}
        self.original_dtypes = {n: p.dtype for n, p in model.named_parameters()}

    # ----- flat vectors -----
    def flat_lambda(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for _, p in self.module.named_parameters() if p.requires_grad])

    def theta_of(self, lam: torch.Tensor) -> torch.Tensor:
        """The adapted entries of λ (θ's initialisation and proximal centre)."""
        return lam[self.adapted_index]

    def embed_theta(self, theta_vec: torch.Tensor) -> torch.Tensor:
        """Eᵀθ: a θ-space vector placed in λ-space (zeros elsewhere)."""
        out = theta_vec.new_zeros(self.num_lambda)
        return out.index_add(0, self.adapted_index, theta_vec)

    def params(self, lam: torch.Tensor, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for s in self.slots:
            if s.theta_start >= 0:
                out[s.name] = theta[s.theta_start : s.theta_start + s.numel].view(s.shape)
            else:
                out[s.name] = lam[s.start : s.start + s.numel].view(s.shape)
        return out

    def state_dict(self, lam: torch.Tensor, template: nn.Module) -> dict[str, torch.Tensor]:
        """A full state_dict of ``template`` with its trainable parameters replaced by λ."""
        state = {k: v.detach().clone() for k, v in template.state_dict().items()}
        for s in self.slots:
            target = state[s.name]
            state[s.name] = (
                lam[s.start : s.start + s.numel]
                .detach()
                .view(s.shape)
                .to(dtype=target.dtype, device=target.device)
                .clone()
            )
        return state

    def forward(self, lam: torch.Tensor, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's outputs on ``x`` with the adapted parameters from θ and the others from λ."""
        outputs: torch.Tensor = functional_call(self.module, {**self.params(lam, theta), **self.buffers}, (x,))
        return outputs

    # ----- losses -----
    def per_sample_losses(
        self, lam: torch.Tensor, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        out = self.forward(lam, theta, x)
        if self.loss == "cross_entropy":  # = F.cross_entropy; gather has a vmap batching rule, nll_loss does not
            return -out.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return 0.5 * ((out.reshape(y.shape) - y) ** 2).reshape(y.shape[0], -1).sum(dim=1)

    def split_loss(
        self, lam: torch.Tensor, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        """L(θ; D, w) = Σ_z w_z ℓ(z)."""
        return (w * self.per_sample_losses(lam, theta, x, y)).sum()


class RetainedGradient:
    """∇f at fixed inputs, kept with its graph, so that every Hessian-vector product (any block of ∇²f)
    is one backward pass: hvp(v_1, …, v_n) = ∇²f · (v_1, …, v_n), returned per input."""

    def __init__(self, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> None:
        with torch.enable_grad():
            self.leaves = [x.detach().requires_grad_(True) for x in inputs]
            grads = torch.autograd.grad(fn(*self.leaves), self.leaves, create_graph=True, allow_unused=True)
        self.grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, self.leaves, strict=True)]

    def hvp(self, *vectors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pairs = [(g, v) for g, v in zip(self.grads, vectors, strict=True) if g.requires_grad]
        if not pairs:
            return tuple(torch.zeros_like(x) for x in self.leaves)
        out = torch.autograd.grad(
            [g for g, _ in pairs], self.leaves, [v for _, v in pairs], retain_graph=True, allow_unused=True
        )
        return tuple(torch.zeros_like(x) if o is None else o.detach() for o, x in zip(out, self.leaves, strict=True))
