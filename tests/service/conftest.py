"""API test fixtures: an app on the SQLite default or on real PostgreSQL, jobs run by the real job runner."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Generic

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as save_safetensors
from sqlalchemy.engine import make_url
from torch import nn
from typing_extensions import TypeVar

from service.app import create_app
from service.auth import create_api_key
from service.db.migrate import upgrade_to_head
from service.db.session import session_scope
from service.queue import QUEUES, JobQueue, queue_for
from service.settings import Settings
from tests.conftest import private_postgres_schema, require_server
from worker.runner import run_job

MLP_ARCHITECTURE = {
    "type": "sequential",
    "layers": [
        {"type": "linear", "in_features": 4, "out_features": 8},
        {"type": "tanh"},
        {"type": "linear", "in_features": 8, "out_features": 3},
    ],
}


class InlineQueue:
    """Runs each job at once through the real job runner (the broker path is tested on its own)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enqueued: list[str] = []
        self.paused = False

    def enqueue(self, job_id: str, kind: str) -> None:
        queue_for(kind)  # every kind has a queue
        self.enqueued.append(job_id)
        if not self.paused:
            run_job(job_id, self.settings)

    def ready(self) -> bool:
        return True

    def backlog(self) -> int:
        return 0

    def backlogs(self) -> dict[str, int]:
        return {queue: 0 for queue in QUEUES}


@pytest.fixture(scope="session")
def postgres_schema_url() -> Iterator[str]:
    """A private schema in the real `test` database, dropped at the end."""
    require_server("PostgreSQL", 5432)
    with private_postgres_schema() as url:
        yield url


def make_settings(tmp_path: Path, database_url: str | None, **limits: Any) -> Settings:
    broker = "memory://" if database_url else None
    return Settings(data_dir=tmp_path, database_url=database_url, broker_url=broker, **limits)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_schema_url"))


QueueT = TypeVar("QueueT", bound=JobQueue, default=InlineQueue)


class Api(Generic[QueueT]):
    """A test client with an API key and helpers to upload the usual artifacts; ``queue`` is the app's queue
    (an ``InlineQueue`` unless a test gives another)."""

    def __init__(self, client: TestClient, settings: Settings, queue: QueueT) -> None:
        self.client = client
        self.settings = settings
        self.queue = queue

    def new_key(self, tenant: str) -> dict[str, str]:
        with session_scope(self.settings.resolved_database_url) as session:
            return {"Authorization": f"Bearer {create_api_key(session, tenant)}"}

    def upload_model(
        self,
        module: nn.Module,
        architecture: dict[str, Any] = MLP_ARCHITECTURE,
        loss: str = "cross_entropy",
        name: str = "m",
        **kwargs: Any,
    ) -> Any:
        weights = save_safetensors({k: v.contiguous() for k, v in module.state_dict().items()})
        metadata = {"name": name, "format": "spec", "architecture": architecture, "task": {"loss": loss}}
        return self.client.post(
            "/v1/models",
            data={"metadata": json.dumps(metadata)},
            files={"weights": ("w.safetensors", weights)},
            **kwargs,
        )

    def upload_npz(self, name: str = "d", filename: str = "d.npz", **arrays: np.ndarray) -> Any:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return self.client.post(
            "/v1/datasets", data={"metadata": json.dumps({"name": name})}, files={"data": (filename, buffer.getvalue())}
        )


_sqlite_template: tempfile.TemporaryDirectory[str] | None = None


def migrated_sqlite_template() -> Path:
    """An SQLite database migrated to head once per test process (removed when the process ends)."""
    global _sqlite_template
    if _sqlite_template is None:
        _sqlite_template = tempfile.TemporaryDirectory(prefix="attrib-sqlite-template-")
        upgrade_to_head(f"sqlite:///{Path(_sqlite_template.name) / 'head.sqlite'}")
    return Path(_sqlite_template.name) / "head.sqlite"


def migrate(settings: Settings) -> None:
    """Bring the settings' database to head. A new SQLite database starts as a copy of one migrated once per
    process: Alembic's full run from an empty file costs about a second, paid by some two hundred tests (the
    migrations themselves are checked in test_migrations.py); the upgrade then runs on the copy as on any database
    at head, and finds nothing to do."""
    url = settings.resolved_database_url
    if settings.database_url is None:
        database = Path(str(make_url(url).database))
        if not database.exists():
            database.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(migrated_sqlite_template(), database)
    upgrade_to_head(url)


def build_api(tmp_path: Path, database_url: str | None, **limits: Any) -> Iterator[Api]:
    settings = make_settings(tmp_path, database_url, **limits)
    migrate(settings)
    queue = InlineQueue(settings)
    app = create_app(settings, queue=queue)
    with TestClient(app, raise_server_exceptions=False) as client:
        api = Api(client, settings, queue)
        client.headers.update(api.new_key(f"tenant-{uuid.uuid4().hex[:6]}"))
        yield api


@pytest.fixture
def api(tmp_path: Path, backend: str | None) -> Iterator[Api]:
    yield from build_api(tmp_path, backend)


@pytest.fixture
def sqlite_api(tmp_path: Path) -> Iterator[Api]:
    yield from build_api(tmp_path, None)


def tiny_classifier(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def tiny_dataset(n: int = 30, seed: int = 0, ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"inputs": rng.normal(size=(n, 4)).astype(np.float32), "targets": rng.integers(0, 3, size=n)}
    if ids is not None:
        arrays["ids"] = ids
    return arrays
