"""Each hostile input the hardening review reproduced: a clear, documented 4xx, never a 500."""

from __future__ import annotations

import base64
import json

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
