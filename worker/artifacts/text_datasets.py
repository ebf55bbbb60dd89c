"""Text datasets for language models and text classifiers: token ids, masks, labels; or text tokenized here.

Fields: ``input_ids`` (integers, (N, T)), optional ``attention_mask`` ((N, T) of 0/1; default all ones),
optional ``labels`` ((N, T); -100 = not scored; default: ``input_ids`` where the mask is 1, else -100),
optional ``targets`` (sequence classification: class indices (N,) or float (N, d); not with ``labels``) and
optional ``ids``. In safetensors or Parquet (list columns of varying length are padded). Or Parquet with a
``text`` column, or ``prompt`` + ``completion`` columns (only completion tokens are scored), tokenized with an
uploaded tokenizer (the ``tokenizers`` library: no code runs), truncated to ``max_length`` and padded.

The validated dataset is stored in one canonical form (Parquet of the fields above, rows padded to one length)
that the worker reads back with ``read_stored``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer

from worker.artifacts.datasets import check_ids
from worker.artifacts.errors import ArtifactError
from worker.artifacts.safetensors_file import iter_tensors, read_header

TOKEN_FIELDS = ("input_ids", "attention_mask", "labels", "targets", "ids")
TEXT_COLUMNS = ("text", "prompt", "completion")
IGNORE_INDEX = -100
MAX_TOKEN_ID = 2**31 - 1
MAX_LENGTH = 32_768
STORED_FORMAT = "text"
Padding = Literal["longest", "max_length"]


@dataclass(frozen=True)
class TokenizeOptions:
    """How text columns become tokens (``metadata.max_length``, ``padding``, ``truncation``)."""

    tokenizer: Tokenizer
    max_length: int = 512
    padding: Padding = "longest"
    truncation: bool = True
    pad_id: int = 0
    add_special_tokens: bool = True


@dataclass
class TextArrays:
    input_ids: np.ndarray  # int64 (N, T)
    attention_mask: np.ndarray  # int64 (N, T), 0/1
    ids: np.ndarray  # int64 or unicode (N,)
    labels: np.ndarray | None = None  # int64 (N, T), -100 = not scored (causal LM)
    targets: np.ndarray | None = None  # int64 (N,) or float32 (N, d) (sequence classification)

    @property
    def num_examples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def ids_are_strings(self) -> bool:
        return self.ids.dtype.kind == "U"


def is_text_dataset(names: set[str]) -> bool:
    return bool(names & {"input_ids", *TEXT_COLUMNS})


def field_names(path: Path, fmt: str, field: str = "data") -> set[str]:
    """The field (tensor or column) names of a safetensors or Parquet file, from its header / schema."""
    if fmt == "safetensors":
        return set(read_header(path, field=field))
    if fmt == "parquet":
        try:
            return set(pq.read_schema(path).names)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ArtifactError(f"not a valid Parquet file: {exc}", field=field) from None
    return set()


# ------------------------------------------------------------------------------------------------ reading


def read_text_dataset(
    path: Path, fmt: str, *, max_rows: int, max_bytes: int, tokenize: TokenizeOptions | None, field: str = "data"
) -> TextArrays:
    """Read and validate an uploaded text dataset (safetensors or Parquet)."""
    if fmt == "safetensors":
        if tokenize is not None:
            raise ArtifactError(
                "metadata.tokenize_with applies to Parquet text columns; this file holds token ids",
                field="metadata.tokenize_with",
            )
        return validate_text_arrays(_read_safetensors(path, max_rows, field), max_rows=max_rows, field=field)
    if fmt != "parquet":
        raise ArtifactError("text datasets are safetensors or Parquet files", field=field)
    table = _read_table(path, max_rows, max_bytes, field)
    names = set(table.column_names)
    unknown = names - set(TOKEN_FIELDS) - set(TEXT_COLUMNS)
    if unknown:
        raise ArtifactError(
            f"unexpected column {sorted(unknown)[0]!r}; a text dataset has {', '.join(TOKEN_FIELDS + TEXT_COLUMNS)}",
            field=f"{field}.{sorted(unknown)[0]}",
        )
    if names & set(TEXT_COLUMNS):
        return _tokenized(table, tokenize, max_rows, field)
    if tokenize is not None:
        raise ArtifactError(
            "metadata.tokenize_with applies to `text` or `prompt` + `completion` columns",
            field="metadata.tokenize_with",
        )
    arrays: dict[str, np.ndarray] = {}
    for name in table.column_names:
        if name == "ids":
            arrays[name] = _scalar_column(table.column(name), name, field)
        elif name == "targets":
            arrays[name] = _targets_column(table.column(name), field)
        else:
            arrays[name] = _token_column(table.column(name), name, field)
    if "attention_mask" not in arrays and "input_ids" in arrays:  # rows of varying length: padding is not attended
        row_lengths = _row_lengths(table.column("input_ids"))
        arrays["attention_mask"] = (np.arange(arrays["input_ids"].shape[1]) < row_lengths[:, None]).astype(np.int64)
    return validate_text_arrays(arrays, max_rows=max_rows, field=field)


def _read_safetensors(path: Path, max_rows: int, field: str) -> dict[str, np.ndarray]:
    infos = read_header(path, field=field)
    for name, info in infos.items():
        if name not in TOKEN_FIELDS:
            raise ArtifactError(
                f"unexpected field {name!r}; a text dataset has {', '.join(TOKEN_FIELDS)}", field=f"{field}.{name}"
            )
        if info.shape and info.shape[0] > max_rows:
            raise ArtifactError(
                f"the dataset has {info.shape[0]:,} rows; at most {max_rows:,} are accepted", field=field
            )
    arrays = {}
    for name, tensor in iter_tensors(path, list(infos), field=field):
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        arrays[name] = tensor.numpy()
    return arrays


def _read_table(path: Path, max_rows: int, max_bytes: int, field: str) -> pa.Table:
    try:
        parquet = pq.ParquetFile(path)
        meta = parquet.metadata
        if meta.num_rows > max_rows:
            raise ArtifactError(
                f"the dataset has {meta.num_rows:,} rows; at most {max_rows:,} are accepted", field=field
            )
        size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if size > max_bytes:
            raise ArtifactError(
                f"the Parquet file holds {size:,} bytes uncompressed (at most {max_bytes:,})", field=field
            )
        return parquet.read()
    except ArtifactError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ArtifactError(f"not a valid Parquet file: {exc}", field=field) from None


def _no_nulls(array: pa.Array, name: str, field: str) -> None:
    if array.null_count:
        raise ArtifactError(f"{name}: {array.null_count} missing (null) values", field=f"{field}.{name}")


def _scalar_column(column: pa.ChunkedArray, name: str, field: str) -> np.ndarray:
    array = column.combine_chunks()
    _no_nulls(array, name, field)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return np.asarray(array.to_pylist(), dtype=str)
    if pa.types.is_integer(array.type) or pa.types.is_floating(array.type):
        values: np.ndarray = array.to_numpy(zero_copy_only=False)
        return values
    raise ArtifactError(f"{name}: column type {array.type} is not accepted", field=f"{field}.{name}")


def _targets_column(column: pa.ChunkedArray, field: str) -> np.ndarray:
    array = column.combine_chunks()
    if pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type) or pa.types.is_large_list(array.type):
        rows = _list_rows(array, "targets", field)
        widths = {len(row) for row in rows}
        if len(widths) > 1:
            raise ArtifactError("targets: rows of different lengths", field=f"{field}.targets")
        return np.asarray(rows, dtype=np.float32)
    return _scalar_column(column, "targets", field)


def _list_rows(array: pa.Array, name: str, field: str) -> list[list[Any]]:
    _no_nulls(array, name, field)
    if not isinstance(array, (pa.ListArray, pa.LargeListArray, pa.FixedSizeListArray)):
        raise ArtifactError(f"{name}: a list column is needed, not {array.type}", field=f"{field}.{name}")
    values = array.flatten()
    _no_nulls(values, name, field)
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise ArtifactError(f"{name}: list values of type {values.type}; integers are needed", field=f"{field}.{name}")
    return cast(list[list[Any]], cast(Any, array).to_pylist())  # no nulls (checked above); untyped in the stubs


def _token_column(column: pa.ChunkedArray, name: str, field: str) -> np.ndarray:
    """A list column as (N, T) int64; rows of varying length are padded (0 for ids and mask, -100 for labels)."""
    array = column.combine_chunks()
    if not (
        pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type) or pa.types.is_large_list(array.type)
    ):
        raise ArtifactError(
            f"{name}: a list column (one list of token values per row) is needed", field=f"{field}.{name}"
        )
    rows = _list_rows(array, name, field)
    width = max((len(row) for row in rows), default=0)
    filler = IGNORE_INDEX if name == "labels" else 0
    out = np.full((len(rows), width), filler, dtype=np.float64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _row_lengths(column: pa.ChunkedArray) -> np.ndarray:
    lengths: np.ndarray = pc.list_value_length(column.combine_chunks()).to_numpy(zero_copy_only=False)
    return lengths.astype(np.int64)


def _tokenized(table: pa.Table, tokenize: TokenizeOptions | None, max_rows: int, field: str) -> TextArrays:
    names = set(table.column_names)
    if tokenize is None:
        raise ArtifactError(
            "text columns need metadata.tokenize_with: the id of a model uploaded with a tokenizer",
            field="metadata.tokenize_with",
        )
    if names & {"input_ids", "attention_mask", "labels"}:
        raise ArtifactError(
            "a dataset has either token columns (input_ids...) or text columns, not both", field=f"{field}.input_ids"
        )
    has_text = "text" in names
    has_pair = {"prompt", "completion"} <= names
    if has_text == has_pair or (not has_pair and names & {"prompt", "completion"}):
        raise ArtifactError("give either a `text` column or `prompt` + `completion` columns", field=f"{field}.text")
    if has_pair and "targets" in names:
        raise ArtifactError("prompt + completion datasets score the completion: no `targets`", field=f"{field}.targets")

    def strings(name: str) -> list[str]:
        array = table.column(name).combine_chunks()
        _no_nulls(array, name, field)
        if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
            raise ArtifactError(f"{name}: a string column is needed", field=f"{field}.{name}")
        return cast(list[str], array.to_pylist())  # no nulls (checked above)

    if has_text:
        rows = _encode(tokenize, strings("text"), tokenize.add_special_tokens)
        prompt_lengths = [0] * len(rows)
    else:
        prompts = _encode(tokenize, strings("prompt"), tokenize.add_special_tokens)
        completions = _encode(tokenize, strings("completion"), False)
        rows = [p + c for p, c in zip(prompts, completions, strict=True)]
        prompt_lengths = [len(p) for p in prompts]
    too_long = [i for i, row in enumerate(rows) if len(row) > tokenize.max_length]
    if too_long and not tokenize.truncation:
        raise ArtifactError(
            f"row {too_long[0]} has {len(rows[too_long[0]])} tokens, over max_length "
            f"{tokenize.max_length} ({len(too_long)} row(s) in all); set metadata.truncation true "
            "or raise max_length",
            field="metadata.max_length",
        )
    rows = [row[: tokenize.max_length] for row in rows]
    width = tokenize.max_length if tokenize.padding == "max_length" else max(max((len(r) for r in rows), default=1), 1)
    input_ids = np.full((len(rows), width), tokenize.pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        labels[i, prompt_lengths[i] : len(row)] = row[prompt_lengths[i] :]
    arrays: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": mask}
    if "targets" in names:
        arrays["targets"] = _targets_column(table.column("targets"), field)
    else:
        arrays["labels"] = labels
    if "ids" in names:
        arrays["ids"] = _scalar_column(table.column("ids"), "ids", field)
    return validate_text_arrays(arrays, max_rows=max_rows, field=field)


def _encode(tokenize: TokenizeOptions, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    encodings = tokenize.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
    return [list(encoding.ids) for encoding in encodings]


# --------------------------------------------------------------------------------------------- validation


def validate_text_arrays(arrays: dict[str, np.ndarray], *, max_rows: int, field: str = "data") -> TextArrays:
    if "input_ids" not in arrays:
        raise ArtifactError("a text dataset needs `input_ids`", field=f"{field}.input_ids")
    if "labels" in arrays and "targets" in arrays:
        raise ArtifactError(
            "`labels` (language modelling) and `targets` (classification) do not go together", field=f"{field}.targets"
        )
    input_ids = _tokens(arrays["input_ids"], "input_ids", field, low=0)
    n, width = input_ids.shape
    if n < 1 or width < 1:
        raise ArtifactError(
            f"input_ids has shape {[n, width]}; at least one row and one token are needed", field=f"{field}.input_ids"
        )
    if n > max_rows:
        raise ArtifactError(f"the dataset has {n:,} rows; at most {max_rows:,} are accepted", field=field)
    if width > MAX_LENGTH:
        raise ArtifactError(f"rows of {width} tokens (at most {MAX_LENGTH})", field=f"{field}.input_ids")
    mask = (
        _tokens(arrays["attention_mask"], "attention_mask", field, low=0)
        if "attention_mask" in arrays
        else np.ones_like(input_ids)
    )
    _same_shape(mask, input_ids, "attention_mask", field)
    if (mask > 1).any():
        raise ArtifactError("attention_mask values must be 0 or 1", field=f"{field}.attention_mask")
    if (mask.sum(axis=1) == 0).any():
        row = int(np.flatnonzero(mask.sum(axis=1) == 0)[0])
        raise ArtifactError(f"row {row} has no token (its attention_mask is all 0)", field=f"{field}.attention_mask")
    targets = _targets(arrays["targets"], n, field) if "targets" in arrays else None
    labels = None
    if targets is None:
        labels = (
            _tokens(arrays["labels"], "labels", field, low=IGNORE_INDEX)
            if "labels" in arrays
            else np.where(mask == 1, input_ids, IGNORE_INDEX)
        )
        _same_shape(labels, input_ids, "labels", field)
        bad = (labels < 0) & (labels != IGNORE_INDEX)
        if bad.any():
            raise ArtifactError(
                f"labels are token ids or {IGNORE_INDEX} (not scored); row {int(np.argwhere(bad)[0][0])} "
                "has another negative value",
                field=f"{field}.labels",
            )
        scored = (labels[:, 1:] != IGNORE_INDEX).sum(axis=1)  # the first token is never predicted
        if (scored == 0).any():
            row = int(np.flatnonzero(scored == 0)[0])
            raise ArtifactError(
                f"row {row} has no scored token (labels are {IGNORE_INDEX} everywhere after the "
                "first token, e.g. a completion truncated away)",
                field=f"{field}.labels",
            )
    ids = check_ids(arrays["ids"], field) if "ids" in arrays else np.arange(n, dtype=np.int64)
    if ids.shape[0] != n:
        raise ArtifactError(f"ids has {ids.shape[0]} rows but input_ids has {n}", field=f"{field}.ids")
    return TextArrays(input_ids=input_ids, attention_mask=mask, ids=ids, labels=labels, targets=targets)


def _tokens(array: np.ndarray, name: str, field: str, *, low: int) -> np.ndarray:
    if array.ndim != 2:
        raise ArtifactError(f"{name}: shape {list(array.shape)}; expected (N, T)", field=f"{field}.{name}")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or (array != np.round(array)).any():
            raise ArtifactError(f"{name}: values must be integers", field=f"{field}.{name}")
    elif array.dtype.kind not in "iub":
        raise ArtifactError(f"{name}: dtype {array.dtype}; integers are needed", field=f"{field}.{name}")
    if array.size and (array.min() < low or array.max() > MAX_TOKEN_ID):
        raise ArtifactError(
            f"{name}: values must be in [{low}, {MAX_TOKEN_ID}]; found {array.min()} to {array.max()}",
            field=f"{field}.{name}",
        )
    return np.ascontiguousarray(array, dtype=np.int64)


def _same_shape(array: np.ndarray, input_ids: np.ndarray, name: str, field: str) -> None:
    if array.shape != input_ids.shape:
        raise ArtifactError(
            f"{name} has shape {list(array.shape)} but input_ids has {list(input_ids.shape)}", field=f"{field}.{name}"
        )


def _targets(array: np.ndarray, n: int, field: str) -> np.ndarray:
    if array.shape[:1] != (n,) or array.ndim > 2:
        raise ArtifactError(
            f"targets: shape {list(array.shape)}; expected ({n},) or ({n}, d)", field=f"{field}.targets"
        )
    if array.dtype.kind in "iu":
        if array.size and array.min() < 0:
            raise ArtifactError("targets: class indices must be >= 0", field=f"{field}.targets")
        return np.ascontiguousarray(array, dtype=np.int64)
    if array.dtype.kind == "f":
        targets = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(targets).all():
            raise ArtifactError("targets contain NaN or Inf values", field=f"{field}.targets")
        return targets
    raise ArtifactError(f"targets: dtype {array.dtype} is not numeric", field=f"{field}.targets")


# --------------------------------------------------------------------------------------- storage, summary


def describe_text(ds: TextArrays) -> dict[str, Any]:
    """``{"num_examples", "fields"}``; ``input_ids`` also records its largest token id (checked against the
    model's vocabulary at submission) and ``labels`` how many tokens are scored."""
    fields: dict[str, dict[str, Any]] = {
        "input_ids": {"dtype": "int64", "shape": list(ds.input_ids.shape), "max": int(ds.input_ids.max())},
        "attention_mask": {"dtype": "int64", "shape": list(ds.attention_mask.shape)},
        "ids": {"dtype": "string" if ds.ids_are_strings else "int64", "shape": [ds.num_examples]},
    }
    if ds.labels is not None:
        fields["labels"] = {
            "dtype": "int64",
            "shape": list(ds.labels.shape),
            "scored": int((ds.labels[:, 1:] != IGNORE_INDEX).sum()),
        }
    if ds.targets is not None:
        fields["targets"] = {"dtype": str(ds.targets.dtype), "shape": list(ds.targets.shape)}
        if ds.targets.dtype == np.int64:
            fields["targets"]["max"] = int(ds.targets.max())
    return {"num_examples": ds.num_examples, "fields": fields}


def write_stored(ds: TextArrays, path: Path) -> None:
    """The canonical stored form: Parquet, token fields as fixed-size list columns."""
    width = int(ds.input_ids.shape[1])

    def tokens(array: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1), type=pa.int64()), width)

    columns: dict[str, pa.Array] = {
        "input_ids": tokens(ds.input_ids),
        "attention_mask": tokens(ds.attention_mask),
        "ids": pa.array(ds.ids.tolist()),
    }
    if ds.labels is not None:
        columns["labels"] = tokens(ds.labels)
    if ds.targets is not None:
        if ds.targets.ndim == 1:
            columns["targets"] = pa.array(ds.targets)
        else:
            columns["targets"] = pa.FixedSizeListArray.from_arrays(
                pa.array(ds.targets.reshape(-1)), int(ds.targets.shape[1])
            )
    pq.write_table(pa.table(columns), path)


def read_stored(path: Path) -> TextArrays:
    """A dataset written by ``write_stored`` (the service's own file)."""
    table = pq.read_table(path)
    n = table.num_rows

    def matrix(name: str) -> np.ndarray:
        column = table.column(name).combine_chunks()
        assert isinstance(column, (pa.ListArray, pa.LargeListArray, pa.FixedSizeListArray))  # written by write_stored
        flat = column.flatten().to_numpy(zero_copy_only=False)
        rows: np.ndarray = flat.reshape(n, -1).copy()  # writable: the engine turns it into tensors
        return rows

    ids_column = table.column("ids").combine_chunks()
    ids = (
        np.asarray(ids_column.to_pylist(), dtype=str)
        if pa.types.is_string(ids_column.type)
        else ids_column.to_numpy(zero_copy_only=False).astype(np.int64)
    )
    names = set(table.column_names)
    targets = None
    if "targets" in names:
        column = table.column("targets").combine_chunks()
        targets = (
            matrix("targets").astype(np.float32)
            if pa.types.is_fixed_size_list(column.type)
            else column.to_numpy(zero_copy_only=False).copy()
        )
    return TextArrays(
        input_ids=matrix("input_ids"),
        attention_mask=matrix("attention_mask"),
        ids=ids,
        labels=matrix("labels") if "labels" in names else None,
        targets=targets,
    )


def check_fits_model(
    fields: dict[str, dict[str, Any]], vocab_size: int | None, max_positions: int | None, field: str
) -> None:
    """A stored text dataset's token ids and length against a model's vocabulary and positions."""
    info = fields.get("input_ids")
    if info is None:
        raise ArtifactError("the dataset has no input_ids: a Hugging Face model needs a text dataset", field=field)
    largest, length = int(info.get("max", 0)), int(info["shape"][1])
    if vocab_size is not None and largest >= vocab_size:
        raise ArtifactError(
            f"the dataset has token id {largest}, not below the model's vocabulary size {vocab_size}", field=field
        )
    if max_positions is not None and length > max_positions:
        raise ArtifactError(
            f"the dataset's rows have {length} tokens; the model takes at most {max_positions}", field=field
        )
