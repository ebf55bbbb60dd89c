"""Per-layer activations and output gradients, recorded by module hooks.

For a tracked layer with weight matrix W (d_out x d_in, the bias folded in as a last column fed by a
constant 1), a forward hook records the layer's inputs a (B, T, d_in) and the gradient of a scalar
objective w.r.t. the layer's outputs g (B, T, d_out). T counts sequence positions (1 for a plain
Linear, H*W output positions for Conv2d). The per-example gradient of W is sum_t g_t a_t^T.
Objectives are summed over the batch, so each example's gradient is its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from worker.attribution.types import AttributionError

LayerKind = Literal["linear", "conv2d"]
# nn.Module.register_forward_hook's hook: (module, inputs, output) -> a replacement output or None
ForwardHook = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor | None]

CONTRACTION_BLOCK_ELEMENTS = 32 * 1024**2  # largest (queries x batch x width) intermediate of a contraction
NARROW_LAYER_WIDTH = 128  # rank-one layers with min(d_in, d_out) below this contract via per-example gradients


@dataclass(frozen=True)
class TrackedLayer:
    """A tracked module and the shape of its weight matrix (bias folded in)."""

    name: str
    module: nn.Linear | nn.Conv2d
    kind: LayerKind
    in_features: int  # columns of the weight matrix, including the bias column
    out_features: int
    has_bias: bool

    @property
    def num_parameters(self) -> int:
        return self.in_features * self.out_features


def _is_trackable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return False


def trackable_layers(model: nn.Module) -> list[str]:
    """Module names of every nn.Linear and nn.Conv2d (groups == 1) in ``model``, in module order."""
    return [name for name, module in model.named_modules() if _is_trackable(module)]


def describe_layer(name: str, module: nn.Module) -> TrackedLayer:
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        return TrackedLayer(name, module, "linear", module.in_features + int(has_bias), module.out_features, has_bias)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise AttributionError(f"layer {name!r}: grouped convolutions (groups={module.groups}) are not supported")
        kh, kw = module.kernel_size
        columns = module.in_channels * kh * kw + int(has_bias)
        return TrackedLayer(name, module, "conv2d", columns, module.out_channels, has_bias)
    raise AttributionError(f"layer {name!r} is a {type(module).__name__}; only Linear and Conv2d can be tracked")


def resolve_layers(model: nn.Module, names: list[str] | None) -> list[TrackedLayer]:
    """The tracked layers: ``names`` (in model order) or every trackable layer."""
    modules = dict(model.named_modules())
    if names is None:
        chosen = trackable_layers(model)
        if not chosen:
            raise AttributionError("the model has no trackable layer (nn.Linear or nn.Conv2d)")
    else:
        if len(names) == 0:
            raise AttributionError("layers must name at least one layer")
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise AttributionError(
                f"unknown layer names {unknown}; trackable layers are {trackable_layers(model)}"
            )
        order = {n: i for i, n in enumerate(modules)}
        chosen = sorted(set(names), key=lambda n: order[n])
    return [describe_layer(n, modules[n]) for n in chosen]


# ---------------------------------------------------------------- layer inputs and output gradients


def _append_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_ones((*x.shape[:-1], 1))], dim=-1)


def _conv_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(B, C_in, H, W) -> (B, L, C_in*kh*kw) patches in the order of weight.reshape(C_out, -1)."""
    padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        if isinstance(padding, str) and padding == "valid":
            pad = [0, 0, 0, 0]
        elif isinstance(padding, str):  # "same"
            pad = []
            for d, k in zip(reversed(module.dilation), reversed(module.kernel_size), strict=True):
                total = d * (k - 1)
                pad += [total // 2, total - total // 2]
        else:
            pad = list(module._reversed_padding_repeated_twice)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
        padding = (0, 0)
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return patches.transpose(1, 2)


def layer_activations(layer: TrackedLayer, x: torch.Tensor) -> torch.Tensor:
    """The weight matrix's input columns for a batch: (B, T, in_features)."""
    if isinstance(layer.module, nn.Linear):
        if x.dim() < 2:
            raise AttributionError(f"layer {layer.name!r} got an input without a batch dimension: {tuple(x.shape)}")
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    else:
        if x.dim() != 4:
            raise AttributionError(f"layer {layer.name!r} expects (B, C, H, W) inputs, got {tuple(x.shape)}")
        a = _conv_patches(layer.module, x)
    return _append_ones(a) if layer.has_bias else a


def layer_output_gradients(layer: TrackedLayer, grad: torch.Tensor) -> torch.Tensor:
    """Gradients w.r.t. the layer's outputs: (B, T, out_features)."""
    if layer.kind == "linear":
        return grad.reshape(grad.shape[0], -1, grad.shape[-1])
    return grad.flatten(2).transpose(1, 2)


def weight_matrix(layer: TrackedLayer) -> torch.Tensor:
    """The layer's parameters as one (out_features, in_features) matrix, bias as last column."""
    weight = layer.module.weight.detach().reshape(layer.out_features, -1)
    if layer.module.bias is not None:
        return torch.cat([weight, layer.module.bias.detach().reshape(-1, 1)], dim=1)
    return weight


def split_weight_matrix(layer: TrackedLayer, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of ``weight_matrix``: {"<layer>.weight": ..., "<layer>.bias": ...} (model state_dict keys)."""
    module = layer.module
    prefix = f"{layer.name}." if layer.name else ""
    columns = layer.in_features - int(layer.has_bias)
    params = {prefix + "weight": matrix[:, :columns].reshape(module.weight.shape)}
    if module.bias is not None:
        params[prefix + "bias"] = matrix[:, columns].reshape(module.bias.shape)
    return params


# ---------------------------------------------------------------- per-batch layer activity


@dataclass
class LayerActivity:
    """One layer's record for a batch: inputs a (B, T, d_in) and output gradients g (B, T, d_out)."""

    activations: torch.Tensor
    gradients: torch.Tensor

    @property
    def rank_one(self) -> bool:
        """True when each example's gradient is g a^T (no sequence / spatial positions)."""
        return self.activations.shape[1] == 1

    @property
    def batch_size(self) -> int:
        return int(self.activations.shape[0])

    def per_example_gradients(self) -> torch.Tensor:
        """(B, d_out, d_in): sum_t g_t a_t^T. Memory B*d_out*d_in: use for small layers or sequences."""
        return torch.bmm(self.gradients.transpose(1, 2), self.activations)

    def contract(self, vectors: torch.Tensor) -> torch.Tensor:
        """<V_q, G_b> for vectors V (Q, d_out, d_in) and this batch's gradients G_b: (Q, B)."""
        if self.rank_one:
            a = self.activations[:, 0, :]  # (B, d_in)
            g = self.gradients[:, 0, :]  # (B, d_out)
            d_out, d_in = vectors.shape[1:]
            if min(d_in, d_out) < NARROW_LAYER_WIDTH:
                # narrow layer: one (Q, D) x (D, rows) matrix product with the per-example gradients g a^T
                # (formed for a bounded number of rows) beats Q small batched products
                rows = max(1, CONTRACTION_BLOCK_ELEMENTS // max(1, d_out * d_in))
                flat = vectors.reshape(vectors.shape[0], d_out * d_in)
                parts = []
                for first in range(0, self.batch_size, rows):
                    grads = (g[first : first + rows].unsqueeze(2) * a[first : first + rows].unsqueeze(1)).flatten(1)
                    parts.append(flat @ grads.T)
                return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            step = max(1, CONTRACTION_BLOCK_ELEMENTS // max(1, self.batch_size * min(d_in, d_out)))
            blocks = []
            for first in range(0, vectors.shape[0], step):  # bounds the (Q, B, d) intermediate
                block = vectors[first : first + step]
                if d_in <= d_out:
                    blocks.append((torch.matmul(g, block) * a).sum(-1))  # g^T V: (Q, B, d_in)
                else:
                    blocks.append((torch.matmul(a, block.transpose(1, 2)) * g).sum(-1))  # V a: (Q, B, d_out)
            return torch.cat(blocks)
        grads = self.per_example_gradients().flatten(1)  # (B, D)
        return vectors.flatten(1) @ grads.T

    def squared_norms(self) -> torch.Tensor:
        """||G_b||_F^2 for each example: (B,)."""
        if self.rank_one:
            return self.gradients[:, 0, :].pow(2).sum(1) * self.activations[:, 0, :].pow(2).sum(1)
        return self.per_example_gradients().pow(2).flatten(1).sum(1)

    def summed_gradient(self) -> torch.Tensor:
        """sum_b G_b: (d_out, d_in)."""
        return torch.einsum("bto,bti->oi", self.gradients, self.activations)


Activities = dict[str, LayerActivity]


class ActivityRecorder:
    """Records tracked layers' inputs during a forward pass and their output gradients on demand.

    Use as a context manager around forward passes; ``backward(objective)`` returns the activity of every
    tracked layer for the last forward. Parameters of tracked layers are made to require grad while
    recording (and restored after); no parameter ``.grad`` is written.
    """

    def __init__(self, layers: list[TrackedLayer]):
        self.layers = layers
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._outputs: dict[str, list[torch.Tensor]] = {}
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._recording = False

    def __enter__(self) -> ActivityRecorder:
        self._stop()
        self._grad_mode = torch.enable_grad()  # works even when the caller is inside torch.no_grad()
        self._grad_mode.__enter__()
        for layer in self.layers:
            for p in layer.module.parameters(recurse=False):
                self._requires_grad.append((p, p.requires_grad))
                p.requires_grad_(True)
            self._handles.append(layer.module.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        self._handles.clear()
        self._requires_grad.clear()
        self._stop()
        self._grad_mode.__exit__(None, None, None)

    def clear(self) -> None:
        """Forgets recorded tensors and records the next forward passes (until a final ``backward``)."""
        self._inputs = {layer.name: [] for layer in self.layers}
        self._outputs = {layer.name: [] for layer in self.layers}
        self._recording = True

    def _stop(self) -> None:
        self._inputs = {layer.name: [] for layer in self.layers}
        self._outputs = {layer.name: [] for layer in self.layers}
        self._recording = False

    def _hook(self, layer: TrackedLayer) -> ForwardHook:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            if not self._recording:
                return None
            self._inputs[layer.name].append(layer_activations(layer, inputs[0].detach()))
            self._outputs[layer.name].append(output)
            # later in-place ops (ReLU(inplace=True)) act on the copy, not on the recorded output
            return output.clone()

        return hook

    def backward(self, objective: torch.Tensor, retain_graph: bool) -> Activities:
        """Output gradients of the scalar ``objective`` for every tracked layer of the last forward."""
        names = [layer.name for layer in self.layers]
        outputs = [out for name in names for out in self._outputs[name]]
        if not outputs:
            raise AttributionError("no tracked layer was called in the forward pass")
        grads = torch.autograd.grad(objective, outputs, retain_graph=retain_graph, allow_unused=True)
        result: Activities = {}
        position = 0
        for layer in self.layers:
            acts, gs = [], []
            for out, a in zip(self._outputs[layer.name], self._inputs[layer.name], strict=True):
                grad = grads[position]
                position += 1
                if grad is None:
                    grad = torch.zeros_like(out)
                gs.append(layer_output_gradients(layer, grad.detach()))
                acts.append(a)
            if not acts:
                raise AttributionError(f"layer {layer.name!r} was not called in the forward pass")
            g = torch.cat(gs, dim=1)
            if not torch.isfinite(g).all():
                raise AttributionError(f"non-finite gradients (NaN or Inf) at layer {layer.name!r}")
            result[layer.name] = LayerActivity(torch.cat(acts, dim=1), g)
        if not retain_graph:
            self._stop()
        return result


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Puts ``model`` in eval mode (no dropout, frozen batch-norm statistics) and restores its modes after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
