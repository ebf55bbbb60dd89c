"""Safe reading of safetensors files (shared by weights and datasets).

The header is parsed and checked here before the safetensors library touches the file: its length is
bounded, every tensor's byte range must match its dtype and shape and lie inside the file, and the ranges
must tile the data section exactly. So a crafted header cannot make us allocate more than the file holds.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from worker.artifacts.errors import ArtifactError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_TENSORS = 65_536
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
INT_DTYPES = frozenset({"U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"})


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name: "F32", "I64"...
    shape: tuple[int, ...]
    begin: int
    end: int


def invalid(reason: str, field: str) -> ArtifactError:
    return ArtifactError(f"not a valid safetensors file: {reason}", field=field)


def read_header(path: Path, *, field: str) -> dict[str, TensorInfo]:
    """Parse and check the header; returns the tensors by name, in file order."""
    size = path.stat().st_size
    if size < 8:
        raise invalid(f"the file is only {size} bytes long", field)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len < 2 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise invalid(f"header length {header_len} does not fit a file of {size} bytes", field)
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise invalid(f"the header is not valid JSON ({exc})", field) from None
    if not isinstance(header, dict):
        raise invalid("the header is not a JSON object", field)
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise invalid(f"{len(header)} tensors (at most {MAX_TENSORS})", field)
    infos = {name: _tensor_info(name, entry, field) for name, entry in header.items()}
    _check_layout(infos, size - 8 - header_len, field)
    return infos


def _tensor_info(name: str, entry: object, field: str) -> TensorInfo:
    if not isinstance(entry, dict):
        raise invalid(f"tensor {name!r}: entry is not an object", field)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise invalid(f"tensor {name!r}: unsupported dtype {dtype!r}", field)
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise invalid(f"tensor {name!r}: shape must be a list of non-negative integers", field)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise invalid(f"tensor {name!r}: data_offsets must be two non-negative integers", field)
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise invalid(f"tensor {name!r}: data_offsets {offsets} do not match dtype {dtype} and shape {shape}", field)
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(infos: dict[str, TensorInfo], data_size: int, field: str) -> None:
    """The byte ranges must tile [0, data_size) exactly (what the safetensors library requires too)."""
    position = 0
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.end > data_size:
            raise invalid(
                f"tensor {info.name!r} claims bytes up to {info.end} but the data section has {data_size} "
                "(truncated file?)",
                field,
            )
        if info.begin != position:
            raise invalid(f"tensor {info.name!r} has overlapping or non-contiguous data_offsets", field)
        position = info.end
    if position != data_size:
        raise invalid(f"{data_size - position} bytes after the last tensor", field)


def iter_tensors(path: Path, names: list[str], *, field: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the named tensors (CPU). Call read_header first: this assumes a checked file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in names:
                yield name, f.get_tensor(name)
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001 (the library's SafetensorError and friends: the file is at fault)
        raise invalid(str(exc), field) from None


def non_finite_reason(tensor: torch.Tensor) -> str | None:
    """'NaN' / 'Inf' / 'NaN and Inf' if a floating tensor has such values, else None."""
    if not tensor.is_floating_point():
        return None
    values = tensor.float() if tensor.dtype not in (torch.float32, torch.float64) else tensor
    has_nan = bool(torch.isnan(values).any())
    has_inf = bool(torch.isinf(values).any())
    if has_nan and has_inf:
        return "NaN and Inf"
    return "NaN" if has_nan else ("Inf" if has_inf else None)
