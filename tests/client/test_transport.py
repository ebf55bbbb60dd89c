"""Retries, idempotency keys, problem documents and configuration of the SDK, against a scripted transport."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from attrib import (
    AsyncClient,
    Client,
    ConfigurationError,
    ConnectionFailed,
    InvalidInput,
    JobFailed,
    RetryPolicy,
    ServiceUnavailable,
)
from attrib.options import DataInf, Edit, Influence
from attrib.payloads import dataset_part

NO_WAIT = RetryPolicy(attempts=3, backoff=0.0)
MODEL = {"id": "mdl_1", "name": "m", "format": "spec", "num_parameters": 3, "tracked_layers": ["0"]}


class Script:
    """Answers requests from a list of responses (or exceptions), recording what was sent."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def client_for(script: Script) -> Client:
    return Client("http://api.test", "atk_test", retry=NO_WAIT, transport=httpx.MockTransport(script))


def test_a_retried_post_reuses_its_idempotency_key() -> None:
    script = Script(
        httpx.Response(503, json={"status": 503, "detail": "queue down"}),
        httpx.ConnectError("refused"),
        httpx.Response(201, json=MODEL),
    )
    with client_for(script) as client:
        model = client.upload_model({"0.weight": np.ones(3, np.float32)}, name="m", architecture=[], loss="mse")
    assert model.id == "mdl_1"
    keys = {request.headers["Idempotency-Key"] for request in script.requests}
    assert len(script.requests) == 3 and len(keys) == 1
    assert all(request.headers["Authorization"] == "Bearer atk_test" for request in script.requests)
    assert all(b'name="weights"' in request.content for request in script.requests)  # the file is re-sent whole


def test_a_key_over_its_rate_waits_for_retry_after_and_goes_on() -> None:
    from attrib.transport import RetryPolicy

    limited = httpx.Response(429, headers={"Retry-After": "3"}, json={"status": 429, "detail": "too many requests"})
    script = Script(limited, httpx.Response(200, json={"models": [], "next_page_token": None}))
    assert RetryPolicy().delay(0, limited) == 3.0  # the server's Retry-After, not the backoff
    with client_for(script) as client:
        assert list(client.list_models()) == []
    assert len(script.requests) == 2


def test_two_logical_posts_get_two_keys() -> None:
    script = Script(httpx.Response(201, json=MODEL), httpx.Response(201, json=MODEL))
    with client_for(script) as client:
        for _ in range(2):
            client.upload_model(b"weights", name="m", architecture=[], loss="mse")
    assert script.requests[0].headers["Idempotency-Key"] != script.requests[1].headers["Idempotency-Key"]


def test_retries_give_up_with_typed_errors() -> None:
    unavailable = Script(
        *[
            httpx.Response(
                503, json={"title": "Service Unavailable", "status": 503, "detail": "the job queue is unavailable"}
            )
        ]
        * 3
    )
    with client_for(unavailable) as client, pytest.raises(ServiceUnavailable, match="job queue"):
        client.get_job("job_1")
    assert len(unavailable.requests) == 3
    down = Script(*[httpx.ConnectError("refused")] * 3)
    with client_for(down) as client, pytest.raises(ConnectionFailed):
        client.get_job("job_1")


def test_a_422_is_not_retried_and_carries_field_errors() -> None:
    problem = {
        "type": "https://attrib.dev/problems/invalid-input",
        "title": "Invalid input",
        "status": 422,
        "detail": "the request is invalid",
        "errors": [{"field": "body.top_k", "message": "too small"}],
    }
    script = Script(httpx.Response(422, json=problem, headers={"content-type": "application/problem+json"}))
    with client_for(script) as client, pytest.raises(InvalidInput) as raised:
        client.attribute("mdl_1", "ds_1", "ds_2", top_k=0, options=DataInf(damping=0.1))
    assert len(script.requests) == 1
    assert raised.value.status == 422 and raised.value.errors[0].field == "body.top_k"
    body = json.loads(script.requests[0].content)
    assert body["method"] == "datainf" and body["options"] == {"damping": 0.1}


def test_typed_options_name_their_method() -> None:
    assert Influence(strategy="kfac", damping=1e-3).to_json() == {"strategy": "kfac", "damping": 1e-3}
    script = Script(httpx.Response(422, json={"status": 422, "detail": "x"}))
    with client_for(script) as client, pytest.raises(ValueError, match="datainf"):
        client.attribute("mdl_1", "ds_1", method="influence", options=DataInf())
    assert script.requests == []


def test_async_client_retries_with_one_key() -> None:
    script = Script(
        httpx.Response(503, json={"status": 503}),
        httpx.Response(
            202,
            json={
                "id": "attr_1",
                "job_id": "job_1",
                "status": "queued",
                "method": "influence",
                "mode": "self",
                "top_k": 3,
                "train_dataset_id": "ds_1",
                "query_dataset_id": None,
            },
        ),
    )

    async def submit() -> str:
        async with AsyncClient(
            "http://api.test", "atk_test", retry=NO_WAIT, transport=httpx.MockTransport(script)
        ) as client:
            attribution = await client.attribute("mdl_1", "ds_1", mode="self", top_k=3)
            return attribution.job.id

    assert asyncio.run(submit()) == "job_1"
    assert len({request.headers["Idempotency-Key"] for request in script.requests}) == 1


def test_key_and_url_from_the_environment_or_the_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ATTRIB_API_KEY", "ATTRIB_URL", "ATTRIB_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ATTRIB_DATA_DIR", str(tmp_path))
    with pytest.raises(ConfigurationError, match="api-key"):
        Client()
    (tmp_path / "api-key").write_text("atk_from_file\n")
    with Client() as client:
        assert client.http.headers["Authorization"] == "Bearer atk_from_file"
        assert client.base_url == "http://127.0.0.1:8000"
    monkeypatch.setenv("ATTRIB_API_KEY", "atk_from_env")
    monkeypatch.setenv("ATTRIB_URL", "http://example.test:9000/")
    with Client() as client:
        assert client.http.headers["Authorization"] == "Bearer atk_from_env"
        assert client.base_url == "http://example.test:9000"


def test_dataset_parts_never_pickle() -> None:
    part = dataset_part(inputs=np.zeros((2, 3)), targets=[0, 1], ids=np.array(["a", "b"]))
    with np.load(part.open(), allow_pickle=False) as arrays:  # loads without pickle, or raises
        assert arrays["ids"].tolist() == ["a", "b"]
    with pytest.raises(TypeError, match="object arrays"):
        dataset_part(inputs=np.zeros((2, 3)), targets=np.array([{}, {}], dtype=object))
    with pytest.raises(TypeError, match="not both"):
        dataset_part({"inputs": np.zeros(2)}, inputs=np.zeros(2))


def job_json(status: str, completed: int) -> dict[str, object]:
    return {
        "id": "job_e",
        "kind": "edit",
        "status": status,
        "progress": {"stage": "edit", "completed": completed, "total": 2},
        "error": None,
        "result_url": None,
    }


def test_edit_waits_for_its_job_then_returns_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("attrib.jobs.POLL_SECONDS", 0.0)
    script = Script(
        httpx.Response(202, json={"model_id": "mdl_2", "job_id": "job_e"}, headers={"Location": "/v1/jobs/job_e"}),
        httpx.Response(200, json=job_json("running", 1)),
        httpx.Response(200, json=job_json("succeeded", 2)),
        httpx.Response(200, json=MODEL | {"id": "mdl_2"}),
    )
    with client_for(script) as client:
        model = client.edit("attr_1", [np.int64(3), "x"], name="edited", progress=False)
    assert model.id == "mdl_2"
    assert [r.url.path for r in script.requests] == [
        "/v1/attributions/attr_1/edit",
        "/v1/jobs/job_e",
        "/v1/jobs/job_e",
        "/v1/models/mdl_2",
    ]
    assert json.loads(script.requests[0].content) == {"remove": [3, "x"], "name": "edited"}


@pytest.mark.parametrize(
    ("options", "sent"),
    [
        (Edit(estimator="proximal", max_steps=10), {"estimator": "proximal", "max_steps": 10}),
        (Edit(newton_steps=1, proximity=1e-3), {"newton_steps": 1, "proximity": 1e-3}),
        ({"estimator": "first_order"}, {"estimator": "first_order"}),
    ],
)
def test_edit_sends_only_the_options_set(monkeypatch: pytest.MonkeyPatch, options: Any, sent: dict[str, Any]) -> None:
    monkeypatch.setattr("attrib.jobs.POLL_SECONDS", 0.0)
    script = Script(
        httpx.Response(202, json={"model_id": "mdl_2", "job_id": "job_e"}),
        httpx.Response(200, json=job_json("succeeded", 2)),
        httpx.Response(200, json=MODEL | {"id": "mdl_2"}),
    )
    with client_for(script) as client:
        client.edit("attr_1", [3], name="edited", options=options, progress=False)
    assert json.loads(script.requests[0].content) == {"remove": [3], "name": "edited", "options": sent}


def test_a_failed_edit_job_raises_job_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("attrib.jobs.POLL_SECONDS", 0.0)
    failed = job_json("failed", 0) | {"error": {"status": 422, "detail": "id 3 is not a training id"}}
    script = Script(
        httpx.Response(202, json={"model_id": "mdl_2", "job_id": "job_e"}), httpx.Response(200, json=failed)
    )
    with client_for(script) as client, pytest.raises(JobFailed, match="not a training id") as raised:
        client.edit("attr_1", [3], name="edited", progress=False)
    assert raised.value.job.status == "failed"
