"""Declarative architectures: validation, analytic parameter count, module construction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.artifacts.errors import ArtifactError
from worker.artifacts.spec import (
    SequentialSpec,
    build_module,
    count_parameters,
    parameter_count,
    parse_architecture,
)

EVERY_LAYER = [
    {"type": "conv2d", "in_channels": 3, "out_channels": 8, "kernel_size": 3, "padding": 1},
    {"type": "batchnorm2d", "num_features": 8},
    {"type": "relu"},
    {
        "type": "conv2d",
        "in_channels": 8,
        "out_channels": 8,
        "kernel_size": [3, 1],
        "padding": "same",
        "groups": 2,
        "bias": False,
    },
    {"type": "maxpool2d", "kernel_size": 2},
    {
        "type": "residual",
        "body": [
            {"type": "conv2d", "in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 1},
            {"type": "gelu", "approximate": "tanh"},
        ],
    },
    {"type": "avgpool2d", "kernel_size": 2, "stride": 1, "padding": 1},
    {"type": "adaptive_avgpool2d", "output_size": [2, 2]},
    {"type": "flatten"},
    {"type": "linear", "in_features": 32, "out_features": 16},
    {"type": "batchnorm1d", "num_features": 16},
    {"type": "layernorm", "normalized_shape": 16},
    {"type": "silu"},
    {"type": "dropout", "p": 0.1},
    {
        "type": "residual",
        "body": [{"type": "linear", "in_features": 16, "out_features": 16, "bias": False}, {"type": "tanh"}],
    },
    {"type": "layernorm", "normalized_shape": [16], "bias": False},
    {"type": "sigmoid"},
    {"type": "linear", "in_features": 16, "out_features": 5},
]


def spec(layers: list[dict]) -> SequentialSpec:
    return parse_architecture({"type": "sequential", "layers": layers})


def test_every_layer_builds_and_runs() -> None:
    model = build_module(spec(EVERY_LAYER)).eval()
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    keys = model.state_dict().keys()
    assert {
        "0.weight",
        "0.bias",
        "1.running_mean",
        "1.num_batches_tracked",
        "5.body.0.weight",
        "14.body.0.weight",
    } <= set(keys)
    assert "3.bias" not in keys and "14.body.0.bias" not in keys and "15.bias" not in keys


@pytest.mark.parametrize(
    "layer",
    [
        *EVERY_LAYER,
        {"type": "embedding", "num_embeddings": 10, "embedding_dim": 4, "padding_idx": 0},
        {"type": "batchnorm1d", "num_features": 4, "affine": False},
        {"type": "layernorm", "normalized_shape": [2, 3], "elementwise_affine": False},
        {"type": "layernorm", "normalized_shape": [2, 3]},
        {"type": "linear", "in_features": 7, "out_features": 3, "bias": False},
    ],
)
def test_count_parameters_matches_torch(layer: dict) -> None:
    s = spec([layer])
    assert count_parameters(s) == parameter_count(build_module(s))


def test_count_whole_model() -> None:
    s = spec(EVERY_LAYER)
    assert count_parameters(s) == sum(p.numel() for p in build_module(s).parameters())


def test_embedding_takes_float_indices() -> None:
    model = build_module(
        spec(
            [
                {"type": "embedding", "num_embeddings": 10, "embedding_dim": 4},
                {"type": "flatten"},
                {"type": "linear", "in_features": 12, "out_features": 2},
            ]
        )
    )
    assert isinstance(model[0], nn.Embedding)
    assert model(torch.tensor([[1.0, 2.0, 9.0]])).shape == (1, 2)


def test_huge_spec_refused_before_allocating() -> None:
    s = spec([{"type": "linear", "in_features": 1_000_000, "out_features": 1_000_000}])
    assert count_parameters(s) == 10**12 + 10**6
    with pytest.raises(ArtifactError, match="parameters") as info:
        build_module(s)
    assert info.value.field == "metadata.architecture"


def bad(data: dict) -> ArtifactError:
    with pytest.raises(ArtifactError) as info:
        parse_architecture(data)
    return info.value


def test_unknown_layer_type_names_path() -> None:
    error = bad({"type": "sequential", "layers": [{"type": "relu"}, {"type": "relu"}, {"type": "foo"}]})
    assert error.field == "metadata.architecture.layers.2"
    assert "unknown layer type 'foo'" in error.detail and "layers.2" in error.detail


@pytest.mark.parametrize(
    ("layers", "path", "words"),
    [
        ([{"type": "linear", "in_features": 0, "out_features": 2}], "layers.0.in_features", "greater than"),
        ([{"type": "linear", "in_features": "4", "out_features": 2}], "layers.0.in_features", "integer"),
        ([{"type": "linear", "in_features": True, "out_features": 2}], "layers.0.in_features", "integer"),
        ([{"type": "linear", "in_features": 4}], "layers.0.out_features", "required"),
        ([{"type": "relu", "inplace": True}], "layers.0.inplace", "False"),
        ([{"type": "linear", "in_features": 4, "out_features": 2, "foo": 1}], "layers.0.foo", "unexpected field"),
        ([{"in_features": 4}], "layers.0", "'type'"),
        ([{"type": "residual", "body": [{"type": "relu"}, {"type": "bar"}]}], "layers.0.body.1", "unknown layer"),
        ([{"type": "residual", "body": []}], "layers.0.body", "at least 1"),
        (
            [{"type": "conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 3, "groups": 2}],
            "layers.0",
            "divisible",
        ),
        (
            [{"type": "conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": [3, 3, 3]}],
            "layers.0.kernel_size",
            "at most 2",
        ),
        ([{"type": "dropout", "p": 1.5}], "layers.0.p", "less than"),
        ([], "layers", "at least 1"),
    ],
)
def test_bad_layers(layers: list, path: str, words: str) -> None:
    error = bad({"type": "sequential", "layers": layers})
    assert error.field == f"metadata.architecture.{path}", error.detail
    assert words in error.detail


def test_bad_top_level() -> None:
    assert bad({"type": "graph", "layers": [{"type": "relu"}]}).field == "metadata.architecture.type"
    assert bad([]).field == "metadata.architecture"  # type: ignore[arg-type]


def test_deep_nesting_refused() -> None:
    layer: dict = {"type": "relu"}
    for _ in range(40):
        layer = {"type": "residual", "body": [layer]}
    error = bad({"type": "sequential", "layers": [layer]})
    assert "nested" in error.detail
