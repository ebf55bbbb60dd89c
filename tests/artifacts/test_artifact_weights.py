"""Safetensors weights: strict loading, corrupt and crafted files, saving and serving."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file
from torch import nn

from worker.artifacts.errors import ArtifactError
from worker.artifacts.spec import build_module, parse_architecture
from worker.artifacts.weights import load_weights, read_state_dict, save_weights

ARCH = {
    "type": "sequential",
    "layers": [
        {"type": "conv2d", "in_channels": 1, "out_channels": 4, "kernel_size": 3, "padding": 1},
        {"type": "batchnorm2d", "num_features": 4},
        {"type": "relu"},
        {
            "type": "residual",
            "body": [
                {"type": "conv2d", "in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding": 1},
                {"type": "relu"},
            ],
        },
        {"type": "flatten"},
        {"type": "linear", "in_features": 64, "out_features": 3},
    ],
}


class Residual(nn.Module):
    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def reference_model() -> nn.Sequential:
    """The equivalent model written by hand in plain torch, trained a bit so buffers are non-trivial."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())),
        nn.Flatten(),
        nn.Linear(64, 3),
    )
    model(torch.randn(8, 1, 4, 4))  # updates running stats and num_batches_tracked
    return model.eval()


def built() -> nn.Sequential:
    return build_module(parse_architecture(ARCH))


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_torch_state_dict_loads_as_is(tmp_path: Path) -> None:
    reference = reference_model()
    path = write(tmp_path / "w.safetensors", reference.state_dict())
    model = built()
    load_weights(model, path)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    x = torch.randn(2, 1, 4, 4)
    assert torch.allclose(model.eval()(x), reference(x))


def test_save_read_round_trip(tmp_path: Path) -> None:
    state = reference_model().state_dict()
    save_weights(state, tmp_path / "w.safetensors")
    served = read_state_dict(tmp_path / "w.safetensors")
    assert served.keys() == state.keys()
    assert all(torch.equal(served[k], state[k]) for k in state)
    load_weights(built(), tmp_path / "w.safetensors")


def test_half_precision_is_cast(tmp_path: Path) -> None:
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in reference_model().state_dict().items()}
    model = built()
    load_weights(model, write(tmp_path / "w.safetensors", state))
    assert model[0].weight.dtype == torch.float32


def test_missing_num_batches_tracked_is_tolerated(tmp_path: Path) -> None:
    state = reference_model().state_dict()
    del state["1.num_batches_tracked"]
    load_weights(built(), write(tmp_path / "w.safetensors", state))


def load_error(
    tmp_path: Path, tensors: dict[str, torch.Tensor] | None = None, raw: bytes | None = None
) -> ArtifactError:
    path = tmp_path / "w.safetensors"
    if raw is not None:
        path.write_bytes(raw)
    else:
        write(path, tensors or {})
    with pytest.raises(ArtifactError) as info:
        load_weights(built(), path)
    assert info.value.field == "weights"
    return info.value


def test_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    state = reference_model().state_dict()
    del state["3.body.0.weight"], state["1.running_var"]
    state["9.weight"] = torch.zeros(2)
    detail = load_error(tmp_path, state).detail
    assert "missing tensors: 1.running_var, 3.body.0.weight" in detail
    assert "unexpected tensors: 9.weight" in detail


def test_shape_mismatch_names_tensor_and_shapes(tmp_path: Path) -> None:
    state = reference_model().state_dict()
    state["5.weight"] = torch.zeros(3, 63)
    detail = load_error(tmp_path, state).detail
    assert "'5.weight'" in detail and "[3, 63]" in detail and "[3, 64]" in detail


def test_integer_weights_refused(tmp_path: Path) -> None:
    state = reference_model().state_dict()
    state["5.bias"] = torch.zeros(3, dtype=torch.int32)
    detail = load_error(tmp_path, state).detail
    assert "'5.bias'" in detail and "I32" in detail and "floating" in detail


@pytest.mark.parametrize(("value", "word"), [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weights(tmp_path: Path, value: float, word: str) -> None:
    state = reference_model().state_dict()
    state["3.body.0.weight"][0, 0, 0, 0] = value
    detail = load_error(tmp_path, state).detail
    assert "'3.body.0.weight'" in detail and word in detail


def test_non_finite_buffer(tmp_path: Path) -> None:
    state = reference_model().state_dict()
    state["1.running_var"][1] = float("nan")
    assert "'1.running_var'" in load_error(tmp_path, state).detail


def valid_bytes() -> bytes:
    return save({k: v.contiguous() for k, v in reference_model().state_dict().items()})


@pytest.mark.parametrize("raw", [b"", b"abc", b"\x00" * 8])
def test_too_short(tmp_path: Path, raw: bytes) -> None:
    assert "not a valid safetensors file" in load_error(tmp_path, raw=raw).detail


def test_truncated(tmp_path: Path) -> None:
    raw = valid_bytes()
    detail = load_error(tmp_path, raw=raw[: len(raw) - 10]).detail
    assert "not a valid safetensors file" in detail and "truncated" in detail


def test_corrupt_header(tmp_path: Path) -> None:
    raw = bytearray(valid_bytes())
    raw[8:12] = b"#!?x"
    assert "not valid JSON" in load_error(tmp_path, raw=bytes(raw)).detail


def test_header_length_beyond_file(tmp_path: Path) -> None:
    raw = struct.pack("<Q", 2**62) + b"{}"
    assert "header length" in load_error(tmp_path, raw=raw).detail


def crafted(entries: dict, data: bytes = b"") -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header)) + header + data


def test_header_claiming_huge_offsets(tmp_path: Path) -> None:
    raw = crafted({"5.bias": {"dtype": "F32", "shape": [10**11], "data_offsets": [0, 4 * 10**11]}}, b"\x00" * 16)
    detail = load_error(tmp_path, raw=raw).detail
    assert "not a valid safetensors file" in detail and "'5.bias'" in detail


def test_header_offsets_not_matching_shape(tmp_path: Path) -> None:
    raw = crafted({"x": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4]}}, b"\x00" * 4)
    assert "do not match" in load_error(tmp_path, raw=raw).detail


def test_overlapping_offsets(tmp_path: Path) -> None:
    raw = crafted(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\x00" * 12,
    )
    assert "overlapping" in load_error(tmp_path, raw=raw).detail


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "X99", "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0]},
        "nonsense",
    ],
)
def test_malformed_entries(tmp_path: Path, entry: object) -> None:
    assert "not a valid safetensors file" in load_error(tmp_path, raw=crafted({"x": entry}, b"\x00" * 4)).detail


def test_read_state_dict_refuses_nan(tmp_path: Path) -> None:
    path = write(tmp_path / "w.safetensors", {"a": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ArtifactError, match="'a' contains NaN"):
        read_state_dict(path)
