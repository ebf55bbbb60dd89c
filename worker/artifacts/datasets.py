"""Datasets: safetensors, .npz (never unpickled) or Parquet files, validated into numpy arrays.

Fields: ``inputs`` and ``targets`` (required), ``ids`` (unique int64 or strings; default 0..N-1), ``weight``
(finite, >= 0), ``task`` (int) and ``split`` (0 = task train, 1 = task validation). Every failure is an
ArtifactError whose ``field`` is ``"<field>.<name>"`` (e.g. ``data.inputs``) or ``"<field>"`` for the file.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from worker.artifacts.errors import ArtifactError
from worker.artifacts.safetensors_file import iter_tensors, read_header
from worker.attribution.types import Examples

Format = Literal["safetensors", "npz", "parquet"]
FIELDS = ("inputs", "targets", "ids", "weight", "task", "split")
RESERVED_COLUMNS = frozenset({"targets", "ids", "task", "split", "weight"})
MAX_BYTES = 4 * 1024**3  # default cap on the decompressed size of a .npz / Parquet file
MAX_ID_LENGTH = 256  # characters in a string id
MAX_INPUT_DIMS = 8


@dataclass
class DatasetArrays:
    inputs: np.ndarray  # float32 (N, ...)
    targets: np.ndarray  # int64 or float32, (N,) or (N, d)
    ids: np.ndarray  # int64 or unicode (N,)
    weight: np.ndarray | None = None  # float32 (N,)
    task: np.ndarray | None = None  # int64 (N,)
    split: np.ndarray | None = None  # int64 (N,), values 0/1

    @property
    def ids_are_strings(self) -> bool:
        return self.ids.dtype.kind == "U"

    @property
    def num_examples(self) -> int:
        return int(self.inputs.shape[0])


# ------------------------------------------------------------------------------------------ detection


def detect_format(filename: str, head: bytes) -> Format:
    """The file's format from its first bytes (at least 9 are needed for safetensors)."""
    if head.startswith(b"PK\x03\x04"):
        return "npz"
    if head.startswith(b"PAR1"):
        return "parquet"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") >= 2:
        return "safetensors"
    raise ArtifactError(
        f"unsupported dataset format for {filename!r}: expected safetensors, .npz (numpy) or Parquet",
        field="data",
    )


def read_dataset(
    path: Path, fmt: str, *, max_rows: int, max_bytes: int = MAX_BYTES, field: str = "data"
) -> DatasetArrays:
    """Read and validate a dataset file of format ``fmt`` (see detect_format)."""
    path = Path(path)
    if fmt == "safetensors":
        arrays = _read_safetensors(path, max_rows, field)
    elif fmt == "npz":
        arrays = _read_npz(path, max_rows, max_bytes, field)
    elif fmt == "parquet":
        arrays = _read_parquet(path, max_rows, max_bytes, field)
    else:
        raise ArtifactError(f"unsupported dataset format {fmt!r}", field=field)
    return validate_arrays(arrays, max_rows=max_rows, field=field)


# ------------------------------------------------------------------------------------------- readers


def _check_names(names: list[str], field: str) -> None:
    for name in names:
        if name not in FIELDS:
            raise ArtifactError(f"unexpected field {name!r}; allowed: {', '.join(FIELDS)}", field=f"{field}.{name}")


def _read_safetensors(path: Path, max_rows: int, field: str) -> dict[str, np.ndarray]:
    infos = read_header(path, field=field)
    _check_names(list(infos), field)
    for info in infos.values():
        if info.shape and info.shape[0] > max_rows:
            raise _too_many_rows(info.shape[0], max_rows, field)
    arrays = {}
    for name, tensor in iter_tensors(path, list(infos), field=field):
        if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            tensor = tensor.float()
        arrays[name] = tensor.numpy()
    return arrays


def _read_npz(path: Path, max_rows: int, max_bytes: int, field: str) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            names = [m.filename.removesuffix(".npy") for m in members]
            if len(set(names)) != len(names):
                raise ArtifactError("not a valid .npz file: repeated member names", field=field)
            _check_names(names, field)
            total = sum(m.file_size for m in members)
            if total > max_bytes:
                raise ArtifactError(
                    f"the .npz file holds {total:,} bytes uncompressed (at most {max_bytes:,})", field=field
                )
            for member in members:
                _check_npy_header(archive, member, max_rows, max_bytes, field)
    except ArtifactError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ArtifactError(f"not a valid .npz file: {exc}", field=field) from None
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for name in npz.files:
                arrays[name] = _npz_member(npz, name, field)
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001 (zlib / zipfile / numpy format errors: the file is at fault)
        raise ArtifactError(f"not a valid .npz file: {exc}", field=field) from None
    return arrays


def _check_npy_header(
    archive: zipfile.ZipFile, member: zipfile.ZipInfo, max_rows: int, max_bytes: int, field: str
) -> None:
    """Shape and dtype from a member's .npy header (its first bytes), checked before anything is decompressed."""
    name = member.filename.removesuffix(".npy")
    with archive.open(member) as stream:
        try:
            version = np.lib.format.read_magic(stream)
        except ValueError:
            raise ArtifactError(f"{name}: member is not a .npy array", field=f"{field}.{name}") from None
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)  # the header only: no data, no pickle
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ArtifactError(f"{name}: unsupported .npy format version {version}", field=f"{field}.{name}")
    if dtype.hasobject:
        raise ArtifactError(
            f"{name}: pickled data is not accepted (object arrays cannot be loaded safely)", field=f"{field}.{name}"
        )
    if shape and shape[0] > max_rows:
        raise _too_many_rows(shape[0], max_rows, field)
    size = math.prod(shape) * dtype.itemsize
    if size > max_bytes:
        raise ArtifactError(f"{name}: the array holds {size:,} bytes (at most {max_bytes:,})", field=f"{field}.{name}")


def _npz_member(npz: np.lib.npyio.NpzFile, name: str, field: str) -> np.ndarray:
    try:
        value = npz[name]
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise ArtifactError(
                f"{name}: pickled data is not accepted (object arrays cannot be loaded safely)",
                field=f"{field}.{name}",
            ) from None
        raise
    if not isinstance(value, np.ndarray):
        raise ArtifactError(f"{name}: member is not a .npy array", field=f"{field}.{name}")
    return value


def _read_parquet(path: Path, max_rows: int, max_bytes: int, field: str) -> dict[str, np.ndarray]:
    try:
        parquet = pq.ParquetFile(path)
        meta = parquet.metadata
        if meta.num_rows > max_rows:
            raise _too_many_rows(meta.num_rows, max_rows, field)
        size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if size > max_bytes:
            raise ArtifactError(
                f"the Parquet file holds {size:,} bytes uncompressed (at most {max_bytes:,})", field=field
            )
        table = parquet.read()
    except ArtifactError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ArtifactError(f"not a valid Parquet file: {exc}", field=field) from None
    input_shape = _input_shape(meta.metadata or {}, field)
    arrays = {}
    for name in RESERVED_COLUMNS & set(table.column_names):
        arrays[name] = _column(table.column(name), name, field)
    if "inputs" in table.column_names:
        arrays["inputs"] = _column(table.column("inputs"), "inputs", field)
    else:
        arrays["inputs"] = _tabular_inputs(table, field)
    if input_shape is not None:
        arrays["inputs"] = _reshape_inputs(arrays["inputs"], input_shape, field)
    return arrays


def _input_shape(metadata: dict[bytes, bytes], field: str) -> tuple[int, ...] | None:
    raw = metadata.get(b"input_shape")
    if raw is None:
        return None
    try:
        shape = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        shape = None
    ok = isinstance(shape, list) and 1 <= len(shape) <= MAX_INPUT_DIMS
    if not ok or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ArtifactError(
            "the Parquet metadata 'input_shape' must be a JSON list of positive integers", field=f"{field}.input_shape"
        )
    return tuple(shape)


def _reshape_inputs(inputs: np.ndarray, shape: tuple[int, ...], field: str) -> np.ndarray:
    per_row = math.prod(inputs.shape[1:])
    if per_row != math.prod(shape):
        raise ArtifactError(
            f"inputs: input_shape {list(shape)} does not match the {per_row} values per row", field=f"{field}.inputs"
        )
    return inputs.reshape((inputs.shape[0], *shape))


def _tabular_inputs(table: pa.Table, field: str) -> np.ndarray:
    columns = []
    for name in table.column_names:
        data_type = table.schema.field(name).type
        if name in RESERVED_COLUMNS or name.startswith("__index_level_"):
            continue
        if pa.types.is_integer(data_type) or pa.types.is_floating(data_type):
            columns.append(_column(table.column(name), name, field).astype(np.float64))
    if not columns:
        raise ArtifactError("inputs: no 'inputs' column and no numeric feature columns", field=f"{field}.inputs")
    return np.stack(columns, axis=1)


# the arrays of list columns: (N, d1, ...) tensors when every list of a level has one length
LIST_ARRAYS = (pa.ListArray, pa.LargeListArray, pa.FixedSizeListArray)


def _column(column: pa.ChunkedArray, name: str, field: str) -> np.ndarray:
    """A column as numpy: scalars -> (N,), (nested) lists of equal length -> (N, d1, d2...), strings -> 'U'."""
    array = column.combine_chunks()
    if isinstance(array, pa.DictionaryArray):
        array = array.dictionary_decode()
    rows = len(array)
    shape: list[int] = [rows]
    while isinstance(array, LIST_ARRAYS):
        _no_nulls(array, name, field)
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            raise ArtifactError(f"{name}: list values of different lengths in one column", field=f"{field}.{name}")
        shape.append(int(lengths[0]) if len(lengths) else 0)
        array = array.flatten()
    _no_nulls(array, name, field)
    if isinstance(array, (pa.StringArray, pa.LargeStringArray)):
        return _string_column(array, name, field, shape)
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_boolean(array.type)):
        raise ArtifactError(f"{name}: column type {array.type} is not numeric", field=f"{field}.{name}")
    return array.to_numpy(zero_copy_only=False).reshape(shape)


def _string_column(array: pa.StringArray | pa.LargeStringArray, name: str, field: str, shape: list[int]) -> np.ndarray:
    if len(shape) != 1:
        raise ArtifactError(f"{name}: lists of strings are not accepted", field=f"{field}.{name}")
    if len(array) and pc.max(pc.utf8_length(array)).as_py() > MAX_ID_LENGTH:
        raise ArtifactError(f"{name}: strings longer than {MAX_ID_LENGTH} characters", field=f"{field}.{name}")
    return array.to_numpy(zero_copy_only=False).astype(str).reshape(shape)


def _no_nulls(array: pa.Array, name: str, field: str) -> None:
    if array.null_count:
        raise ArtifactError(f"{name}: {array.null_count} missing (null) values", field=f"{field}.{name}")


# ---------------------------------------------------------------------------------------- validation


def _too_many_rows(rows: int, max_rows: int, field: str) -> ArtifactError:
    return ArtifactError(f"the dataset has {rows:,} rows; at most {max_rows:,} are accepted", field=field)


def validate_arrays(arrays: dict[str, np.ndarray], *, max_rows: int, field: str = "data") -> DatasetArrays:
    """Check and normalise raw arrays (any format) into a DatasetArrays."""
    _check_names(list(arrays), field)
    for name in ("inputs", "targets"):
        if name not in arrays:
            raise ArtifactError(f"the dataset has no {name!r} field", field=f"{field}.{name}")
    n = _common_length(arrays, field)
    if n < 1:
        raise ArtifactError("the dataset has no rows", field=field)
    if n > max_rows:
        raise _too_many_rows(n, max_rows, field)
    return DatasetArrays(
        inputs=_inputs(arrays["inputs"], field),
        targets=_targets(arrays["targets"], field),
        ids=_ids(arrays["ids"], field) if "ids" in arrays else np.arange(n, dtype=np.int64),
        weight=_weight(arrays["weight"], field) if "weight" in arrays else None,
        task=_integer_column(arrays["task"], "task", field) if "task" in arrays else None,
        split=_split(arrays["split"], field) if "split" in arrays else None,
    )


def _common_length(arrays: dict[str, np.ndarray], field: str) -> int:
    for name, array in arrays.items():
        if array.ndim == 0:
            raise ArtifactError(f"{name}: a scalar; expected one row per example", field=f"{field}.{name}")
    n = arrays["inputs"].shape[0]
    for name, array in arrays.items():
        if array.shape[0] != n:
            raise ArtifactError(
                f"{name} has {array.shape[0]} rows but inputs has {n}; all fields need the same length",
                field=f"{field}.{name}",
            )
    return int(n)


def _kind(array: np.ndarray) -> str:
    """'int' (integers and booleans), 'float', 'str' or 'other'."""
    kind = array.dtype.kind
    return {"b": "int", "i": "int", "u": "int", "f": "float", "U": "str"}.get(kind, "other")


def _inputs(array: np.ndarray, field: str) -> np.ndarray:
    if _kind(array) not in ("int", "float"):
        raise ArtifactError(f"inputs: dtype {array.dtype} is not numeric", field=f"{field}.inputs")
    if array.ndim > MAX_INPUT_DIMS + 1:
        raise ArtifactError(f"inputs: {array.ndim} dimensions (at most {MAX_INPUT_DIMS + 1})", field=f"{field}.inputs")
    with np.errstate(over="ignore", invalid="ignore"):
        inputs = np.ascontiguousarray(array, dtype=np.float32)
    _check_finite(inputs, "inputs", field)
    return inputs


def _check_finite(array: np.ndarray, name: str, field: str) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ArtifactError(
            f"{name} contain NaN or Inf values (or values too large for float32), first at row {row}",
            field=f"{field}.{name}",
        )


def _targets(array: np.ndarray, field: str) -> np.ndarray:
    kind = _kind(array)
    if array.ndim > 2:
        raise ArtifactError(f"targets: shape {list(array.shape)}; expected (N,) or (N, d)", field=f"{field}.targets")
    if kind == "int":
        _check_int64_range(array, "targets", field)
        return np.ascontiguousarray(array, dtype=np.int64)
    if kind == "float":
        with np.errstate(over="ignore", invalid="ignore"):
            targets = np.ascontiguousarray(array, dtype=np.float32)
        _check_finite(targets, "targets", field)
        return targets
    raise ArtifactError(f"targets: dtype {array.dtype} is not numeric", field=f"{field}.targets")


def _check_int64_range(array: np.ndarray, name: str, field: str) -> None:
    if array.dtype == np.uint64 and array.size and array.max() > np.iinfo(np.int64).max:
        raise ArtifactError(f"{name}: values too large for int64", field=f"{field}.{name}")


def _one_dimensional(array: np.ndarray, name: str, field: str) -> None:
    if array.ndim != 1:
        raise ArtifactError(f"{name}: shape {list(array.shape)}; expected (N,)", field=f"{field}.{name}")


def _ids(array: np.ndarray, field: str) -> np.ndarray:
    _one_dimensional(array, "ids", field)
    if array.dtype.kind == "S":
        try:
            array = np.char.decode(array, "utf-8")
        except UnicodeDecodeError:
            raise ArtifactError("ids: byte strings that are not UTF-8", field=f"{field}.ids") from None
    kind = _kind(array)
    if kind == "str":
        if array.dtype.itemsize // 4 > MAX_ID_LENGTH and int(np.char.str_len(array).max()) > MAX_ID_LENGTH:
            raise ArtifactError(f"ids: strings longer than {MAX_ID_LENGTH} characters", field=f"{field}.ids")
        ids = np.ascontiguousarray(array, dtype=str)
    elif kind == "int" and array.dtype.kind != "b":
        _check_int64_range(array, "ids", field)
        ids = np.ascontiguousarray(array, dtype=np.int64)
    else:
        raise ArtifactError(f"ids: dtype {array.dtype}; ids must be integers or strings", field=f"{field}.ids")
    _check_unique(ids, field)
    return ids


def _check_unique(ids: np.ndarray, field: str) -> None:
    values, counts = np.unique(ids, return_counts=True)
    repeated = np.flatnonzero(counts > 1)
    if repeated.size:
        value = values[repeated[0]].item()
        raise ArtifactError(
            f"ids must be unique: id {value!r} appears {int(counts[repeated[0]])} times "
            f"({repeated.size} repeated id(s) in all)",
            field=f"{field}.ids",
        )


def _weight(array: np.ndarray, field: str) -> np.ndarray:
    _one_dimensional(array, "weight", field)
    if _kind(array) not in ("int", "float"):
        raise ArtifactError(f"weight: dtype {array.dtype} is not numeric", field=f"{field}.weight")
    with np.errstate(over="ignore", invalid="ignore"):
        weight = np.ascontiguousarray(array, dtype=np.float32)
    _check_finite(weight, "weight", field)
    if (weight < 0).any():
        row = int(np.flatnonzero(weight < 0)[0])
        raise ArtifactError(f"weight must be >= 0 (row {row} is {weight[row]})", field=f"{field}.weight")
    return weight


def _integer_column(array: np.ndarray, name: str, field: str) -> np.ndarray:
    _one_dimensional(array, name, field)
    if _kind(array) != "int" or array.dtype.kind == "b":
        raise ArtifactError(f"{name}: dtype {array.dtype}; integers are needed", field=f"{field}.{name}")
    _check_int64_range(array, name, field)
    return np.ascontiguousarray(array, dtype=np.int64)


def _split(array: np.ndarray, field: str) -> np.ndarray:
    split = _integer_column(array, "split", field)
    bad = (split != 0) & (split != 1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ArtifactError(
            f"split values must be 0 (task train) or 1 (task validation); row {row} is {split[row]}",
            field=f"{field}.split",
        )
    return split


# ------------------------------------------------------------------------------------ description, use


def _dtype_name(array: np.ndarray) -> str:
    return "string" if array.dtype.kind == "U" else str(array.dtype)


def describe(ds: DatasetArrays) -> dict:
    """``{"num_examples": N, "fields": {name: {"dtype", "shape"}}}`` for the present fields."""
    fields = {}
    for name in ("inputs", "targets", "ids", "weight", "task", "split"):
        array = getattr(ds, name)
        if array is not None:
            fields[name] = {"dtype": _dtype_name(array), "shape": [int(d) for d in array.shape]}
    return {"num_examples": ds.num_examples, "fields": fields}


def to_examples(ds: DatasetArrays) -> Examples:
    """Tensor form for the attribution engine (ids stay with the caller)."""

    def tensor(array: np.ndarray | None) -> torch.Tensor | None:
        return None if array is None else torch.from_numpy(np.ascontiguousarray(array))

    return Examples(
        inputs=torch.from_numpy(ds.inputs),
        targets=torch.from_numpy(ds.targets),
        weights=tensor(ds.weight),
        task=tensor(ds.task),
        split=tensor(ds.split),
    )


def check_targets(ds: DatasetArrays, loss: str, num_outputs: int | None) -> None:
    """Targets must suit the loss and the model's output dimension (when known)."""
    targets, n = ds.targets, ds.num_examples
    where = "data.targets"
    if loss == "cross_entropy":
        if targets.dtype != np.int64 or targets.ndim != 1:
            raise ArtifactError(
                f"cross_entropy needs integer class indices of shape ({n},); targets are {_dtype_name(targets)} "
                f"of shape {list(targets.shape)}",
                field=where,
            )
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or (num_outputs is not None and high >= num_outputs):
            limit = f"[0, {num_outputs})" if num_outputs is not None else ">= 0"
            raise ArtifactError(
                f"targets must be class indices in {limit}; found values from {low} to {high}", field=where
            )
    elif loss == "mse":
        if targets.dtype != np.float32:
            raise ArtifactError(f"mse needs float targets; targets are {_dtype_name(targets)}", field=where)
        shape = list(targets.shape)
        if num_outputs is None:
            return
        if shape != [n, num_outputs] and not (num_outputs == 1 and shape == [n]):
            expected = f"({n}, {num_outputs})" + (f" or ({n},)" if num_outputs == 1 else "")
            raise ArtifactError(
                f"mse targets of shape {shape} do not match the model's {num_outputs} outputs; expected {expected}",
                field=where,
            )
    else:
        raise ArtifactError(f"loss {loss!r} is not supported for datasets yet", field="loss")


def check_inputs_fit(module: nn.Module, ds: DatasetArrays, loss: str) -> int:
    """Run the model on the first 2 rows; returns its output dimension, then checks the targets."""
    sample = torch.from_numpy(ds.inputs[:2])
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            output = module(sample)
    except Exception as exc:  # noqa: BLE001 (any torch failure means the inputs do not fit)
        raise ArtifactError(
            f"dataset inputs of shape {list(ds.inputs.shape)} do not fit the model: {exc}", field="data.inputs"
        ) from None
    finally:
        module.train(was_training)
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ArtifactError(
            f"the model's output for inputs of shape {list(sample.shape)} is {shape}; expected (batch, outputs)",
            field="data.inputs",
        )
    num_outputs = int(output.shape[-1])
    check_targets(ds, loss, num_outputs)
    return num_outputs


def check_ids(array: np.ndarray, field: str = "data") -> np.ndarray:
    """Validated example ids (unique int64 or strings), for other dataset kinds (text datasets)."""
    return _ids(array, field)
