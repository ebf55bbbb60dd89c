"""Turning what a user has (files, tensors, numpy arrays, pandas / pyarrow tables) into upload parts.

Nothing here pickles: weights go as safetensors, arrays as ``.npz`` of plain numeric (or unicode) arrays,
tables as Parquet.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class FilePart:
    """One file part of a multipart upload: bytes in memory or a path opened afresh for each attempt."""

    field: str
    filename: str
    source: bytes | Path

    def open(self) -> IO[bytes]:
        if isinstance(self.source, bytes):
            return io.BytesIO(self.source)
        return open(self.source, "rb")


def is_path(value: object) -> bool:
    return isinstance(value, (str, os.PathLike))


def file_part(field: str, value: PathLike | bytes, default_name: str) -> FilePart:
    """A part from a path (streamed from disk) or from bytes."""
    if isinstance(value, bytes):
        return FilePart(field, default_name, value)
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{field}: no such file {path}")
    return FilePart(field, path.name, path)


def to_numpy(value: Any) -> np.ndarray:
    """A numpy array from a numpy array, a torch tensor, a list, or anything ``np.asarray`` takes."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == object:
        raise TypeError("object arrays cannot be uploaded; convert them to numbers or strings first")
    return array


def safetensors_bytes(tensors: Mapping[str, Any]) -> bytes:
    """safetensors bytes of a name → tensor/array mapping (a ``state_dict``, say)."""
    from safetensors.numpy import save

    return save({name: np.ascontiguousarray(to_numpy(value)) for name, value in tensors.items()})


def weights_part(weights: Any, field: str = "weights") -> FilePart:
    """Weights as a safetensors part, from a file path, raw safetensors bytes, a torch module or a state_dict."""
    if is_path(weights) or isinstance(weights, bytes):
        return file_part(field, weights, "weights.safetensors")
    if hasattr(weights, "state_dict"):
        weights = weights.state_dict()
    if isinstance(weights, Mapping):
        return FilePart(field, "weights.safetensors", safetensors_bytes(weights))
    raise TypeError(
        f"{field}: give a safetensors file path, bytes, a torch module or a state_dict, not {type(weights).__name__}"
    )


def npz_bytes(arrays: Mapping[str, Any]) -> bytes:
    """``.npz`` bytes of plain arrays (numbers or unicode strings: never pickled objects)."""
    buffer = io.BytesIO()
    # typed Any: numpy's stub would match a ``**`` mapping of arrays against savez's own ``allow_pickle: bool``
    named: dict[str, Any] = {name: to_numpy(value) for name, value in arrays.items()}
    np.savez(buffer, **named)
    return buffer.getvalue()


def is_arrow_table(value: object) -> bool:
    module = type(value).__module__
    return module.startswith("pyarrow") and hasattr(value, "schema")


def is_dataframe(value: object) -> bool:
    return type(value).__module__.startswith("pandas") and hasattr(value, "columns")


def parquet_bytes(table: Any) -> bytes:
    """Parquet bytes of a pyarrow Table or a pandas DataFrame (its index is dropped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if is_dataframe(table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def dataset_part(data: Any = None, **arrays: Any) -> FilePart:
    """The ``data`` part of a dataset upload.

    ``data`` is a file path (safetensors, ``.npz`` or Parquet), raw bytes of one, a pandas DataFrame or pyarrow
    Table (sent as Parquet), or a mapping of field name → array; or give the fields as keywords
    (``inputs=``, ``targets=``, ``ids=``, ``weight=``, ``task=``, ``split=``) with numpy arrays, torch tensors
    or lists (sent as ``.npz``).
    """
    given = {name: value for name, value in arrays.items() if value is not None}
    if data is not None and given:
        raise TypeError("give either data= or field keywords (inputs=, targets=, ...), not both")
    if data is None:
        if "inputs" not in given:
            raise TypeError("a dataset needs data= (a file, table or mapping) or inputs= (and targets=)")
        return FilePart("data", "data.npz", npz_bytes(given))
    if is_path(data) or isinstance(data, bytes):
        return file_part("data", data, "data.bin")
    if is_dataframe(data) or is_arrow_table(data):
        return FilePart("data", "data.parquet", parquet_bytes(data))
    if isinstance(data, Mapping):
        return FilePart("data", "data.npz", npz_bytes(data))
    raise TypeError(
        f"data: give a file path, bytes, a pandas DataFrame, a pyarrow Table or a mapping of "
        f"arrays, not {type(data).__name__}"
    )
