"""Ten identical POSTs with one Idempotency-Key, sent at the same moment to a real server: one resource is
created and every reply is the same (SQLite and PostgreSQL)."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.auth import create_api_key
from service.db.migrate import upgrade_to_head
from service.db.session import session_scope
from tests.conftest import REDIS_URL, require_server
from tests.loadgen import api_server
from tests.service.conftest import Api, tiny_dataset

PARALLEL = 10


def post_together(
    base_url: str, headers: dict[str, str], send: Callable[[httpx.Client], httpx.Response]
) -> list[httpx.Response]:
    barrier = threading.Barrier(PARALLEL)
    replies: list[httpx.Response | None] = [None] * PARALLEL

    def one(index: int) -> None:
        with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
            barrier.wait()
            replies[index] = send(client)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(PARALLEL)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answered = [reply for reply in replies if reply is not None]
    assert len(answered) == PARALLEL, "a request thread failed"
    return answered


@pytest.mark.e2e
@pytest.mark.redis
@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
def test_parallel_retries_create_one_resource_and_answer_alike(tmp_path: Path, backend: str | None) -> None:
    require_server("Redis", 6379)
    database_url = backend or f"sqlite:///{tmp_path / 'race.sqlite'}"
    upgrade_to_head(database_url)
    with session_scope(database_url) as session:
        headers = {"Authorization": f"Bearer {create_api_key(session, 'racer')}"}
    env = {"ATTRIB_DATA_DIR": str(tmp_path), "ATTRIB_DATABASE_URL": database_url, "ATTRIB_BROKER_URL": REDIS_URL}
    buffer = io.BytesIO()
    np.savez(buffer, **tiny_dataset(50))
    payload = buffer.getvalue()

    def upload(client: httpx.Client) -> httpx.Response:
        return client.post(
            "/v1/datasets",
            data={"metadata": json.dumps({"name": "once"})},
            files={"data": ("d.npz", payload)},
            headers={"Idempotency-Key": "upload-1"},
        )

    with api_server(env, tmp_path / "server.log") as base_url:
        replies = post_together(base_url, headers, upload)
        listed = httpx.get(f"{base_url}/v1/datasets", headers=headers).json()["datasets"]
        different = httpx.post(
            f"{base_url}/v1/datasets",
            headers={**headers, "Idempotency-Key": "upload-1"},
            data={"metadata": json.dumps({"name": "other"})},
            files={"data": ("d.npz", payload)},
        )
    assert [r.status_code for r in replies] == [201] * PARALLEL, [r.text for r in replies]
    assert len({r.text for r in replies}) == 1
    assert len({r.headers["location"] for r in replies}) == 1
    assert [d["id"] for d in listed] == [replies[0].json()["id"]]
    assert different.status_code == 422 and different.json()["type"].endswith("/idempotency-key-reused")


def test_a_failed_request_releases_its_key(sqlite_api: Api) -> None:
    bad = sqlite_api.client.post(
        "/v1/datasets",
        data={"metadata": json.dumps({"name": "x"})},
        files={"data": ("d.npz", b"not an npz")},
        headers={"Idempotency-Key": "k1"},
    )
    assert bad.status_code == 422
    buffer = io.BytesIO()
    np.savez(buffer, **tiny_dataset(5))
    good, again = (
        sqlite_api.client.post(
            "/v1/datasets",
            data={"metadata": json.dumps({"name": "x"})},
            files={"data": ("d.npz", buffer.getvalue())},
            headers={"Idempotency-Key": "k1"},
        )
        for _ in range(2)
    )
    assert good.status_code == 201, good.text
    assert again.json() == good.json()
