"""Model and checkpoint uploads: strict validation, tenancy, paging, download."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from sqlalchemy import func, select

from service.db.session import session_scope
from service.db.tables import Blob, Model
from tests.service.conftest import MLP_ARCHITECTURE, Api, build_api, tiny_classifier


def counts(api: Api) -> tuple[int, int, int]:
    with session_scope(api.settings.resolved_database_url) as session:
        blobs = session.scalar(select(func.count()).select_from(Blob))
        models = session.scalar(select(func.count()).select_from(Model))
    staged = len(list((api.settings.resolved_storage_dir / "staging").iterdir()))
    return int(blobs or 0), int(models or 0), staged


def test_upload_model_reports_layers_and_parameters(api: Api) -> None:
    response = api.upload_model(tiny_classifier())
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["num_parameters"] == 4 * 8 + 8 + 8 * 3 + 3
    assert body["tracked_layers"] == ["0", "2"]
    assert body["format"] == "spec"
    assert api.client.get(f"/v1/models/{body['id']}").json()["id"] == body["id"]


def test_weights_download_round_trips(api: Api) -> None:
    module = tiny_classifier(3)
    model_id = api.upload_model(module).json()["id"]
    response = api.client.get(f"/v1/models/{model_id}/weights")
    assert response.status_code == 200
    loaded = load_safetensors(response.content)
    for name, tensor in module.state_dict().items():
        assert torch.equal(loaded[name], tensor)


def test_other_tenant_sees_404(api: Api) -> None:
    model_id = api.upload_model(tiny_classifier()).json()["id"]
    other = api.new_key("someone-else")
    response = api.client.get(f"/v1/models/{model_id}", headers=other)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")


def test_list_pages_with_cursor(api: Api) -> None:
    ids = {api.upload_model(tiny_classifier(), name=f"m{i}").json()["id"] for i in range(5)}
    seen: list[str] = []
    token = None
    while True:
        params = {"page_size": 2, **({"page_token": token} if token else {})}
        page = api.client.get("/v1/models", params=params).json()
        seen += [m["id"] for m in page["models"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert set(seen) == ids and len(seen) == 5


def test_delete_then_404(api: Api) -> None:
    model_id = api.upload_model(tiny_classifier()).json()["id"]
    assert api.client.delete(f"/v1/models/{model_id}").status_code == 204
    assert api.client.get(f"/v1/models/{model_id}").status_code == 404


def _post_raw(api: Api, metadata: dict[str, Any], weights: bytes) -> httpx.Response:
    return api.client.post(
        "/v1/models", data={"metadata": json.dumps(metadata)}, files={"weights": ("w.safetensors", weights)}
    )


GOOD_METADATA = {"name": "m", "format": "spec", "architecture": MLP_ARCHITECTURE, "task": {"loss": "cross_entropy"}}


def good_weights() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tiny_classifier().state_dict().items()}


@pytest.mark.parametrize(
    "case",
    [
        "truncated",
        "garbage",
        "nan",
        "missing_key",
        "extra_key",
        "wrong_shape",
        "unknown_layer",
        "hf",
        "causal_lm",
        "bad_json",
    ],
)
def test_bad_model_uploads_are_422_and_leave_nothing(sqlite_api: Api, case: str) -> None:
    api = sqlite_api
    before = counts(api)
    metadata = dict(GOOD_METADATA)
    weights = good_weights()
    raw: bytes | None = None
    if case == "truncated":
        raw = save_safetensors(weights)[:-7]
    elif case == "garbage":
        raw = b"\x00" * 5 + b"not a safetensors file at all"
    elif case == "nan":
        weights["0.weight"][0, 0] = float("nan")
    elif case == "missing_key":
        del weights["2.bias"]
    elif case == "extra_key":
        weights["9.weight"] = torch.zeros(2)
    elif case == "wrong_shape":
        weights["0.weight"] = torch.zeros(8, 5)
    elif case == "unknown_layer":
        metadata["architecture"] = {"type": "sequential", "layers": [{"type": "lambda", "code": "os.system('x')"}]}
    elif case == "hf":
        metadata["format"] = "hf"
    elif case == "causal_lm":
        metadata["task"] = {"loss": "causal_lm"}
    if case == "bad_json":
        response = api.client.post(
            "/v1/models", data={"metadata": "{not json"}, files={"weights": ("w", save_safetensors(weights))}
        )
    else:
        response = _post_raw(api, metadata, raw if raw is not None else save_safetensors(weights))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == 422 and problem["detail"]
    assert counts(api) == before


def test_parameter_limit_is_checked_before_building(tmp_path: Path) -> None:
    for api in build_api(tmp_path, None, max_parameters=1000):
        huge = {"type": "sequential", "layers": [{"type": "linear", "in_features": 100000, "out_features": 100000}]}
        response = _post_raw(api, {**GOOD_METADATA, "architecture": huge}, b"")
        assert response.status_code == 422
        assert "parameters" in response.json()["detail"]


def test_oversized_body_is_413(tmp_path: Path) -> None:
    for api in build_api(tmp_path, None, max_upload_bytes=2000):
        response = _post_raw(api, GOOD_METADATA, b"x" * 5000)
        assert response.status_code == 413
        assert response.headers["content-type"].startswith("application/problem+json")
        assert counts(api)[:2] == (0, 0)


def test_missing_key_is_401(api: Api) -> None:
    response = api.client.get("/v1/models", headers={"Authorization": ""})
    assert response.status_code == 401
    response = api.client.get("/v1/models", headers={"Authorization": "Bearer atk_wrong"})
    assert response.status_code == 401


def test_checkpoints_upload_validate_and_list(api: Api) -> None:
    model_id = api.upload_model(tiny_classifier()).json()["id"]
    for step in (10, 20):
        meta = {"step": step, "learning_rate": 0.1, "momentum": 0.9}
        response = api.client.post(
            f"/v1/models/{model_id}/checkpoints",
            data={"metadata": json.dumps(meta)},
            files={"weights": ("w", save_safetensors(good_weights()))},
        )
        assert response.status_code == 201, response.text
    duplicate = api.client.post(
        f"/v1/models/{model_id}/checkpoints",
        data={"metadata": json.dumps({"step": 10, "learning_rate": 0.1})},
        files={"weights": ("w", save_safetensors(good_weights()))},
    )
    assert duplicate.status_code == 409
    bad = good_weights()
    bad["0.weight"] = torch.zeros(3, 3)
    response = api.client.post(
        f"/v1/models/{model_id}/checkpoints",
        data={"metadata": json.dumps({"step": 30, "learning_rate": 0.1})},
        files={"weights": ("w", save_safetensors(bad))},
    )
    assert response.status_code == 422
    missing_lr = api.client.post(
        f"/v1/models/{model_id}/checkpoints",
        data={"metadata": json.dumps({"step": 40})},
        files={"weights": ("w", save_safetensors(good_weights()))},
    )
    assert missing_lr.status_code == 422
    assert "learning_rate" in json.dumps(missing_lr.json()["errors"])
    listed = api.client.get(f"/v1/models/{model_id}/checkpoints").json()["checkpoints"]
    assert [c["step"] for c in listed] == [10, 20]
