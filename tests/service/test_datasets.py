"""Dataset uploads in the three formats, and bad datasets refused without leftovers."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save as save_safetensors

from tests.service.conftest import Api, tiny_dataset
from tests.service.test_models import counts


def test_npz_upload_describes_fields(api: Api) -> None:
    response = api.upload_npz(**tiny_dataset(12, ids=np.arange(100, 112)))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["num_examples"] == 12
    assert body["fields"]["inputs"]["shape"] == [12, 4]
    assert set(body["fields"]) >= {"inputs", "targets", "ids"}


def test_safetensors_and_parquet_uploads(api: Api) -> None:
    data = save_safetensors({"inputs": torch.randn(5, 4), "targets": torch.tensor([0, 1, 2, 0, 1])})
    response = api.client.post(
        "/v1/datasets", data={"metadata": json.dumps({"name": "s"})}, files={"data": ("d.safetensors", data)}
    )
    assert response.status_code == 201, response.text
    table = pa.table({"a": [0.1, 0.2, 0.3], "b": [1.0, 2.0, 3.0], "targets": [0, 1, 0], "ids": ["x", "y", "z"]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    response = api.client.post(
        "/v1/datasets", data={"metadata": json.dumps({"name": "p"})}, files={"data": ("d.parquet", buffer.getvalue())}
    )
    assert response.status_code == 201, response.text
    assert response.json()["fields"]["inputs"]["shape"] == [3, 2]


@pytest.mark.parametrize("case", ["pickle", "repeated_ids", "mismatched", "no_targets", "nan_inputs", "not_data"])
def test_bad_datasets_are_422(sqlite_api: Api, case: str) -> None:
    api = sqlite_api
    before = counts(api)
    arrays = tiny_dataset(6)
    if case == "pickle":
        buffer = io.BytesIO()
        np.savez(buffer, inputs=np.array([{"evil": 1}] * 6, dtype=object), targets=arrays["targets"])
        response = api.client.post(
            "/v1/datasets", data={"metadata": json.dumps({"name": "x"})}, files={"data": ("d.npz", buffer.getvalue())}
        )
    elif case == "not_data":
        response = api.client.post(
            "/v1/datasets",
            data={"metadata": json.dumps({"name": "x"})},
            files={"data": ("d.bin", b"hello world, not a dataset")},
        )
    else:
        if case == "repeated_ids":
            arrays["ids"] = np.array([1, 2, 3, 3, 4, 5])
        elif case == "mismatched":
            arrays["targets"] = arrays["targets"][:4]
        elif case == "no_targets":
            del arrays["targets"]
        elif case == "nan_inputs":
            arrays["inputs"][2, 1] = np.nan
        response = api.upload_npz(**arrays)
    assert response.status_code in (415, 422), response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert counts(api) == before


def test_upload_with_idempotency_key_is_stored_once(api: Api) -> None:
    arrays = tiny_dataset(5)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    send = dict(
        data={"metadata": json.dumps({"name": "once"})},
        files={"data": ("d.npz", buffer.getvalue())},
        headers={"Idempotency-Key": "upload-1"},
    )
    first = api.client.post("/v1/datasets", **send)
    second = api.client.post("/v1/datasets", **send)
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] == second.json()["id"]
    assert len(api.client.get("/v1/datasets").json()["datasets"]) == 1
