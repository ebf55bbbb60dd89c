"""HTTP protocol details: problem documents for every error status, OpenAPI, operations endpoints."""

from __future__ import annotations

from pathlib import Path

from tests.service.conftest import Api


def test_unknown_route_and_wrong_method_are_problems(sqlite_api: Api) -> None:
    missing = sqlite_api.client.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
    wrong = sqlite_api.client.put("/v1/models")
    assert wrong.status_code == 405
    assert "POST" in wrong.headers["allow"] and "GET" in wrong.headers["allow"]
    assert wrong.json()["status"] == 405


def test_wrong_body_types_are_415(sqlite_api: Api) -> None:
    as_form = sqlite_api.client.post("/v1/attributions", data={"model_id": "x"})
    assert as_form.status_code == 415
    as_json = sqlite_api.client.post("/v1/models", json={"name": "x"})
    assert as_json.status_code == 415
    assert as_json.headers["content-type"].startswith("application/problem+json")


def test_validation_errors_list_fields(sqlite_api: Api) -> None:
    response = sqlite_api.client.post("/v1/attributions", json={"model_id": "m", "top_k": "many"})
    assert response.status_code == 422
    fields = {e["field"] for e in response.json()["errors"]}
    assert "body.top_k" in fields and "body.train_dataset_id" in fields


def test_bad_page_token_is_400(sqlite_api: Api) -> None:
    response = sqlite_api.client.get("/v1/models", params={"page_token": "!!garbage!!"})
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/problem+json")


def test_openapi_documents_every_route_with_problems(sqlite_api: Api) -> None:
    spec = sqlite_api.client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/models/{model_id}/checkpoints",
        "/v1/models/{model_id}/weights",
        "/v1/datasets",
        "/v1/datasets/{dataset_id}",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/fits",
        "/v1/fits/{fit_id}",
        "/v1/attributions",
        "/v1/attributions/{attribution_id}",
        "/v1/attributions/{attribution_id}/results",
        "/v1/attributions/{attribution_id}/results/export",
        "/v1/attributions/{attribution_id}/edit",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
    assert "Problem" in spec["components"]["schemas"]
    create = paths["/v1/attributions"]["post"]["responses"]
    for status in ("401", "404", "415", "422"):
        assert "application/problem+json" in create[status]["content"], status
    assert "multipart/form-data" in paths["/v1/models"]["post"]["requestBody"]["content"]
    assert sqlite_api.client.get("/docs").status_code == 200


def test_health_ready_metrics(sqlite_api: Api) -> None:
    assert sqlite_api.client.get("/healthz").json() == {"status": "ok"}
    ready = sqlite_api.client.get("/readyz")
    assert ready.status_code == 200 and all(ready.json()["checks"].values())
    assert sqlite_api.client.get("/metrics").status_code == 404  # off unless the operator sets a token


def test_metrics_need_the_operator_token_never_a_tenant_key(tmp_path: Path) -> None:
    from tests.service.conftest import build_api

    for api in build_api(tmp_path, None, metrics_token="operator-secret"):
        assert api.client.get("/metrics").status_code == 401  # the tenant's own key is not enough
        assert api.client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        page = api.client.get("/metrics", headers={"Authorization": "Bearer operator-secret"})
        assert page.status_code == 200 and "attrib_http_requests" in page.text
