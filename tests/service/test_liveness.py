"""Job liveness on real databases: claims safe against duplicates and races, fenced writes, the reaper's pass,
cancel of a job whose worker is gone. Rows are made directly; the fault tests with real workers are in
test_job_faults.py."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text

from service.auth import get_or_create_tenant, tenant_for_key
from service.db.base import utcnow
from service.db.migrate import alembic_config, upgrade_to_head
from service.db.session import get_engine, session_scope
from service.db.tables import Job
from service.jobs import create_job
from service.liveness import CancelRequested, LivenessPolicy, Superseded, beat, claim, finish, report_progress
from service.reaper import reap
from service.settings import ConfigurationError, Settings
from tests.conftest import private_postgres_schema
from tests.service.conftest import build_api, make_settings
from worker.heartbeat import Heartbeat

POLICY = LivenessPolicy(
    heartbeat_seconds=1,
    stale_seconds=10,
    max_attempts=3,
    requeue_seconds=60,
    soft_time_limit_seconds=3600,
    time_limit_seconds=4000,
)


class RecordingQueue:
    """Records what the reaper sends; ``waiting`` is what the broker would report as its backlog."""

    def __init__(self, waiting: int = 0) -> None:
        self.sent: list[str] = []
        self.waiting = waiting
        self.lock = threading.Lock()

    def enqueue(self, job_id: str, kind: str) -> None:
        with self.lock:
            self.sent.append(job_id)

    def ready(self) -> bool:
        return True

    def backlog(self) -> int:
        return self.waiting

    def backlogs(self) -> dict[str, int]:
        return {"gpu": self.waiting, "cpu": 0}


@pytest.fixture
def url(tmp_path: Path, backend: str | None) -> str:
    database_url = make_settings(tmp_path, backend).resolved_database_url
    upgrade_to_head(database_url)
    return database_url


def new_job(url: str, tenant_id: str | None = None, **values: Any) -> str:
    with session_scope(url) as session:
        tenant_id = tenant_id or get_or_create_tenant(session, f"t-{uuid.uuid4().hex[:8]}").id
        job = create_job(session, tenant_id, "attribution", max_active_jobs=1000)
        for name, value in values.items():
            setattr(job, name, value)
        return job.id


def row(url: str, job_id: str) -> Job:
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def error_of(job: Job) -> dict[str, Any]:
    """The problem document of a failed job."""
    assert job.error is not None
    return job.error


def claim_in(url: str, job_id: str, policy: LivenessPolicy = POLICY, worker: str = "w") -> int | None:
    with session_scope(url) as session:
        return claim(session, job_id, policy, worker)


def ago(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


def test_a_duplicate_message_never_restarts_a_live_or_finished_job(url: str) -> None:
    job_id = new_job(url)
    assert claim_in(url, job_id, worker="first") == 1
    assert claim_in(url, job_id, worker="second") is None  # running, fresh heartbeat
    job = row(url, job_id)
    assert (job.status, job.attempts, job.claimed_by) == ("running", 1, "first")
    with session_scope(url) as session:
        finish(session, job_id, 1, "succeeded")
    assert claim_in(url, job_id) is None
    assert row(url, job_id).status == "succeeded"


def test_only_one_of_racing_claims_wins(url: str) -> None:
    job_id = new_job(url)
    barrier = threading.Barrier(6)
    results: list[int | None] = []

    def contend() -> None:
        barrier.wait()
        results.append(claim_in(url, job_id))

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results, key=str) == [1] + [None] * 5
    assert row(url, job_id).attempts == 1


def test_a_stale_job_is_taken_over_and_its_old_attempt_is_fenced_off(url: str) -> None:
    job_id = new_job(url)
    assert claim_in(url, job_id) == 1
    with session_scope(url) as session:
        session.get_one(Job, job_id).heartbeat_at = ago(60)
    assert claim_in(url, job_id, worker="second") == 2
    with session_scope(url) as session:
        assert not beat(session, job_id, 1)
        assert beat(session, job_id, 2)
    with pytest.raises(Superseded), session_scope(url) as session:
        report_progress(session, job_id, 1, "scoring", 1, 2)
    with pytest.raises(Superseded), session_scope(url) as session:
        finish(session, job_id, 1, "succeeded")
    job = row(url, job_id)
    assert (job.status, job.attempts, job.claimed_by) == ("running", 2, "second")


def test_reaper_requeues_stale_jobs_and_fails_them_after_the_last_attempt(url: str) -> None:
    fresh = new_job(url, status="running", attempts=1, heartbeat_at=ago(1), started_at=ago(5))
    stale = new_job(url, status="running", attempts=1, heartbeat_at=ago(60), started_at=ago(90))
    exhausted = new_job(url, status="running", attempts=3, heartbeat_at=ago(60), started_at=ago(90))
    cancelling = new_job(url, status="running", attempts=1, heartbeat_at=ago(60), cancel_requested=True)
    too_long = new_job(url, status="running", attempts=1, heartbeat_at=ago(60), started_at=ago(4000))
    queue = RecordingQueue()
    report = reap(url, queue, POLICY)
    assert (report.requeued, report.cancelled, sorted(report.failed)) == (
        [stale],
        [cancelling],
        sorted([exhausted, too_long]),
    )
    assert queue.sent == [stale]
    assert row(url, fresh).status == "running"
    assert (row(url, stale).status, row(url, stale).attempts) == ("queued", 1)
    assert row(url, cancelling).status == "cancelled"
    lost = error_of(row(url, exhausted))
    assert row(url, exhausted).status == "failed" and lost["type"].endswith("/worker-lost")
    assert "died 3 times" in lost["detail"]
    assert error_of(row(url, too_long))["type"].endswith("/time-limit")
    assert claim_in(url, stale) == 2
    assert reap(url, queue, POLICY) == type(report)()  # nothing left to do


def test_a_claim_of_a_job_out_of_attempts_fails_it(url: str) -> None:
    job_id = new_job(url, status="queued", attempts=3)
    assert claim_in(url, job_id) is None
    assert error_of(row(url, job_id))["type"].endswith("/worker-lost")


def test_reaper_resends_unclaimed_queued_jobs_only_when_the_broker_queue_is_empty(url: str) -> None:
    lost = new_job(url, enqueued_at=ago(120))
    recent = new_job(url)
    busy = RecordingQueue(waiting=5)
    assert reap(url, busy, POLICY).resent == [] and busy.sent == []
    empty = RecordingQueue()
    assert reap(url, empty, POLICY).resent == [lost]
    assert empty.sent == [lost]
    assert reap(url, empty, POLICY).resent == []  # sent again just now
    assert recent not in empty.sent


def test_concurrent_reapers_act_once_per_job(url: str) -> None:
    stale = [new_job(url, status="running", attempts=1, heartbeat_at=ago(60)) for _ in range(3)]
    lost = [new_job(url, enqueued_at=ago(120)) for _ in range(3)]
    queue = RecordingQueue()
    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait()
        reap(url, queue, POLICY)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(queue.sent) == sorted(stale + lost)


def test_cancel_ends_a_job_whose_worker_is_gone_at_once(tmp_path: Path, backend: str | None) -> None:
    for api in build_api(tmp_path, backend, job_stale_seconds=10, job_reaper_seconds=0):
        url = api.settings.resolved_database_url
        with session_scope(url) as session:
            tenant = tenant_for_key(session, api.client.headers["Authorization"].split()[1])
            assert tenant is not None
            tenant_id = tenant.id
        gone = new_job(url, tenant_id=tenant_id, status="running", attempts=1, heartbeat_at=ago(60))
        alive = new_job(url, tenant_id=tenant_id, status="running", attempts=1, heartbeat_at=utcnow())
        assert api.client.post(f"/v1/jobs/{gone}/cancel").json()["status"] == "cancelled"
        assert api.client.post(f"/v1/jobs/{alive}/cancel").json()["status"] == "running"
        assert row(url, alive).cancel_requested
        with pytest.raises(CancelRequested), session_scope(url) as session:
            report_progress(session, alive, 1, "scoring", 1, 2)  # the live worker stops at its next report


def test_liveness_settings_must_be_ordered(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        Settings(data_dir=tmp_path, job_heartbeat_seconds=30, job_stale_seconds=10)
    with pytest.raises(ConfigurationError):
        Settings(data_dir=tmp_path, job_time_limit_seconds=100, job_soft_time_limit_seconds=200)


def test_the_heartbeat_thread_keeps_a_job_alive_and_notices_when_it_lost_it(url: str) -> None:
    job_id = new_job(url)
    assert claim_in(url, job_id) == 1
    with session_scope(url) as session:
        session.get_one(Job, job_id).heartbeat_at = ago(60)
    with Heartbeat(url, job_id, 1, period=0.05) as heartbeat:
        wait_for(lambda: not POLICY.is_stale(row(url, job_id).heartbeat_at, utcnow()))
        with session_scope(url) as session:
            session.get_one(Job, job_id).attempts = 2  # another attempt took the job
        wait_for(heartbeat.lost.is_set)


def wait_for(condition: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_hard_time_limit_fails_the_job_from_the_pool_parent(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.exceptions import TimeLimitExceeded

    from service.settings import get_settings
    from worker.celery_app import RUN_JOB_TASK, app

    job_id = new_job(url)
    assert claim_in(url, job_id) == 1
    monkeypatch.setenv("ATTRIB_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ATTRIB_DATABASE_URL", url)
    monkeypatch.setenv("ATTRIB_BROKER_URL", "memory://")
    get_settings.cache_clear()
    try:  # what Celery calls in the parent process after killing the child that ran the job
        app.tasks[RUN_JOB_TASK].on_failure(TimeLimitExceeded(60), "task-id", [job_id], {}, None)
    finally:
        get_settings.cache_clear()
    job = row(url, job_id)
    assert job.status == "failed" and error_of(job)["type"].endswith("/time-limit")


@pytest.fixture
def empty_url(tmp_path: Path, backend: str | None) -> Iterator[str]:
    """An empty database: a SQLite file, or a PostgreSQL schema of its own (the session's is already at head)."""
    if backend is None:
        yield make_settings(tmp_path, None).resolved_database_url
        return
    with private_postgres_schema() as url:
        yield url


def test_migration_0002_lets_the_reaper_look_after_jobs_left_by_the_previous_version(empty_url: str) -> None:
    url = empty_url
    command.upgrade(alembic_config(url), "0001")
    created, started = ago(600), ago(300)
    with get_engine(url).begin() as connection:
        connection.execute(
            text("INSERT INTO tenants (id, name, created_at) VALUES ('tnt_old', 'old', :at)"), {"at": created}
        )
        for job_id, status in (("job_queued", "queued"), ("job_running", "running"), ("job_done", "succeeded")):
            connection.execute(
                text(
                    "INSERT INTO jobs (id, tenant_id, kind, status, progress_stage, progress_completed, progress_total, "
                    "cancel_requested, attempts, created_at, started_at) VALUES (:id, 'tnt_old', 'fit', :status, "
                    "'x', 0, 0, false, :attempts, :created, :started)"
                ),
                {
                    "id": job_id,
                    "status": status,
                    "attempts": int(status != "queued"),
                    "created": created,
                    "started": started if status != "queued" else None,
                },
            )
    upgrade_to_head(url)
    assert row(url, "job_queued").enqueued_at is not None and row(url, "job_running").heartbeat_at is not None
    assert row(url, "job_done").heartbeat_at is None
    queue = RecordingQueue()
    report = reap(url, queue, POLICY)
    assert (report.requeued, report.resent) == (["job_running"], ["job_queued"])
    assert sorted(queue.sent) == ["job_queued", "job_running"]
    get_engine(url).dispose()
