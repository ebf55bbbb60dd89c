"""Declarative ``format: "spec"`` architectures: validation, analytic size and construction.

An architecture is ``{"type": "sequential", "layers": [...]}`` over an allow-list of torch.nn layers whose
fields are the torch constructor's arguments. ``build_module`` turns it into ``torch.nn.Sequential`` so that
state_dict keys are exactly torch's (``0.weight``; residual blocks: ``3.body.0.weight``).

Arguments that would hurt attribution are not accepted: ``inplace=True`` (breaks backward hooks),
``return_indices`` (changes the output type) and Embedding's ``sparse`` / ``max_norm`` / ``norm_type``
(sparse gradients; weights rewritten in place during forward).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from worker.artifacts.errors import ArtifactError

MAX_DIM = 2**31 - 1
MAX_LAYERS = 1024  # layers in total, residual bodies included
MAX_DEPTH = 16  # residual nesting
MAX_PARAMETERS = 250_000_000  # default cap for build_module (1 GB of float32)
FIELD = "metadata.architecture"

Dim = Annotated[int, Field(strict=True, ge=1, le=MAX_DIM)]
Size2 = Dim | Annotated[list[Dim], Field(min_length=2, max_length=2)]
MAX_PADDING = 1024
Pad = Annotated[int, Field(strict=True, ge=0, le=MAX_PADDING)]
Padding2 = Pad | Annotated[list[Pad], Field(min_length=2, max_length=2)]
Eps = Annotated[float, Field(strict=True, gt=0, le=1, allow_inf_nan=False)]
Momentum = Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)]
Probability = Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)]
Flag = Annotated[bool, Field(strict=True)]
NoInplace = Literal[False]
DimIndex = Annotated[int, Field(strict=True, ge=-64, le=64)]


class _Layer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Linear(_Layer):
    type: Literal["linear"]
    in_features: Dim
    out_features: Dim
    bias: Flag = True


class Conv2d(_Layer):
    type: Literal["conv2d"]
    in_channels: Dim
    out_channels: Dim
    kernel_size: Size2
    stride: Size2 = 1
    padding: Padding2 | Literal["same", "valid"] = 0
    dilation: Size2 = 1
    groups: Dim = 1
    bias: Flag = True
    padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros"

    @model_validator(mode="after")
    def _check(self) -> Conv2d:
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError("in_channels and out_channels must both be divisible by groups")
        if self.padding == "same" and _pair(self.stride) != (1, 1):
            raise ValueError("padding 'same' needs stride 1")
        return self


class BatchNorm1d(_Layer):
    type: Literal["batchnorm1d"]
    num_features: Dim
    eps: Eps = 1e-5
    momentum: Momentum | None = 0.1
    affine: Flag = True
    track_running_stats: Flag = True


class BatchNorm2d(_Layer):
    type: Literal["batchnorm2d"]
    num_features: Dim
    eps: Eps = 1e-5
    momentum: Momentum | None = 0.1
    affine: Flag = True
    track_running_stats: Flag = True


class LayerNorm(_Layer):
    type: Literal["layernorm"]
    normalized_shape: Dim | Annotated[list[Dim], Field(min_length=1, max_length=8)]
    eps: Eps = 1e-5
    elementwise_affine: Flag = True
    bias: Flag = True


class Embedding(_Layer):
    type: Literal["embedding"]
    num_embeddings: Dim
    embedding_dim: Dim
    padding_idx: Annotated[int, Field(strict=True)] | None = None
    scale_grad_by_freq: Flag = False

    @model_validator(mode="after")
    def _check(self) -> Embedding:
        if self.padding_idx is not None and not -self.num_embeddings <= self.padding_idx < self.num_embeddings:
            raise ValueError("padding_idx must be within num_embeddings")
        return self


class Dropout(_Layer):
    type: Literal["dropout"]
    p: Probability = 0.5
    inplace: NoInplace = False


class Flatten(_Layer):
    type: Literal["flatten"]
    start_dim: DimIndex = 1
    end_dim: DimIndex = -1


class MaxPool2d(_Layer):
    type: Literal["maxpool2d"]
    kernel_size: Size2
    stride: Size2 | None = None
    padding: Padding2 = 0
    dilation: Size2 = 1
    ceil_mode: Flag = False


class AvgPool2d(_Layer):
    type: Literal["avgpool2d"]
    kernel_size: Size2
    stride: Size2 | None = None
    padding: Padding2 = 0
    ceil_mode: Flag = False
    count_include_pad: Flag = True
    divisor_override: Dim | None = None


class AdaptiveAvgPool2d(_Layer):
    type: Literal["adaptive_avgpool2d"]
    output_size: Dim | Annotated[list[Dim | None], Field(min_length=2, max_length=2)]


class ReLU(_Layer):
    type: Literal["relu"]
    inplace: NoInplace = False


class GELU(_Layer):
    type: Literal["gelu"]
    approximate: Literal["none", "tanh"] = "none"


class SiLU(_Layer):
    type: Literal["silu"]
    inplace: NoInplace = False


class Tanh(_Layer):
    type: Literal["tanh"]


class Sigmoid(_Layer):
    type: Literal["sigmoid"]


class Residual(_Layer):
    type: Literal["residual"]
    body: Annotated[list[Layer], Field(min_length=1)]


Layer = Annotated[
    Linear
    | Conv2d
    | BatchNorm1d
    | BatchNorm2d
    | LayerNorm
    | Embedding
    | Dropout
    | Flatten
    | MaxPool2d
    | AvgPool2d
    | AdaptiveAvgPool2d
    | ReLU
    | GELU
    | SiLU
    | Tanh
    | Sigmoid
    | Residual,
    Field(discriminator="type"),
]
LAYER_TYPES = (
    "linear",
    "conv2d",
    "batchnorm1d",
    "batchnorm2d",
    "layernorm",
    "embedding",
    "dropout",
    "flatten",
    "maxpool2d",
    "avgpool2d",
    "adaptive_avgpool2d",
    "relu",
    "gelu",
    "silu",
    "tanh",
    "sigmoid",
    "residual",
)
Residual.model_rebuild()


class SequentialSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["sequential"]
    layers: Annotated[list[Layer], Field(min_length=1)]

    @model_validator(mode="after")
    def _check_size(self) -> SequentialSpec:
        count, depth = _count_and_depth(self.layers)
        if count > MAX_LAYERS:
            raise ValueError(f"too many layers: {count} (at most {MAX_LAYERS})")
        if depth > MAX_DEPTH:
            raise ValueError(f"residual blocks nested {depth} deep (at most {MAX_DEPTH})")
        return self


def _count_and_depth(layers: list[Any]) -> tuple[int, int]:
    count, depth = 0, 0
    for layer in layers:
        count += 1
        if isinstance(layer, Residual):
            inner_count, inner_depth = _count_and_depth(layer.body)
            count += inner_count
            depth = max(depth, inner_depth + 1)
    return count, depth


# ---------------------------------------------------------------------------------------------- parsing


def parse_architecture(data: dict) -> SequentialSpec:
    """Validate a JSON architecture; ArtifactError names the first bad path (``layers.2.in_features``)."""
    if not isinstance(data, dict):
        raise ArtifactError("architecture must be a JSON object", field=FIELD)
    try:
        return SequentialSpec.model_validate(data)
    except ValidationError as exc:
        raise _to_artifact_error(exc) from None


def _to_artifact_error(exc: ValidationError) -> ArtifactError:
    messages: dict[str, list[str]] = {}  # path -> messages (a union field gives one per alternative)
    for error in exc.errors():
        found = messages.setdefault(_path(error["loc"]), [])
        if _message(error) not in found:
            found.append(_message(error))
    path, alternatives = next(iter(messages.items()))
    message = ", or ".join(alternatives)
    where = f"architecture.{path}" if path else "architecture"
    detail = f"invalid {where}: {message}"
    if len(messages) > 1:
        detail += f" (and {len(messages) - 1} more problem(s))"
    return ArtifactError(detail, field=f"{FIELD}.{path}" if path else FIELD)


def _path(loc: tuple[Any, ...]) -> str:
    """``('layers', 2, 'linear', 'in_features')`` -> ``layers.2.in_features`` (drops union labels)."""
    parts: list[str] = []
    previous: Any = None
    for item in loc:
        is_tag = isinstance(item, str) and isinstance(previous, int) and item in LAYER_TYPES
        is_label = isinstance(item, str) and not item.isidentifier()
        if not is_tag and not is_label:
            parts.append(str(item))
        previous = item
    return ".".join(parts)


def _message(error: Any) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "union_tag_invalid":
        return f"unknown layer type {ctx.get('tag')!r}; allowed: {', '.join(LAYER_TYPES)}"
    if kind == "union_tag_not_found":
        return "each layer needs a 'type'"
    if kind == "extra_forbidden":
        return "unexpected field (not a supported argument of this layer)"
    if kind == "missing":
        return "field required"
    return str(error["msg"]).removeprefix("Value error, ")


# ---------------------------------------------------------------------------------------- size, build


def _pair(value: int | list[int] | None) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    assert value is not None and len(value) == 2
    return value[0], value[1]


def count_parameters(spec: SequentialSpec) -> int:
    """Number of trainable parameters of ``build_module(spec)``, computed without building it."""
    return sum(_layer_parameters(layer) for layer in spec.layers)


def _layer_parameters(layer: Any) -> int:
    if isinstance(layer, Linear):
        return layer.in_features * layer.out_features + (layer.out_features if layer.bias else 0)
    if isinstance(layer, Conv2d):
        kh, kw = _pair(layer.kernel_size)
        weight = layer.out_channels * (layer.in_channels // layer.groups) * kh * kw
        return weight + (layer.out_channels if layer.bias else 0)
    if isinstance(layer, (BatchNorm1d, BatchNorm2d)):
        return 2 * layer.num_features if layer.affine else 0
    if isinstance(layer, LayerNorm):
        shape = layer.normalized_shape
        size = shape if isinstance(shape, int) else math.prod(shape)
        if not layer.elementwise_affine:
            return 0
        return size * (2 if layer.bias else 1)
    if isinstance(layer, Embedding):
        return layer.num_embeddings * layer.embedding_dim
    if isinstance(layer, Residual):
        return sum(_layer_parameters(inner) for inner in layer.body)
    return 0


class ResidualBlock(nn.Module):
    """``output = x + body(x)``; parameters live under ``body.M``."""

    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class IndexEmbedding(nn.Embedding):
    """nn.Embedding that also takes float inputs (datasets are float32) by casting them to int64 indices."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # `input`: torch's name
        if input.is_floating_point():
            input = input.long()
        return super().forward(input)


def build_module(spec: SequentialSpec, *, max_parameters: int = MAX_PARAMETERS) -> nn.Sequential:
    """Build the torch module; refuses (ArtifactError) above ``max_parameters`` before allocating."""
    count = count_parameters(spec)
    if count > max_parameters:
        raise ArtifactError(
            f"architecture has {count:,} parameters; at most {max_parameters:,} are accepted", field=FIELD
        )
    return nn.Sequential(*(_build_layer(layer) for layer in spec.layers))


def _build_layer(layer: Any) -> nn.Module:  # one branch per allow-listed layer
    if isinstance(layer, Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
    if isinstance(layer, Conv2d):
        padding = layer.padding if isinstance(layer.padding, str) else _pair(layer.padding)
        return nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            _pair(layer.kernel_size),
            stride=_pair(layer.stride),
            padding=padding,
            dilation=_pair(layer.dilation),
            groups=layer.groups,
            bias=layer.bias,
            padding_mode=layer.padding_mode,
        )
    if isinstance(layer, (BatchNorm1d, BatchNorm2d)):
        cls = nn.BatchNorm1d if isinstance(layer, BatchNorm1d) else nn.BatchNorm2d
        return cls(
            layer.num_features,
            eps=layer.eps,
            momentum=layer.momentum,
            affine=layer.affine,
            track_running_stats=layer.track_running_stats,
        )
    if isinstance(layer, LayerNorm):
        shape = layer.normalized_shape
        return nn.LayerNorm(
            shape if isinstance(shape, int) else tuple(shape),
            eps=layer.eps,
            elementwise_affine=layer.elementwise_affine,
            bias=layer.bias,
        )
    if isinstance(layer, Embedding):
        return IndexEmbedding(
            layer.num_embeddings,
            layer.embedding_dim,
            padding_idx=layer.padding_idx,
            scale_grad_by_freq=layer.scale_grad_by_freq,
        )
    if isinstance(layer, Dropout):
        return nn.Dropout(layer.p)
    if isinstance(layer, Flatten):
        return nn.Flatten(layer.start_dim, layer.end_dim)
    if isinstance(layer, MaxPool2d):
        stride = None if layer.stride is None else _pair(layer.stride)
        return nn.MaxPool2d(
            _pair(layer.kernel_size),
            stride=stride,
            padding=_pair(layer.padding),
            dilation=_pair(layer.dilation),
            ceil_mode=layer.ceil_mode,
        )
    if isinstance(layer, AvgPool2d):
        stride = None if layer.stride is None else _pair(layer.stride)
        return nn.AvgPool2d(
            _pair(layer.kernel_size),
            stride=stride,
            padding=_pair(layer.padding),
            ceil_mode=layer.ceil_mode,
            count_include_pad=layer.count_include_pad,
            divisor_override=layer.divisor_override,
        )
    if isinstance(layer, AdaptiveAvgPool2d):
        size = layer.output_size
        return nn.AdaptiveAvgPool2d(size if isinstance(size, int) else (size[0], size[1]))
    if isinstance(layer, ReLU):
        return nn.ReLU()
    if isinstance(layer, GELU):
        return nn.GELU(approximate=layer.approximate)
    if isinstance(layer, SiLU):
        return nn.SiLU()
    if isinstance(layer, Tanh):
        return nn.Tanh()
    if isinstance(layer, Sigmoid):
        return nn.Sigmoid()
    if isinstance(layer, Residual):
        return ResidualBlock(nn.Sequential(*(_build_layer(inner) for inner in layer.body)))
    raise TypeError(f"unhandled layer {type(layer).__name__}")  # unreachable: the union is closed


def parameter_count(module: nn.Module) -> int:
    """Number of parameters of a built module (buffers not counted)."""
    return sum(p.numel() for p in module.parameters())
