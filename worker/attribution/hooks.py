"""Per-layer activations and output gradients, recorded by module hooks.

For a tracked layer with weight matrix W (d_out x d_in, the bias folded in as a last column fed by a
constant 1), a forward hook records the layer's inputs a (B, T, d_in) and the gradient of a scalar
objective w.r.t. the layer's outputs g (B, T, d_out). T counts sequence positions (1 for a plain
Linear, every leading dimension after the batch for a Linear on (B, ..., d) inputs, H*W output
positions for Conv2d). The per-example gradient of W is sum_t g_t a_t^T. Objectives are summed over
the batch, so each example's gradient is its own.

Tracked module types: ``nn.Linear``, ``nn.Conv2d`` (groups 1), Hugging Face's ``Conv1D`` (GPT-2: y =
x W + b, so the weight matrix is W^T), LoRA's ``lora_A`` / ``lora_B`` (plain ``nn.Linear``), and
``nn.Embedding`` only when named in ``layers`` (weight matrix E^T, d_out = embedding size, d_in =
vocabulary; its input columns are one-hot token rows). With token inputs, the recorder is given the
batch's attention mask: activations and output gradients at padded positions are set to zero, so
padding contributes to no statistic and no gradient.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from worker.attribution.types import AttributionError

LayerKind = Literal["linear", "conv2d", "conv1d", "embedding"]

CONTRACTION_BLOCK_ELEMENTS = 32 * 1024**2  # largest (queries x batch x width) intermediate of a contraction
NARROW_LAYER_WIDTH = 128  # rank-one layers with min(d_in, d_out) below this contract via per-example gradients
LORA_MODULE_NAMES = ("lora_A", "lora_B")  # peft's adapter matrices (nn.Linear modules in a ModuleDict)
PEFT_TRAINED_COPIES = "modules_to_save"  # peft's fully trained copies of chosen modules (e.g. a classifier head)


@dataclass(frozen=True)
class TrackedLayer:
    """A tracked module and the shape of its weight matrix (bias folded in)."""

    name: str
    module: nn.Module
    kind: LayerKind
    in_features: int  # columns of the weight matrix, including the bias column
    out_features: int
    has_bias: bool

    @property
    def num_parameters(self) -> int:
        return self.in_features * self.out_features


def conv1d_type() -> type[nn.Module] | None:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D``, when transformers is imported (no model can
    contain one otherwise; the engine does not import transformers itself)."""
    module = sys.modules.get("transformers.pytorch_utils")
    found = getattr(module, "Conv1D", None) if module is not None else None
    if isinstance(found, type) and issubclass(found, nn.Module):
        return found
    return None


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def _is_trackable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return _is_conv1d(module)


def trackable_layers(model: nn.Module) -> list[str]:
    """Module names of every nn.Linear, nn.Conv2d (groups == 1) and transformers Conv1D in ``model``, in
    module order (nn.Embedding layers can be tracked too, but only when named)."""
    return [name for name, module in model.named_modules() if _is_trackable(module)]


def is_lora_layer(name: str) -> bool:
    """True for peft's adapter linears (``...lora_A.<adapter>`` / ``...lora_B.<adapter>``)."""
    parts = name.split(".")
    return any(part in LORA_MODULE_NAMES for part in parts[:-1])


def _is_adapter_trained(name: str) -> bool:
    """A LoRA linear, or a layer of peft's ``modules_to_save`` copies (trained in full with the adapter)."""
    return is_lora_layer(name) or PEFT_TRAINED_COPIES in name.split(".")[:-1]


def default_layers(model: nn.Module) -> list[str]:
    """The layers tracked when none are named: every trackable layer, except that

    * a model with LoRA adapters (peft) tracks only its ``lora_A`` / ``lora_B`` linears and the layers of
      its ``modules_to_save`` copies (adapter-only attribution: the frozen base weights are not what was
      trained);
    * a Hugging Face model's output embedding (``get_output_embeddings()``, the LM head) is left out: its
      gradient factor is vocabulary x vocabulary (name it in ``layers`` to track it).
    Plain models (no adapters, no ``get_output_embeddings``) track exactly ``trackable_layers``.
    """
    names = trackable_layers(model)
    if any(is_lora_layer(name) for name in names):
        return [name for name in names if _is_adapter_trained(name)]
    output_embeddings = _output_embeddings(model)
    if output_embeddings is None:
        return names
    modules = dict(model.named_modules())
    return [name for name in names if modules[name] is not output_embeddings]


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    found = getter()
    return found if isinstance(found, nn.Module) else None


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
    if _is_conv1d(module):
        weight = module.weight
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise AttributionError(f"layer {name!r}: a Conv1D without a 2-d weight")
        return TrackedLayer(
            name, module, "conv1d", int(weight.shape[0]) + int(has_bias), int(weight.shape[1]), has_bias
        )
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None or module.sparse:
            raise AttributionError(f"layer {name!r}: embeddings with max_norm or sparse gradients are not supported")
        return TrackedLayer(name, module, "embedding", module.num_embeddings, module.embedding_dim, False)
    raise AttributionError(
        f"layer {name!r} is a {type(module).__name__}; only Linear, Conv2d, Conv1D and Embedding can be tracked"
    )


def resolve_layers(model: nn.Module, names: list[str] | None) -> list[TrackedLayer]:
    """The tracked layers: ``names`` (in model order) or ``default_layers(model)``."""
    modules = dict(model.named_modules())
    if names is None:
        chosen = default_layers(model)
        if not chosen:
            raise AttributionError("the model has no trackable layer (nn.Linear, nn.Conv2d or Conv1D)")
    else:
        if len(names) == 0:
            raise AttributionError("layers must name at least one layer")
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise AttributionError(f"unknown layer names {unknown}; trackable layers are {trackable_layers(model)}")
        order = {n: i for i, n in enumerate(modules)}
        chosen = sorted(set(names), key=lambda n: order[n])
    return [describe_layer(n, modules[n]) for n in chosen]


# ---------------------------------------------------------------- layer inputs and output gradients


def _append_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_ones((*x.shape[:-1], 1))], dim=-1)


def _padded(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The convolution's input with its padding applied (x itself when it has none)."""
    padding = module.padding
    if isinstance(padding, str) and padding == "valid":
        return x
    if isinstance(padding, str):  # "same"
        pad = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size), strict=True):
            total = d * (k - 1)
            pad += [total // 2, total - total // 2]
    else:
        pad = list(module._reversed_padding_repeated_twice)
    if not any(pad):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pad, mode=mode)


def _conv_patches(module: nn.Conv2d, x: torch.Tensor, ones_column: bool = False) -> torch.Tensor:
    """(B, C_in, H, W) -> (B, L, C_in*kh*kw) patches in the order of weight.reshape(C_out, -1), with a column of
    ones appended when ``ones_column`` (the bias's input). Each kernel offset's strided slice of the padded input
    is copied into its place of one output tensor: on the CPU several times faster than ``F.unfold`` followed by
    a transpose and a concatenation (the same values)."""
    x = _padded(module, x)
    (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
    batch, channels, height, width = x.shape
    rows, columns = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    if rows < 1 or columns < 1:
        raise AttributionError(
            f"a convolution with kernel {module.kernel_size} got a {height}×{width} input (padded): no output"
        )
    features = channels * kh * kw
    out = x.new_empty(batch, rows * columns, features + int(ones_column))
    patches = out[..., :features].view(batch, rows, columns, channels, kh * kw)
    for i in range(kh):
        for j in range(kw):
            window = x[:, :, i * dh : i * dh + sh * (rows - 1) + 1 : sh, j * dw : j * dw + sw * (columns - 1) + 1 : sw]
            patches[..., i * kw + j] = window.permute(0, 2, 3, 1)
    if ones_column:
        out[..., features] = 1
    return out


def layer_activations(layer: TrackedLayer, x: torch.Tensor) -> torch.Tensor:
    """The weight matrix's input columns for a batch: (B, T, in_features)."""
    if layer.kind in ("linear", "conv1d"):
        if x.dim() < 2:
            raise AttributionError(f"layer {layer.name!r} got an input without a batch dimension: {tuple(x.shape)}")
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    elif layer.kind == "embedding":
        a = _one_hot_rows(layer, x)
    else:
        if x.dim() != 4:
            raise AttributionError(f"layer {layer.name!r} expects (B, C, H, W) inputs, got {tuple(x.shape)}")
        assert isinstance(layer.module, nn.Conv2d)  # the only other kind of tracked layer
        return _conv_patches(layer.module, x, ones_column=layer.has_bias)
    return _append_ones(a) if layer.has_bias else a


def _one_hot_rows(layer: TrackedLayer, ids: torch.Tensor) -> torch.Tensor:
    """Token ids (B, ...) -> one-hot rows (B, T, vocabulary) in the weight's dtype (padding_idx: a zero row,
    as its embedding gets no gradient)."""
    module = layer.module
    if not isinstance(module, nn.Embedding) or ids.dim() < 1:
        raise AttributionError(f"layer {layer.name!r} got embedding inputs of shape {tuple(ids.shape)}")
    rows = F.one_hot(ids.reshape(ids.shape[0], -1), module.num_embeddings).to(module.weight.dtype)
    if module.padding_idx is not None:
        rows[..., module.padding_idx] = 0
    return rows


def position_mask(layer: TrackedLayer, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, T) mask of this layer call's positions: the batch's attention mask when the layer runs on
    every token ((B, T, d) inputs, or (B, T) token ids for an embedding), None for a layer that sees one
    row per example ((B, d), e.g. a classification head), when there is no mask or when it masks nothing."""
    if mask is None:
        return None
    rows = x.dim() - (0 if layer.kind == "embedding" else 1)
    if rows == 1 and x.shape[0] == mask.shape[0]:
        return None
    if layer.kind != "conv2d" and rows == 2 and tuple(x.shape[:2]) == tuple(mask.shape):
        kept = mask.to(torch.bool)
        return None if bool(kept.all()) else kept  # no padding in this batch: nothing to zero (and no copies)
    raise AttributionError(
        f"layer {layer.name!r}: its input of shape {tuple(x.shape)} does not line up with the attention mask "
        f"{tuple(mask.shape)} (token layers must see (batch, tokens, features) inputs)"
    )


def layer_output_gradients(layer: TrackedLayer, grad: torch.Tensor) -> torch.Tensor:
    """Gradients w.r.t. the layer's outputs: (B, T, out_features)."""
    if layer.kind != "conv2d":
        return grad.reshape(grad.shape[0], -1, grad.shape[-1])
    return grad.flatten(2).transpose(1, 2)


def _masked(rows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, d) rows with the masked positions set to zero."""
    return rows if mask is None else torch.where(mask.unsqueeze(-1), rows, 0.0)


def _parameter(layer: TrackedLayer, name: str) -> torch.Tensor:
    value = getattr(layer.module, name, None)
    if not isinstance(value, torch.Tensor):
        raise AttributionError(f"layer {layer.name!r} has no {name} tensor")
    return value


def weight_matrix(layer: TrackedLayer) -> torch.Tensor:
    """The layer's parameters as one (out_features, in_features) matrix, bias as last column."""
    weight = _parameter(layer, "weight").detach()
    if layer.kind in ("conv1d", "embedding"):
        weight = weight.T  # Conv1D: y = x W + b; Embedding: y = E^T onehot(x)
    weight = weight.reshape(layer.out_features, -1)
    if layer.has_bias:
        return torch.cat([weight, _parameter(layer, "bias").detach().reshape(-1, 1)], dim=1)
    return weight


def split_weight_matrix(layer: TrackedLayer, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of ``weight_matrix``: {"<layer>.weight": ..., "<layer>.bias": ...} (model state_dict keys)."""
    prefix = f"{layer.name}." if layer.name else ""
    columns = layer.in_features - int(layer.has_bias)
    weight = matrix[:, :columns]
    if layer.kind in ("conv1d", "embedding"):
        weight = weight.T
    params = {prefix + "weight": weight.reshape(_parameter(layer, "weight").shape)}
    if layer.has_bias:
        params[prefix + "bias"] = matrix[:, columns].reshape(_parameter(layer, "bias").shape)
    return params


# ---------------------------------------------------------------- per-batch layer activity


@dataclass
class LayerActivity:
    """One layer's record for a batch: inputs a (B, T, d_in) and output gradients g (B, T, d_out).

    ``mask`` (B, T) bool, with token inputs: False at padded positions (whose a and g are zero).
    ``example_gradients`` (B, d_out, d_in), when set: the per-example gradients themselves, read back from a
    training-gradient index of a layer with positions (``of_gradients``); a and g then hold no positions.
    """

    activations: torch.Tensor
    gradients: torch.Tensor
    mask: torch.Tensor | None = None
    example_gradients: torch.Tensor | None = None

    @classmethod
    def of_gradients(cls, example_gradients: torch.Tensor) -> LayerActivity:
        """An activity given by its per-example gradient matrices (B, d_out, d_in) alone."""
        rows, d_out, d_in = example_gradients.shape
        empty = example_gradients.new_zeros
        return cls(empty((rows, 0, d_in)), empty((rows, 0, d_out)), None, example_gradients)

    @property
    def num_positions(self) -> int:
        """Positions that count in the activation covariance: B x T, less the padded ones."""
        if self.mask is None:
            return int(self.activations.shape[0] * self.activations.shape[1])
        return int(self.mask.sum())

    @property
    def rank_one(self) -> bool:
        """True when each example's gradient is g a^T (no sequence / spatial positions)."""
        return self.activations.shape[1] == 1

    @property
    def batch_size(self) -> int:
        return int(self.activations.shape[0])

    def per_example_gradients(self) -> torch.Tensor:
        """(B, d_out, d_in): sum_t g_t a_t^T. Memory B*d_out*d_in: use for small layers or sequences."""
        if self.example_gradients is not None:
            return self.example_gradients
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
        if self.example_gradients is not None:
            return self.example_gradients.sum(0)
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
        self._masks: dict[str, list[torch.Tensor | None]] = {}
        self._mask: torch.Tensor | None = None
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

    def clear(self, attention_mask: torch.Tensor | None = None) -> None:
        """Forgets recorded tensors and records the next forward passes (until a final ``backward``).

        ``attention_mask`` (B, T), for token inputs: positions where it is 0 are zeroed in every recorded
        activation and output gradient of layers that run on every token.
        """
        self._inputs = {layer.name: [] for layer in self.layers}
        self._outputs = {layer.name: [] for layer in self.layers}
        self._masks = {layer.name: [] for layer in self.layers}
        self._mask = attention_mask
        self._recording = True

    def _stop(self) -> None:
        self._inputs = {layer.name: [] for layer in self.layers}
        self._outputs = {layer.name: [] for layer in self.layers}
        self._masks = {layer.name: [] for layer in self.layers}
        self._mask = None
        self._recording = False

    def _hook(self, layer: TrackedLayer) -> Callable[..., torch.Tensor | None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            if not self._recording:
                return None
            x = inputs[0].detach()
            mask = position_mask(layer, x, self._mask)
            self._inputs[layer.name].append(_masked(layer_activations(layer, x), mask))
            self._masks[layer.name].append(mask)
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
            acts, gs, masks = [], [], []
            calls = zip(self._outputs[layer.name], self._inputs[layer.name], self._masks[layer.name], strict=True)
            for out, a, mask in calls:
                grad = grads[position]
                position += 1
                if grad is None:
                    grad = torch.zeros_like(out)
                gs.append(_masked(layer_output_gradients(layer, grad.detach()), mask))
                acts.append(a)
                masks.append(mask)
            if not acts:
                raise AttributionError(f"layer {layer.name!r} was not called in the forward pass")
            g = torch.cat(gs, dim=1)
            if not torch.isfinite(g).all():
                raise AttributionError(f"non-finite gradients (NaN or Inf) at layer {layer.name!r}")
            result[layer.name] = LayerActivity(torch.cat(acts, dim=1), g, _joined_masks(masks, acts))
        if not retain_graph:
            self._stop()
        return result


def _joined_masks(masks: list[torch.Tensor | None], acts: list[torch.Tensor]) -> torch.Tensor | None:
    """The masks of a layer's calls in one forward, joined along positions (None when no call was masked)."""
    if all(mask is None for mask in masks):
        return None
    parts = [
        torch.ones(a.shape[:2], dtype=torch.bool, device=a.device) if mask is None else mask
        for mask, a in zip(masks, acts, strict=True)
    ]
    return torch.cat(parts, dim=1)


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
