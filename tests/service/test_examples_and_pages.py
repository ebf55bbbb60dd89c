"""Dataset examples by id, the 404 for an unknown query id, the offline docs and the browser pages' shells."""

from __future__ import annotations

import numpy as np
import pytest

from tests.service.conftest import Api
from tests.service.test_attributions import setup_job, submit


def test_examples_by_integer_ids_in_the_order_asked(sqlite_api: Api) -> None:
    inputs = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    dataset = sqlite_api.upload_npz(
        inputs=inputs, targets=np.array([0, 1, 2, 1, 0]), ids=np.array([10, 11, 12, 13, 14])
    ).json()
    page = sqlite_api.client.get(f"/v1/datasets/{dataset['id']}/examples", params={"ids": ["13", "10", "13"]})
    assert page.status_code == 200, page.text
    body = page.json()
    assert body["input_shape"] == [2, 3]
    assert [e["id"] for e in body["examples"]] == [13, 10]
    assert body["examples"][0]["input"] == inputs[3].tolist()
    assert body["examples"][1]["target"] == 0


def test_examples_by_string_ids_and_unknown_ids(sqlite_api: Api) -> None:
    dataset = sqlite_api.upload_npz(
        inputs=np.ones((3, 4), np.float32), targets=np.array([0, 1, 2]), ids=np.array(["a", "b", "c"])
    ).json()
    url = f"/v1/datasets/{dataset['id']}/examples"
    assert [e["id"] for e in sqlite_api.client.get(url, params={"ids": ["c"]}).json()["examples"]] == ["c"]
    missing = sqlite_api.client.get(url, params={"ids": ["a", "zz"]})
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert "'zz'" in missing.json()["detail"] and "'a'" not in missing.json()["detail"]


@pytest.mark.parametrize("ids", [[], [str(i) for i in range(101)], ["x"]])
def test_examples_bad_id_lists_are_422(sqlite_api: Api, ids: list[str]) -> None:
    dataset = sqlite_api.upload_npz(inputs=np.ones((3, 4), np.float32), targets=np.array([0, 1, 2])).json()
    response = sqlite_api.client.get(f"/v1/datasets/{dataset['id']}/examples", params={"ids": ids})
    assert response.status_code == 422, response.text


def test_examples_of_another_tenant_are_404(sqlite_api: Api) -> None:
    dataset = sqlite_api.upload_npz(inputs=np.ones((3, 4), np.float32), targets=np.array([0, 1, 2])).json()
    response = sqlite_api.client.get(
        f"/v1/datasets/{dataset['id']}/examples", params={"ids": ["0"]}, headers=sqlite_api.new_key("someone-else")
    )
    assert response.status_code == 404


def test_unknown_query_id_is_a_404_naming_it(sqlite_api: Api) -> None:
    attribution = submit(sqlite_api, setup_job(sqlite_api))
    url = f"/v1/attributions/{attribution['id']}/results"
    assert sqlite_api.client.get(url, params={"query_id": 501}).json()["results"]
    response = sqlite_api.client.get(url, params={"query_id": 777})
    assert response.status_code == 404
    assert "777" in response.json()["detail"]


def test_docs_pages_use_local_assets(sqlite_api: Api) -> None:
    for path in ("/docs", "/redoc"):
        page = sqlite_api.client.get(path, headers={"Authorization": ""})
        assert page.status_code == 200
        assert "cdn" not in page.text.lower() and "fonts.googleapis" not in page.text
    assert sqlite_api.client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert sqlite_api.client.get("/docs-assets/redoc.standalone.js").status_code == 200


def test_pages_are_shells_without_a_key(sqlite_api: Api) -> None:
    page = sqlite_api.client.get("/ui/attributions/attr_x", headers={"Authorization": ""})
    assert page.status_code == 200 and 'id="key-form"' in page.text  # it asks for the key itself
    assert sqlite_api.client.get("/ui/assets/../app.py").status_code == 404
    assert "/v1/datasets/{dataset_id}/examples" in sqlite_api.client.get("/openapi.json").json()["paths"]
