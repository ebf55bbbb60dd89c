"""Fault tests of job liveness with the production topology: real PostgreSQL (a private schema), a redis-server
the test starts on a free port (without persistence unless a test asks for it), real `attrib worker`
subprocesses, and real SIGKILLs: of a whole worker, of the pool process running a job (as the OOM killer would),
of Redis; and a soft time limit.

Liveness settings are small for the subprocesses (heartbeat 0.5 s, stale after 3 s, reaper every 0.5 s, queued
jobs resent after 2 s) so that each test takes seconds. The slow job is honest work: a conjugate-gradient
influence solve per query, run to its iteration cap, on 1,000 training examples.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, text

from service.app import create_app
from service.auth import create_api_key
from service.db.migrate import upgrade_to_head
from service.db.session import session_scope
from service.db.tables import Fit, Job
from service.queue import CeleryQueue, JobQueue
from service.results import all_results
from service.settings import Settings
from tests.conftest import POSTGRES_URL, require_server
from tests.service.conftest import Api

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

LIVENESS_ENV = {
    "ATTRIB_JOB_HEARTBEAT_SECONDS": "0.5",
    "ATTRIB_JOB_STALE_SECONDS": "3",
    "ATTRIB_JOB_REAPER_SECONDS": "0.5",
    "ATTRIB_JOB_REQUEUE_SECONDS": "2",
}
SLOW_TRAIN, SLOW_QUERY, SLOW_TOP_K = 1000, 10, 5
SLOW_OPTIONS = {"strategy": "cg", "max_iter": 200, "tol": 1e-12, "fisher": "empirical"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A redis-server of the test's own. Without persistence a restart loses every message; with it (an
    append-only file synced at every write) a SIGKILL and restart keeps them."""

    def __init__(self, directory: Path, persistent: bool = False) -> None:
        self.port = free_port()
        self.directory = directory
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            if os.environ.get("CI") == "true":
                pytest.fail("redis-server is not installed (CI=true: it is required)")
            pytest.skip("redis-server is not installed")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [
                executable,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                *persistence,
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass
class FaultEnv:
    """The private schema and redis-server, an in-process API on them, and `attrib worker` subprocesses."""

    tmp_path: Path
    database_url: str
    redis_server: RedisServer
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def settings(self, **overrides: Any) -> Settings:
        values = {f"job_{k[len('ATTRIB_JOB_') :].lower()}": float(v) for k, v in LIVENESS_ENV.items()}
        return Settings(
            data_dir=self.tmp_path,
            database_url=self.database_url,
            broker_url=self.redis_server.url,
            **{**values, **overrides},
        )

    @contextmanager
    def api(self, **overrides: Any) -> Iterator[Api[JobQueue]]:
        settings = self.settings(**overrides)
        app = create_app(settings)
        with TestClient(app) as client:
            with session_scope(self.database_url) as session:
                client.headers["Authorization"] = f"Bearer {create_api_key(session, 'faults')}"
            queue: JobQueue = app.state.queue
            yield Api(client, settings, queue)

    def start_worker(self, *args: str, **extra_env: str) -> subprocess.Popen[bytes]:
        """An `attrib worker` (``args``: more of its arguments, e.g. ``--queues``, ``cpu``)."""
        env = {
            **os.environ,
            **LIVENESS_ENV,
            "ATTRIB_DATA_DIR": str(self.tmp_path),
            "ATTRIB_DATABASE_URL": self.database_url,
            "ATTRIB_BROKER_URL": self.redis_server.url,
            "OMP_NUM_THREADS": "1",
            **extra_env,
        }
        attrib = Path(sys.executable).with_name("attrib")
        command = [str(attrib)] if attrib.exists() else [sys.executable, "-m", "service.cli"]
        log = (self.tmp_path / f"worker-{len(self.workers)}.log").open("wb")
        worker = subprocess.Popen(
            [*command, "worker", "--loglevel=WARNING", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(worker)
        return worker

    def kill_worker(self, worker: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and the pool process running its job (its whole process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()

    def row(self, job_id: str) -> Job:
        with session_scope(self.database_url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job


@pytest.fixture
def faults(tmp_path: Path) -> Iterator[FaultEnv]:
    require_server("PostgreSQL", 5432)
    schema = f"attrib_faults_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    redis_server = RedisServer(tmp_path)
    env = FaultEnv(tmp_path, f"{POSTGRES_URL}?options=-csearch_path%3D{schema}", redis_server)
    try:
        redis_server.start()
        upgrade_to_head(env.database_url)
        yield env
    finally:
        for worker in env.workers:
            env.kill_worker(worker)
        redis_server.kill()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def upload_slow_inputs(api: Api[JobQueue], queries: int = SLOW_QUERY) -> dict[str, str]:
    rng = np.random.default_rng(0)
    architecture = {
        "type": "sequential",
        "layers": [
            {"type": "linear", "in_features": 16, "out_features": 32},
            {"type": "tanh"},
            {"type": "linear", "in_features": 32, "out_features": 3},
        ],
    }
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    model = api.upload_model(module, architecture).json()["id"]
    train = api.upload_npz(
        inputs=rng.normal(size=(SLOW_TRAIN, 16)).astype(np.float32), targets=rng.integers(0, 3, size=SLOW_TRAIN)
    ).json()["id"]
    query = api.upload_npz(
        inputs=rng.normal(size=(queries, 16)).astype(np.float32), targets=rng.integers(0, 3, size=queries)
    ).json()["id"]
    return {"model_id": model, "train_dataset_id": train, "query_dataset_id": query}


def submit(api: Api[JobQueue], inputs: dict[str, str], method: str = "influence", **body: Any) -> dict[str, Any]:
    response = api.client.post("/v1/attributions", json={**inputs, "method": method, "mode": "pairwise", **body})
    assert response.status_code == 202, response.text
    return response.json()


def submit_slow(api: Api[JobQueue], inputs: dict[str, str]) -> dict[str, Any]:
    return submit(api, inputs, top_k=SLOW_TOP_K, options=SLOW_OPTIONS)


def wait_job(api: Api[JobQueue], job_id: str, seconds: float, until: Any = None) -> dict[str, Any]:
    """Poll the job until ``until(job)`` (default: it finished)."""
    until = until or (lambda job: job["status"] not in ("queued", "running"))
    deadline = time.monotonic() + seconds
    while not until(job := api.client.get(f"/v1/jobs/{job_id}").json()):
        assert time.monotonic() < deadline, f"job not there after {seconds} s: {job}"
        time.sleep(0.1)
    return job


def running_with_progress(job: dict[str, Any]) -> bool:
    assert job["status"] in ("queued", "running"), job
    return job["status"] == "running" and job["progress"]["completed"] > 0


def stored_rows(database_url: str, attribution_id: str) -> list[tuple[Any, ...]]:
    with session_scope(database_url) as session:
        rows = [
            (row.direction, row.query_pos, row.rank, row.query_id, row.train_id, row.score)
            for row in all_results(session, attribution_id)
        ]
        return sorted(rows, key=lambda row: (row[0], row[1], row[2]))


def test_a_job_whose_worker_is_killed_succeeds_on_another_worker(faults: FaultEnv) -> None:
    with faults.api() as api:
        inputs = upload_slow_inputs(api)
        first = faults.start_worker()
        interrupted = submit_slow(api, inputs)
        wait_job(api, interrupted["job_id"], 60, until=running_with_progress)
        first_claim = faults.row(interrupted["job_id"]).claimed_by
        second = faults.start_worker()
        faults.kill_worker(first)
        killed_at = time.monotonic()
        job = wait_job(api, interrupted["job_id"], 60)
        assert job["status"] == "succeeded", job
        assert time.monotonic() - killed_at < 60
        recovered = faults.row(interrupted["job_id"])
        # (2 unless the machine was so loaded that a live worker's heartbeat went stale too: still one result)
        assert recovered.attempts >= 2 and recovered.claimed_by not in (None, first_claim)
        assert second.poll() is None

        reference = submit_slow(api, inputs)  # the same job, uninterrupted
        assert wait_job(api, reference["job_id"], 60)["status"] == "succeeded"
        rows = stored_rows(faults.database_url, interrupted["id"])
        assert len(rows) == len(set(row[:3] for row in rows)) == 2 * SLOW_QUERY * SLOW_TOP_K
        assert rows == stored_rows(faults.database_url, reference["id"])
        with session_scope(faults.database_url) as session:
            fits = session.scalar(select(func.count()).select_from(Fit).where(Fit.job_id == interrupted["job_id"]))
        assert fits <= 1


@pytest.mark.parametrize("persistent", [False, True], ids=["without-persistence", "with-persistence"])
def test_queued_jobs_survive_a_redis_restart(faults: FaultEnv, persistent: bool) -> None:
    faults.redis_server.kill()
    faults.redis_server.persistent = persistent
    faults.redis_server.start()
    with faults.api(job_reaper_seconds=0) as api:  # only the worker's reaper: no API process is needed
        inputs = upload_slow_inputs(api)
        jobs = [submit(api, inputs, method="gradient_similarity", top_k=3) for _ in range(4)]
        queue = CeleryQueue(faults.redis_server.url)
        assert queue.backlogs() == {"gpu": 4, "cpu": 0}
        faults.redis_server.kill()
        faults.redis_server.start()
        # without persistence every message is gone (the reaper resends them); with it, they are all there
        assert queue.backlog() == (4 if persistent else 0)
        assert {faults.row(job["job_id"]).status for job in jobs} == {"queued"}
        faults.start_worker()
        for job in jobs:
            assert wait_job(api, job["job_id"], 60)["status"] == "succeeded"
            assert len(stored_rows(faults.database_url, job["id"])) == 2 * SLOW_QUERY * 3


def test_cancel_of_a_job_whose_worker_was_killed_ends_it_promptly(faults: FaultEnv) -> None:
    with faults.api() as api:
        inputs = upload_slow_inputs(api)
        worker = faults.start_worker()
        job = submit_slow(api, inputs)
        wait_job(api, job["job_id"], 60, until=running_with_progress)
        faults.kill_worker(worker)
        killed_at = time.monotonic()
        answer = api.client.post(f"/v1/jobs/{job['job_id']}/cancel")
        assert answer.status_code == 200 and answer.json()["status"] in ("running", "cancelled")
        # no worker is alive: the API's reaper ends it once its heartbeat is stale (3 s)
        assert wait_job(api, job["job_id"], 20)["status"] == "cancelled"
        assert time.monotonic() - killed_at < 20
        assert api.client.post(f"/v1/jobs/{job['job_id']}/cancel").status_code == 409


def test_a_job_past_its_soft_time_limit_fails_with_a_time_limit_problem(faults: FaultEnv) -> None:
    with faults.api() as api:
        # four times the slow job's queries against a 1 s limit: the slow job alone took 2 s or less on an idle
        # machine, too close to a 2 s limit
        inputs = upload_slow_inputs(api, queries=4 * SLOW_QUERY)
        faults.start_worker(ATTRIB_JOB_SOFT_TIME_LIMIT_SECONDS="1", ATTRIB_JOB_TIME_LIMIT_SECONDS="120")
        job = wait_job(api, submit_slow(api, inputs)["job_id"], 60)
        assert job["status"] == "failed", job
        assert job["error"]["type"].endswith("/time-limit") and "time limit of 1 s" in job["error"]["detail"]
        assert faults.row(job["id"]).attempts == 1


def test_a_job_whose_pool_process_is_killed_as_by_the_oom_killer_is_run_again(faults: FaultEnv) -> None:
    with faults.api() as api:
        inputs = upload_slow_inputs(api)
        worker = faults.start_worker()
        job = submit(api, inputs, method="influence", top_k=2, options=SLOW_OPTIONS)
        wait_job(api, job["job_id"], 60, until=running_with_progress)
        killed = str(faults.row(job["job_id"]).claimed_by)  # host:pid of the pool process running the job
        child = int(killed.rsplit(":", 1)[1])
        assert child != worker.pid
        os.kill(child, signal.SIGKILL)  # Celery redelivers the message at once: dropped, the job looks alive
        assert wait_job(api, job["job_id"], 60)["status"] == "succeeded"
        assert worker.poll() is None  # the worker started a new pool process and ran the job there
        recovered = faults.row(job["job_id"])
        assert recovered.attempts >= 2 and recovered.claimed_by != killed
        assert len(stored_rows(faults.database_url, job["id"])) == 2 * SLOW_QUERY * 2
