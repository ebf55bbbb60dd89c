"""Each hostile input the hardening review reproduced: a clear, documented 4xx, never a 500."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from tests.service.conftest import Api
from tests.service.test_attributions import setup_job, submit


def token(values: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


FORGED_RESULT_TOKENS = [
    token(["a", "b"]),
    token([None, 1]),
    "W1xlNDAwLDFd",
    token([{}, 1]),
    token([1.5, 2]),
    token([True, 1]),
    token([-1, 1]),
    token([2**70, 1]),
    token([1, 2, 3]),
    token({"a": 1}),
    token("x"),
    "!!!not-base64!!!",
    "e30",
    base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    token([[[[[[]]]]], 1]),
]


@pytest.mark.parametrize("forged", FORGED_RESULT_TOKENS)
def test_forged_result_page_tokens_are_400(sqlite_api: Api, forged: str) -> None:
    setup = setup_job(sqlite_api)
    attribution = submit(sqlite_api, setup)
    response = sqlite_api.client.get(f"/v1/attributions/{attribution['id']}/results", params={"page_token": forged})
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/invalid-page-token")


FORGED_LIST_TOKENS = [
    token(["a", "b"]),
    token([None, 1]),
    token(["2026-01-01T00:00:00", "x"]),
    token([1, 2]),
    token(["2026-01-01T00:00:00+00:00", "x" * 100]),
    token([{}, []]),
]


@pytest.mark.parametrize("forged", FORGED_LIST_TOKENS)
@pytest.mark.parametrize("path", ["/v1/models", "/v1/datasets", "/v1/jobs"])
def test_forged_list_page_tokens_are_400(sqlite_api: Api, path: str, forged: str) -> None:
    response = sqlite_api.client.get(path, params={"page_token": forged})
    assert response.status_code == 400, response.text


@pytest.mark.parametrize(
    "forged", [token(["a", 1, "x"]), token([0, "1", "x"]), token([0, 1, 2]), token([1e400, 1, "x"])]
)
def test_forged_checkpoint_page_tokens_are_400(sqlite_api: Api, forged: str) -> None:
    model_id = setup_job(sqlite_api)["model_id"]
    response = sqlite_api.client.get(f"/v1/models/{model_id}/checkpoints", params={"page_token": forged})
    assert response.status_code == 400, response.text


def test_issued_tokens_still_page_through_everything(sqlite_api: Api) -> None:
    for index in range(3):
        sqlite_api.upload_npz(name=f"d{index}", inputs=[[0.0, 1.0, 2.0, 3.0]], targets=[0])
    seen, page_token = [], None
    while True:
        params = {"page_size": 1, **({"page_token": page_token} if page_token else {})}
        page = sqlite_api.client.get("/v1/datasets", params=params).json()
        seen += [d["name"] for d in page["datasets"]]
        page_token = page["next_page_token"]
        if page_token is None:
            break
    assert seen == ["d2", "d1", "d0"]


def test_timestamps_are_utc_with_z_on_every_backend(api: Api) -> None:
    setup = setup_job(api)
    attribution = submit(api, setup)
    job = api.client.get(f"/v1/jobs/{attribution['job_id']}").json()
    model = api.client.get(f"/v1/models/{setup['model_id']}").json()
    for stamp in (
        job["created_at"],
        job["started_at"],
        job["finished_at"],
        model["created_at"],
        api.client.get(f"/v1/attributions/{attribution['id']}").json()["created_at"],
    ):
        assert stamp.endswith("Z"), stamp


def deep_list(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_body_is_422(sqlite_api: Api) -> None:
    body = (
        '{"model_id": "m", "train_dataset_id": "d", "query_dataset_id": "q", "options": {"x": ' + deep_list(2000) + "}}"
    )
    response = sqlite_api.client.post("/v1/attributions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert "deep" in response.json()["detail"]


def test_deeply_nested_metadata_part_is_422(sqlite_api: Api) -> None:
    metadata = '{"name": "x", "extra": ' + deep_list(2000) + "}"
    response = sqlite_api.client.post(
        "/v1/datasets", data={"metadata": metadata}, files={"data": ("d.npz", b"PK\x03\x04")}
    )
    assert response.status_code == 422, response.text


def test_a_residual_architecture_900_levels_deep_is_422(sqlite_api: Api) -> None:
    layer = '{"type": "residual", "body": [' * 900 + '{"type": "relu"}' + "]}" * 900
    metadata = (
        '{"name": "deep", "format": "spec", "architecture": {"type": "sequential", "layers": ['
        + layer
        + ']}, "task": {"loss": "cross_entropy"}}'
    )
    response = sqlite_api.client.post(
        "/v1/models", data={"metadata": metadata}, files={"weights": ("w.safetensors", b"\x00" * 16)}
    )
    assert response.status_code == 422, response.text


def test_brackets_inside_strings_do_not_count_as_nesting(sqlite_api: Api) -> None:
    response = sqlite_api.client.post(
        "/v1/attributions",
        json={"model_id": "[{" * 30 + '\\"[', "train_dataset_id": "[" * 60, "query_dataset_id": "{" * 60},
    )
    assert response.status_code == 404, response.text  # the model does not exist: the depth check let it through


def test_a_tiny_npz_claiming_a_huge_array_is_refused_from_its_header(sqlite_api: Api) -> None:
    """Zeros compress ~1000x: the header says 10^8 rows, and the upload is refused before decompression."""
    import io
    import tracemalloc
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**8, 4)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("inputs.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            chunk = bytes(1 << 20)
            for _ in range(200):  # 200 MB of zeros, ~200 KB compressed (the file is truncated: never read)
                member.write(chunk)
        archive.writestr("targets.npy", b"")
    tracemalloc.start()
    response = sqlite_api.client.post(
        "/v1/datasets", data={"metadata": json.dumps({"name": "bomb"})}, files={"data": ("bomb.npz", buffer.getvalue())}
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert response.status_code == 422, response.text
    assert "rows" in response.json()["detail"]
    assert peak < 64 * 1024**2, peak


def test_chunked_upload_over_the_limit_is_413(tmp_path) -> None:
    from tests.service.conftest import build_api

    for limited in build_api(tmp_path, None, max_upload_bytes=4096):

        def chunks():
            yield b'--b\r\nContent-Disposition: form-data; name="metadata"\r\n\r\n{"name": "x"}\r\n'
            yield b'--b\r\nContent-Disposition: form-data; name="data"; filename="d.npz"\r\n\r\n'
            for _ in range(10):
                yield b"\x00" * 1024
            yield b"\r\n--b--\r\n"

        response = limited.client.post(
            "/v1/datasets", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert response.status_code == 413, response.text
        assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    "options",
    [
        {"seed": 1e30},
        {"seed": False},
        {"seed": 2**40},
        {"seed": "1"},
        {"layers": []},
        {"layers": [""]},
        {"damping": 1e300},
        {"damping": True},
        {"max_iter": 1e9},
        {"tol": 2},
        {"fisher_samples": 1.5},
    ],
)
def test_out_of_range_options_are_422_before_queuing(sqlite_api: Api, options: dict) -> None:
    setup = setup_job(sqlite_api)
    body = {
        "model_id": setup["model_id"],
        "train_dataset_id": setup["train_dataset_id"],
        "query_dataset_id": setup["query_dataset_id"],
        "method": "influence",
        "options": options,
    }
    response = sqlite_api.client.post("/v1/attributions", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"].startswith("body.options.")
    assert sqlite_api.queue.enqueued == [] or len(sqlite_api.queue.enqueued) == 0


def test_both_model_id_and_model_ids_is_refused_and_the_schema_says_so(sqlite_api: Api) -> None:
    schemas = sqlite_api.client.get("/openapi.json").json()["components"]["schemas"]
    for variant in schemas["AttributionIn"]["discriminator"]["mapping"].values():  # each method's request
        schema = schemas[variant.rsplit("/", 1)[1]]
        assert {"required": ["model_id"]} in schema["oneOf"] and {"required": ["model_ids"]} in schema["oneOf"]
    response = sqlite_api.client.post(
        "/v1/attributions", json={"model_id": "a", "model_ids": ["a"], "train_dataset_id": "d", "query_dataset_id": "q"}
    )
    assert response.status_code == 422


def test_an_empty_metadata_part_is_refused_by_the_schema(sqlite_api: Api) -> None:
    schema = sqlite_api.client.get("/openapi.json").json()["components"]["schemas"]
    upload = next(v for k, v in schema.items() if k.startswith("Body_upload_dataset"))
    assert upload["properties"]["metadata"]["minLength"] >= 1
    response = sqlite_api.client.post("/v1/datasets", data={"metadata": ""}, files={"data": ("d.npz", b"x")})
    assert response.status_code == 422


def conv_model(padding: int, channels: int = 4) -> dict:
    return {
        "name": "conv",
        "format": "spec",
        "task": {"loss": "cross_entropy"},
        "architecture": {
            "type": "sequential",
            "layers": [
                {"type": "conv2d", "in_channels": 1, "out_channels": channels, "kernel_size": 3, "padding": padding},
                {"type": "adaptive_avgpool2d", "output_size": 1},
                {"type": "flatten"},
                {"type": "linear", "in_features": channels, "out_features": 3},
            ],
        },
    }


def test_a_conv_with_absurd_padding_is_refused_at_upload(sqlite_api: Api) -> None:
    response = sqlite_api.client.post(
        "/v1/models",
        data={"metadata": json.dumps(conv_model(100_000))},
        files={"weights": ("w.safetensors", b"\x00" * 16)},
    )
    assert response.status_code == 422, response.text
    assert "padding" in response.text


def test_work_whose_activations_cannot_fit_is_refused_at_submit(sqlite_api: Api) -> None:
    import torch
    from safetensors.torch import save as save_safetensors
    from torch import nn

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1024), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 3))
    weights = save_safetensors({k: v.contiguous() for k, v in module.state_dict().items()})
    model = sqlite_api.client.post(
        "/v1/models", data={"metadata": json.dumps(conv_model(1024, 64))}, files={"weights": ("w.safetensors", weights)}
    )
    assert model.status_code == 201, model.text
    rng = np.random.default_rng(0)
    images = {"inputs": rng.normal(size=(8, 1, 8, 8)).astype(np.float32), "targets": rng.integers(0, 3, 8)}
    dataset = sqlite_api.upload_npz(**images).json()
    response = sqlite_api.client.post(
        "/v1/attributions",
        json={
            "model_id": model.json()["id"],
            "train_dataset_id": dataset["id"],
            "query_dataset_id": dataset["id"],
            "method": "gradient_similarity",
        },
    )
    assert response.status_code == 422, response.text
    assert "GiB of activations" in response.json()["detail"]


def test_a_key_over_its_rate_gets_429_with_retry_after(tmp_path: Path) -> None:
    from tests.service.conftest import build_api

    for api in build_api(tmp_path, None, rate_limit_per_second=1, rate_limit_burst=3):
        statuses = [api.client.get("/v1/models").status_code for _ in range(5)]
        assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]
        refused = api.client.get("/v1/models")
        assert refused.headers["content-type"] == "application/problem+json"
        assert int(refused.headers["retry-after"]) >= 1
        other = api.client.get("/v1/models", headers=api.new_key("someone-else"))
        assert other.status_code == 200  # another key has its own budget


def test_active_job_quota_gets_429(tmp_path: Path) -> None:
    from tests.service.conftest import build_api

    for api in build_api(tmp_path, None, max_active_jobs_per_tenant=2):
        setup = setup_job(api)
        api.queue.paused = True  # jobs stay queued
        body = {
            "model_id": setup["model_id"],
            "train_dataset_id": setup["train_dataset_id"],
            "query_dataset_id": setup["query_dataset_id"],
            "method": "gradient_similarity",
        }
        statuses = [api.client.post("/v1/attributions", json=body).status_code for _ in range(3)]
        assert statuses == [202, 202, 429]


def test_storage_quota_gets_429_and_stores_nothing(tmp_path: Path) -> None:
    from tests.service.conftest import build_api, tiny_dataset

    for api in build_api(tmp_path, None, max_stored_bytes_per_tenant=1500):
        assert api.upload_npz(name="a", **tiny_dataset(20)).status_code == 201
        refused = api.upload_npz(name="b", **tiny_dataset(40))
        assert refused.status_code == 429, refused.text
        assert "quota" in refused.json()["detail"]
        assert [d["name"] for d in api.client.get("/v1/datasets").json()["datasets"]] == ["a"]
