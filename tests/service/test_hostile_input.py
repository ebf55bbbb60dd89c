"""Each hostile input the hardening review reproduced: a clear, documented 4xx, never a 500."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.service.conftest import Api
from tests.service.test_attributions import setup_job, submit


def token(values: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


FORGED_RESULT_TOKENS = [
    token(["a", "b"]), token([None, 1]), "W1xlNDAwLDFd", token([{}, 1]), token([1.5, 2]), token([True, 1]),
    token([-1, 1]), token([2**70, 1]), token([1, 2, 3]), token({"a": 1}), token("x"), "!!!not-base64!!!", "e30",
    base64.urlsafe_b64encode(b"\xff\xfe").decode(), token([[[[[[]]]]], 1]),
]


@pytest.mark.parametrize("forged", FORGED_RESULT_TOKENS)
def test_forged_result_page_tokens_are_400(sqlite_api: Api, forged: str) -> None:
    setup = setup_job(sqlite_api)
    attribution = submit(sqlite_api, setup)
    response = sqlite_api.client.get(f"/v1/attributions/{attribution['id']}/results", params={"page_token": forged})
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/invalid-page-token")


FORGED_LIST_TOKENS = [token(["a", "b"]), token([None, 1]), token(["2026-01-01T00:00:00", "x"]), token([1, 2]),
                      token(["2026-01-01T00:00:00+00:00", "x" * 100]), token([{}, []])]


@pytest.mark.parametrize("forged", FORGED_LIST_TOKENS)
@pytest.mark.parametrize("path", ["/v1/models", "/v1/datasets", "/v1/jobs"])
def test_forged_list_page_tokens_are_400(sqlite_api: Api, path: str, forged: str) -> None:
    response = sqlite_api.client.get(path, params={"page_token": forged})
    assert response.status_code == 400, response.text


@pytest.mark.parametrize("forged", [token(["a", 1, "x"]), token([0, "1", "x"]), token([0, 1, 2]), token([1e400, 1, "x"])])
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
    for stamp in (job["created_at"], job["started_at"], job["finished_at"], model["created_at"],
                  api.client.get(f"/v1/attributions/{attribution['id']}").json()["created_at"]):
        assert stamp.endswith("Z"), stamp


def deep_list(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_body_is_422(sqlite_api: Api) -> None:
    body = ('{"model_id": "m", "train_dataset_id": "d", "query_dataset_id": "q", "options": {"x": '
            + deep_list(2000) + "}}")
    response = sqlite_api.client.post("/v1/attributions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert "deep" in response.json()["detail"]


def test_deeply_nested_metadata_part_is_422(sqlite_api: Api) -> None:
    metadata = '{"name": "x", "extra": ' + deep_list(2000) + "}"
    response = sqlite_api.client.post("/v1/datasets", data={"metadata": metadata},
                                      files={"data": ("d.npz", b"PK\x03\x04")})
    assert response.status_code == 422, response.text


def test_a_residual_architecture_900_levels_deep_is_422(sqlite_api: Api) -> None:
    layer = '{"type": "residual", "body": [' * 900 + '{"type": "relu"}' + "]}" * 900
    metadata = ('{"name": "deep", "format": "spec", "architecture": {"type": "sequential", "layers": [' + layer
                + ']}, "task": {"loss": "cross_entropy"}}')
    response = sqlite_api.client.post("/v1/models", data={"metadata": metadata},
                                      files={"weights": ("w.safetensors", b"\x00" * 16)})
    assert response.status_code == 422, response.text


def test_brackets_inside_strings_do_not_count_as_nesting(sqlite_api: Api) -> None:
    response = sqlite_api.client.post("/v1/attributions", json={
        "model_id": "[{" * 100 + '\\"[', "train_dataset_id": "d", "query_dataset_id": "q"})
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
    response = sqlite_api.client.post("/v1/datasets", data={"metadata": json.dumps({"name": "bomb"})},
                                      files={"data": ("bomb.npz", buffer.getvalue())})
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert response.status_code == 422, response.text
    assert "rows" in response.json()["detail"]
    assert peak < 64 * 1024**2, peak


def test_chunked_upload_over_the_limit_is_413(tmp_path) -> None:
    from tests.service.conftest import build_api

    for limited in build_api(tmp_path, None, max_upload_bytes=4096):
        def chunks():
            yield b"--b\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n{\"name\": \"x\"}\r\n"
            yield b"--b\r\nContent-Disposition: form-data; name=\"data\"; filename=\"d.npz\"\r\n\r\n"
            for _ in range(10):
                yield b"\x00" * 1024
            yield b"\r\n--b--\r\n"

        response = limited.client.post("/v1/datasets", content=chunks(),
                                       headers={"content-type": "multipart/form-data; boundary=b"})
        assert response.status_code == 413, response.text
        assert response.headers["content-type"] == "application/problem+json"
