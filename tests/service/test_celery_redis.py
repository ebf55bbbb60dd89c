"""The production topology: PostgreSQL for the rows, Redis as the broker, a real Celery worker."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from celery.contrib.testing.worker import start_worker
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_api_key
from service.db.migrate import upgrade_to_head
from service.db.session import session_scope
from service.queue import CeleryQueue
from service.settings import Settings, get_settings
from tests.conftest import REDIS_URL, require_server
from tests.service.conftest import Api
from tests.service.test_attributions import all_rows, setup_job


@pytest.mark.redis
@pytest.mark.postgres
def test_job_runs_through_redis_and_a_celery_worker(
    tmp_path: Path, postgres_schema_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_server("Redis", 6379)
    monkeypatch.setenv("ATTRIB_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ATTRIB_DATABASE_URL", postgres_schema_url)
    monkeypatch.setenv("ATTRIB_BROKER_URL", REDIS_URL)
    get_settings.cache_clear()
    settings = Settings()
    upgrade_to_head(settings.resolved_database_url)
    queue = CeleryQueue(REDIS_URL, queue_prefix=f"attrib-test-{uuid.uuid4().hex[:8]}.")
    app = create_app(settings, queue=queue)
    try:
        with (
            start_worker(queue.app, pool="solo", perform_ping_check=False, shutdown_timeout=30),
            TestClient(app) as client,
        ):
            with session_scope(settings.resolved_database_url) as session:
                client.headers["Authorization"] = f"Bearer {create_api_key(session, 'redis-tenant')}"
            api = Api(client, settings, queue)
            assert client.get("/readyz").json()["checks"] == {"database": True, "broker": True, "storage": True}
            setup = setup_job(api)
            response = client.post(
                "/v1/attributions",
                json={
                    "model_id": setup["model_id"],
                    "train_dataset_id": setup["train_dataset_id"],
                    "query_dataset_id": setup["query_dataset_id"],
                    "method": "gradient_similarity",
                    "top_k": 3,
                },
            )
            assert response.status_code == 202
            job_id = response.json()["job_id"]
            deadline = time.monotonic() + 120
            while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
                assert time.monotonic() < deadline, job
                time.sleep(0.2)
            assert job["status"] == "succeeded", job
            assert len(all_rows(api, response.json()["id"])) == 4 * 3
    finally:
        get_settings.cache_clear()
