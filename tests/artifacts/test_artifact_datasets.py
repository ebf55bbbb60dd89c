"""Datasets: the three formats, validation failures, description, conversion, fit checks."""

from __future__ import annotations

import json
import pickle  # only to craft hostile files: the readers never unpickle
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from worker.artifacts.datasets import (
    DatasetArrays,
    check_inputs_fit,
    check_targets,
    describe,
    detect_format,
    read_dataset,
    to_examples,
)
from worker.artifacts.errors import ArtifactError
from worker.artifacts.spec import build_module, parse_architecture

N = 6


def head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(16)


def load(path: Path, max_rows: int = 1000) -> DatasetArrays:
    return read_dataset(path, detect_format(path.name, head(path)), max_rows=max_rows)


def npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


def base() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"inputs": rng.normal(size=(N, 4)), "targets": np.arange(N) % 3}


def failure(path: Path, max_rows: int = 1000) -> ArtifactError:
    with pytest.raises(ArtifactError) as info:
        load(path, max_rows)
    return info.value


# ------------------------------------------------------------------------------------------ formats


def test_safetensors_dataset(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    save_file(
        {
            "inputs": torch.randn(N, 1, 2, 2, dtype=torch.bfloat16),
            "targets": torch.randn(N, 2, dtype=torch.float64),
            "ids": torch.arange(100, 100 + N, dtype=torch.int32),
            "weight": torch.ones(N),
            "task": torch.tensor([0, 0, 0, 1, 1, 1]),
            "split": torch.tensor([0, 0, 1, 0, 1, 1], dtype=torch.uint8),
        },
        str(path),
    )
    ds = load(path)
    assert ds.inputs.dtype == np.float32 and ds.inputs.shape == (N, 1, 2, 2)
    assert ds.targets.dtype == np.float32 and ds.ids.dtype == np.int64 and not ds.ids_are_strings
    assert ds.split.dtype == np.int64 and ds.task.tolist() == [0, 0, 0, 1, 1, 1]
    assert describe(ds) == {
        "num_examples": N,
        "fields": {
            "inputs": {"dtype": "float32", "shape": [N, 1, 2, 2]},
            "targets": {"dtype": "float32", "shape": [N, 2]},
            "ids": {"dtype": "int64", "shape": [N]},
            "weight": {"dtype": "float32", "shape": [N]},
            "task": {"dtype": "int64", "shape": [N]},
            "split": {"dtype": "int64", "shape": [N]},
        },
    }


def test_npz_with_string_ids(tmp_path: Path) -> None:
    arrays = base() | {"ids": np.array([f"ex-{i}" for i in range(N)])}
    ds = load(npz(tmp_path, **arrays))
    assert ds.ids_are_strings and ds.ids[2] == "ex-2"
    assert ds.targets.dtype == np.int64 and ds.num_examples == N
    assert describe(ds)["fields"]["ids"] == {"dtype": "string", "shape": [N]}
    assert ds.weight is None and "weight" not in describe(ds)["fields"]


def test_default_ids(tmp_path: Path) -> None:
    assert load(npz(tmp_path, **base())).ids.tolist() == list(range(N))


def test_compressed_npz(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez_compressed(path, **base())
    assert load(path).num_examples == N


def test_parquet_tabular(tmp_path: Path) -> None:
    table = pa.table(
        {
            "a": [1.0, 2.0, 3.0],
            "b": pa.array([4, 5, 6], pa.int32()),
            "note": ["x", "y", "z"],
            "targets": [0, 1, 0],
            "ids": ["p", "q", "r"],
            "weight": [1.0, 0.5, 0.0],
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    ds = load(tmp_path / "d.parquet")
    assert ds.inputs.tolist() == [[1, 4], [2, 5], [3, 6]]
    assert ds.ids.tolist() == ["p", "q", "r"] and ds.targets.dtype == np.int64
    assert ds.weight.tolist() == [1.0, 0.5, 0.0]


def test_parquet_fixed_size_list_with_shape(tmp_path: Path) -> None:
    flat = pa.array(np.arange(N * 8, dtype=np.float32))
    inputs = pa.FixedSizeListArray.from_arrays(flat, 8)
    table = pa.table({"inputs": inputs, "targets": np.arange(N) % 2, "ids": np.arange(N) * 10})
    table = table.replace_schema_metadata({"input_shape": json.dumps([2, 2, 2])})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=4)  # two row groups -> two chunks
    ds = load(tmp_path / "d.parquet")
    assert ds.inputs.shape == (N, 2, 2, 2) and ds.inputs[1, 0, 0, 1] == 9
    assert ds.ids.tolist() == [0, 10, 20, 30, 40, 50]


def test_parquet_list_without_shape(tmp_path: Path) -> None:
    table = pa.table({"inputs": [[1.0, 2.0], [3.0, 4.0]], "targets": [[0.5], [1.5]]})
    pq.write_table(table, tmp_path / "d.parquet")
    ds = load(tmp_path / "d.parquet")
    assert ds.inputs.shape == (2, 2) and ds.targets.shape == (2, 1) and ds.targets.dtype == np.float32


def test_parquet_errors(tmp_path: Path) -> None:
    pq.write_table(pa.table({"inputs": [[1.0], [2.0, 3.0]], "targets": [0, 1]}), tmp_path / "d.parquet")
    assert "different lengths" in failure(tmp_path / "d.parquet").detail
    pq.write_table(pa.table({"a": [1.0, None], "targets": [0, 1]}), tmp_path / "d.parquet")
    assert failure(tmp_path / "d.parquet").field == "data.a"
    table = pa.table({"inputs": [[1.0, 2.0]], "targets": [0]}).replace_schema_metadata({"input_shape": "[3]"})
    pq.write_table(table, tmp_path / "d.parquet")
    assert "input_shape" in failure(tmp_path / "d.parquet").detail
    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "targets": [0, 1, 0]}), tmp_path / "d.parquet")
    assert "at most 2" in failure(tmp_path / "d.parquet", max_rows=2).detail


def test_corrupt_parquet(tmp_path: Path) -> None:
    (tmp_path / "d.parquet").write_bytes(b"PAR1" + b"\x00" * 20)
    assert "not a valid Parquet file" in failure(tmp_path / "d.parquet").detail


def test_detect_format(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, str(tmp_path / "a"))
    assert detect_format("a", head(tmp_path / "a")) == "safetensors"
    assert detect_format("b", head(npz(tmp_path, **base()))) == "npz"
    pq.write_table(pa.table({"a": [1]}), tmp_path / "c")
    assert detect_format("c.bin", head(tmp_path / "c")) == "parquet"
    for junk in (b"", b"hello world, not data", b"\x89PNG\r\n\x1a\n\x00\x00"):
        with pytest.raises(ArtifactError, match="unsupported dataset format") as info:
            detect_format("x.csv", junk)
        assert info.value.field == "data"


# --------------------------------------------------------------------------------------- validation


def test_pickle_inside_npz(tmp_path: Path) -> None:
    arrays = base() | {"ids": np.array([{"a": 1}] * N, dtype=object)}
    error = failure(npz(tmp_path, **arrays))
    assert "pickled data is not accepted" in error.detail and error.field == "data.ids"


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"ids": np.array([1, 2, 3, 2, 5, 6])}, "data.ids", "id 2 appears 2 times"),
        ({"ids": np.array(["a", "b", "a", "c", "d", "e"])}, "data.ids", "id 'a' appears"),
        ({"ids": np.arange(N) * 0.5}, "data.ids", "integers or strings"),
        ({"targets": np.arange(N - 1)}, "data.targets", "has 5 rows but inputs has 6"),
        ({"weight": np.ones(N + 1)}, "data.weight", "same length"),
        ({"split": np.array([0, 1, 2, 0, 1, 0])}, "data.split", "row 2 is 2"),
        ({"split": np.zeros(N)}, "data.split", "integers"),
        ({"task": np.zeros(N)}, "data.task", "integers"),
        ({"inputs": np.where(np.eye(N, 4) == 1, np.nan, 0.0)}, "data.inputs", "NaN or Inf"),
        ({"inputs": np.full((N, 4), 1e300)}, "data.inputs", "too large for float32"),
        ({"targets": np.full(N, np.inf)}, "data.targets", "NaN or Inf"),
        ({"weight": -np.ones(N)}, "data.weight", ">= 0"),
        ({"weight": np.full(N, np.nan)}, "data.weight", "NaN"),
        ({"inputs": np.array(["a"] * N)}, "data.inputs", "not numeric"),
        ({"inputs": np.float32(1.0)}, "data.inputs", "scalar"),
        ({"extra": np.ones(N)}, "data.extra", "unexpected field"),
    ],
)
def test_bad_fields(tmp_path: Path, change: dict, field: str, words: str) -> None:
    error = failure(npz(tmp_path, **(base() | change)))
    assert error.field == field and words in error.detail, error


def test_required_fields_and_rows(tmp_path: Path) -> None:
    assert failure(npz(tmp_path, inputs=np.ones((2, 2)))).field == "data.targets"
    assert "no rows" in failure(npz(tmp_path, inputs=np.ones((0, 2)), targets=np.ones(0))).detail
    assert "at most 5" in failure(npz(tmp_path, **base()), max_rows=5).detail


def test_not_a_zip(tmp_path: Path) -> None:
    (tmp_path / "d.npz").write_bytes(b"PK\x03\x04garbage")
    assert "not a valid .npz file" in failure(tmp_path / "d.npz").detail


def test_safetensors_dataset_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    save_file({"inputs": torch.ones(3, 2), "targets": torch.zeros(3, dtype=torch.int64)}, str(path))
    assert "at most 2" in failure(path, max_rows=2).detail
    raw = path.read_bytes()
    path.write_bytes(raw[:-4])
    assert "not a valid safetensors file" in failure(path).detail


# ---------------------------------------------------------------------------------- use with a model


def classifier() -> torch.nn.Sequential:
    return build_module(
        parse_architecture(
            {
                "type": "sequential",
                "layers": [
                    {"type": "linear", "in_features": 4, "out_features": 8},
                    {"type": "relu"},
                    {"type": "batchnorm1d", "num_features": 8},
                    {"type": "linear", "in_features": 8, "out_features": 3},
                ],
            }
        )
    )


def dataset(**change: np.ndarray) -> DatasetArrays:
    arrays = base() | change
    ids = np.arange(len(arrays["inputs"]), dtype=np.int64)
    return DatasetArrays(inputs=arrays["inputs"].astype(np.float32), targets=arrays["targets"], ids=ids)


def test_to_examples() -> None:
    ds = dataset()
    ds.weight = np.ones(N, dtype=np.float32)
    examples = to_examples(ds)
    assert len(examples) == N and examples.inputs.dtype == torch.float32
    assert examples.targets.dtype == torch.int64 and examples.weights.shape == (N,) and examples.task is None


def test_check_inputs_fit() -> None:
    model = classifier().train()
    assert check_inputs_fit(model, dataset(), "cross_entropy") == 3
    assert model.training  # mode restored


def test_inputs_do_not_fit() -> None:
    with pytest.raises(ArtifactError, match=r"inputs of shape \[6, 5\] do not fit the model") as info:
        check_inputs_fit(classifier(), dataset(inputs=np.ones((N, 5))), "cross_entropy")
    assert info.value.field == "data.inputs"


def test_targets_checked_against_outputs() -> None:
    with pytest.raises(ArtifactError, match=r"in \[0, 3\); found values from 0 to 5"):
        check_inputs_fit(classifier(), dataset(targets=np.arange(N)), "cross_entropy")


def test_check_targets() -> None:
    floats = dataset(targets=np.ones((N, 3), dtype=np.float32))
    check_targets(floats, "mse", 3)
    check_targets(floats, "mse", None)
    check_targets(dataset(targets=np.ones(N, dtype=np.float32)), "mse", 1)
    with pytest.raises(ArtifactError, match="do not match the model's 2 outputs"):
        check_targets(floats, "mse", 2)
    with pytest.raises(ArtifactError, match="float targets"):
        check_targets(dataset(), "mse", 3)
    with pytest.raises(ArtifactError, match="integer class indices"):
        check_targets(floats, "cross_entropy", 3)
    with pytest.raises(ArtifactError, match=">= 0"):
        check_targets(dataset(targets=-np.ones(N, dtype=np.int64)), "cross_entropy", None)
    with pytest.raises(ArtifactError, match="not supported"):
        check_targets(dataset(), "causal_lm", None)


def test_npz_size_cap_and_raw_member(tmp_path: Path) -> None:
    path = npz(tmp_path, **base())
    with pytest.raises(ArtifactError, match="bytes uncompressed"):
        read_dataset(path, "npz", max_rows=100, max_bytes=100)
    with zipfile.ZipFile(tmp_path / "raw.npz", "w") as archive:
        archive.writestr("inputs.npy", pickle.dumps([1, 2, 3]))
        archive.writestr("targets.npy", pickle.dumps([1, 2, 3]))
    error = failure(tmp_path / "raw.npz")
    assert error.field == "data.inputs" and "not a .npy array" in error.detail
