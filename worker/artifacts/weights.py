"""Model weights as safetensors files: strict loading into a built module, saving, serving."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from worker.artifacts.errors import ArtifactError
from worker.artifacts.safetensors_file import (
    FLOAT_DTYPES,
    INT_DTYPES,
    TensorInfo,
    iter_tensors,
    non_finite_reason,
    read_header,
)

MAX_NAMES_SHOWN = 8
# BatchNorm's step counter: not used by the forward pass in eval mode; some exporters drop it.
OPTIONAL_SUFFIX = "num_batches_tracked"


def load_weights(module: nn.Module, path: Path, *, field: str = "weights") -> None:
    """Load ``path`` into ``module`` strictly (parameters and buffers); ArtifactError if anything is off.

    Checks, before reading any tensor data: a well-formed file, the same tensor names as the module's
    state_dict, the same shapes, floating dtypes for floating tensors (integer ones for integer buffers).
    Then every tensor must be finite. Values are cast to the module's dtypes.
    """
    infos = read_header(Path(path), field=field)
    expected = module.state_dict()
    _check_names(infos, expected, field)
    for name, info in infos.items():
        _check_tensor(info, expected[name], field)
    loaded: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(Path(path), list(infos), field=field):
        _check_finite(name, tensor, field)
        loaded[name] = tensor.to(expected[name].dtype)
    for name in expected.keys() - loaded.keys():  # optional buffers absent from the file keep their value
        loaded[name] = expected[name]
    try:
        module.load_state_dict(loaded, strict=True)
    except RuntimeError as exc:  # should not happen after the checks above
        raise ArtifactError(f"weights do not fit the architecture: {exc}", field=field) from None


def _names(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:MAX_NAMES_SHOWN])
    more = len(names) - MAX_NAMES_SHOWN
    return shown + (f" (and {more} more)" if more > 0 else "")


def _check_names(infos: dict[str, TensorInfo], expected: dict[str, torch.Tensor], field: str) -> None:
    missing = [n for n in expected if n not in infos and not n.endswith(OPTIONAL_SUFFIX)]
    unexpected = [n for n in infos if n not in expected]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    if problems:
        raise ArtifactError(f"weights do not fit the architecture: {'; '.join(problems)}", field=field)


def _check_tensor(info: TensorInfo, expected: torch.Tensor, field: str) -> None:
    if info.shape != tuple(expected.shape):
        raise ArtifactError(
            f"weights do not fit the architecture: tensor {info.name!r} has shape {list(info.shape)} "
            f"in the file but the architecture expects {list(expected.shape)}",
            field=field,
        )
    allowed = FLOAT_DTYPES if expected.is_floating_point() else INT_DTYPES
    if info.dtype not in allowed:
        kind = "floating" if expected.is_floating_point() else "integer"
        raise ArtifactError(
            f"tensor {info.name!r} has dtype {info.dtype}; a {kind} dtype is needed ({', '.join(sorted(allowed))})",
            field=field,
        )


def _check_finite(name: str, tensor: torch.Tensor, field: str) -> None:
    reason = non_finite_reason(tensor)
    if reason:
        raise ArtifactError(f"tensor {name!r} contains {reason} values", field=field)


def read_state_dict(path: Path, *, field: str = "weights") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors weights file, checked (well-formed, numeric, finite)."""
    infos = read_header(Path(path), field=field)
    for info in infos.values():
        if info.dtype not in FLOAT_DTYPES | INT_DTYPES:
            raise ArtifactError(f"tensor {info.name!r} has unsupported dtype {info.dtype}", field=field)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(Path(path), list(infos), field=field):
        _check_finite(name, tensor, field)
        state[name] = tensor
    return state


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state_dict as safetensors (CPU, contiguous, no shared storage); atomic replace."""
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state_dict.items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
