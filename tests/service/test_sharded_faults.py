"""Sharded jobs on the production topology, for real: PostgreSQL (a private schema), a private redis-server,
`attrib worker` subprocesses and SIGKILL (see tests/service/test_job_faults.py for the environment).

- a worker killed while it scores a shard: another worker reclaims the shard once its heartbeat is stale and
  the job succeeds with the rows of an uninterrupted run, without duplicates;
- the worker coordinating the job killed: the reaper requeues the job, another worker resumes it from the
  shards already done;
- a cancel while shards run: the job is `cancelled` within seconds, no result row is visible, and the workers
  stop scoring;
- a shard past its soft time limit: the job fails with a `time-limit` problem, no row written.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from service.db.session import session_scope
from service.db.tables import JobShard
from tests.service.conftest import Api
from tests.service.test_job_faults import FaultEnv, faults, stored_rows, submit, wait_job

__all__ = ["faults"]

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

TRAIN, QUERIES, TOP_K, SHARD = 12000, 1000, 5, 2000
SHARD_ENV = {"ATTRIB_SHARD_EXAMPLES": str(SHARD)}
OPTIONS = {"strategy": "ekfac", "batch_size": 16}  # 1,000 queries: each shard takes seconds on one thread


def upload_inputs(api: Api) -> dict[str, str]:
    import torch

    rng = np.random.default_rng(0)
    architecture = {
        "type": "sequential",
        "layers": [
            {"type": "linear", "in_features": 64, "out_features": 128},
            {"type": "tanh"},
            {"type": "linear", "in_features": 128, "out_features": 10},
        ],
    }
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
    model = api.upload_model(module, architecture).json()["id"]
    train = api.upload_npz(
        inputs=rng.normal(size=(TRAIN, 64)).astype(np.float32), targets=rng.integers(0, 10, size=TRAIN)
    ).json()["id"]
    query = api.upload_npz(
        inputs=rng.normal(size=(QUERIES, 64)).astype(np.float32), targets=rng.integers(0, 10, size=QUERIES)
    ).json()["id"]
    return {"model_id": model, "train_dataset_id": train, "query_dataset_id": query}


def shards(env: FaultEnv, job_id: str) -> list[JobShard]:
    with session_scope(env.database_url) as session:
        return list(session.scalars(select(JobShard).where(JobShard.job_id == job_id).order_by(JobShard.shard)))


def wait_for(what: Any, seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    while not (found := what()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return found


def owner(env: FaultEnv, claimed_by: str | None) -> subprocess.Popen[bytes]:
    """The `attrib worker` whose pool process is ``host:pid``."""
    pid = int(str(claimed_by).rsplit(":", 1)[1])
    with open(f"/proc/{pid}/stat") as stat:
        parent = int(stat.read().rsplit(")", 1)[1].split()[1])
    return next(worker for worker in env.workers if worker.pid in (pid, parent))


def assert_same_rows(rows: list[tuple[Any, ...]], reference: list[tuple[Any, ...]]) -> None:
    assert len(rows) == len({row[:3] for row in rows}) == 2 * QUERIES * TOP_K  # no duplicates
    assert [row[:5] for row in rows] == [row[:5] for row in reference]
    assert all(abs(a[5] - b[5]) <= 1e-4 * max(1.0, abs(b[5])) for a, b in zip(rows, reference, strict=True))


def reference_rows(env: FaultEnv, api: Api, inputs: dict[str, str]) -> list[tuple[Any, ...]]:
    reference = submit(api, inputs, top_k=TOP_K, options=OPTIONS)
    assert wait_job(api, reference["job_id"], 120)["status"] == "succeeded"
    rows = shards(env, reference["job_id"])
    fit_rows = [s for s in rows if s.prepared.get("job") == "fit"]  # its EK-FAC fit, two phases, in shards too
    assert (len(fit_rows), len(rows) - len(fit_rows)) == (2 * TRAIN // SHARD, TRAIN // SHARD)
    return stored_rows(env.database_url, reference["id"])


def test_a_worker_killed_mid_shard_is_replaced_and_the_rows_are_those_of_an_uninterrupted_run(
    faults: FaultEnv,
) -> None:
    with faults.api() as api:
        inputs = upload_inputs(api)
        faults.start_worker(**SHARD_ENV)
        faults.start_worker(**SHARD_ENV)
        job = submit(api, inputs, top_k=TOP_K, options=OPTIONS)
        coordinator = wait_for(
            lambda: (
                faults.row(job["job_id"]).claimed_by if faults.row(job["job_id"]).progress_stage == "score" else None
            ),
            120,
        )

        def remote_shard_in_progress() -> JobShard | None:
            return next(
                (
                    s
                    for s in shards(faults, job["job_id"])
                    if s.status == "running" and s.claimed_by != coordinator and s.progress_completed > 0
                ),
                None,
            )

        victim = wait_for(remote_shard_in_progress, 120)
        faults.kill_worker(owner(faults, victim.claimed_by))
        assert wait_job(api, job["job_id"], 120)["status"] == "succeeded"
        after = {s.shard: s for s in shards(faults, job["job_id"])}
        assert all(s.status == "done" for s in after.values())
        assert after[victim.shard].attempts >= 2 and after[victim.shard].claimed_by != victim.claimed_by
        rows = stored_rows(faults.database_url, job["id"])
        assert_same_rows(rows, reference_rows(faults, api, inputs))


def test_a_killed_coordinator_is_resumed_by_another_worker_from_the_shards_done(faults: FaultEnv) -> None:
    with faults.api() as api:
        inputs = upload_inputs(api)
        faults.start_worker(**SHARD_ENV)
        faults.start_worker(**SHARD_ENV)
        job = submit(api, inputs, top_k=TOP_K, options=OPTIONS)
        wait_for(lambda: sum(s.status == "done" for s in shards(faults, job["job_id"])) >= 2, 120)
        done_before = {s.shard: s.output_sha256 for s in shards(faults, job["job_id"]) if s.status == "done"}
        coordinator = owner(faults, faults.row(job["job_id"]).claimed_by)
        faults.kill_worker(coordinator)
        assert wait_job(api, job["job_id"], 120)["status"] == "succeeded"
        assert faults.row(job["job_id"]).attempts >= 2
        after = {s.shard: s for s in shards(faults, job["job_id"])}
        assert all(
            after[shard].output_sha256 == sha and after[shard].attempts == 1 for shard, sha in done_before.items()
        )  # kept, not scored again
        assert_same_rows(stored_rows(faults.database_url, job["id"]), reference_rows(faults, api, inputs))


def test_cancel_during_running_shards_ends_the_job_promptly_with_no_rows(faults: FaultEnv) -> None:
    with faults.api() as api:
        inputs = upload_inputs(api)
        faults.start_worker(**SHARD_ENV)
        faults.start_worker(**SHARD_ENV)
        job = submit(api, inputs, top_k=TOP_K, options=OPTIONS)
        wait_for(
            lambda: sum(s.status == "running" and s.progress_completed > 0 for s in shards(faults, job["job_id"])) >= 2,
            120,
        )
        asked = time.monotonic()
        assert api.client.post(f"/v1/jobs/{job['job_id']}/cancel").status_code == 200
        assert wait_job(api, job["job_id"], 10)["status"] == "cancelled"
        assert time.monotonic() - asked < 10
        assert stored_rows(faults.database_url, job["id"]) == []
        progress = {s.shard: s.progress_completed for s in shards(faults, job["job_id"])}
        time.sleep(2)  # both workers stopped scoring: no shard moves any more
        assert {s.shard: s.progress_completed for s in shards(faults, job["job_id"])} == progress


def test_a_shard_past_its_soft_time_limit_fails_the_job_with_a_time_limit_problem(faults: FaultEnv) -> None:
    # Shards of 6,000 examples: a scoring shard then takes several seconds even on a fast, idle machine (one of
    # 2,000 can finish under the 1 s limit there); the limit stops it after 1 s, so the test takes no longer.
    limits = {
        "ATTRIB_SHARD_EXAMPLES": str(3 * SHARD),
        "ATTRIB_SHARD_SOFT_TIME_LIMIT_SECONDS": "1",
        "ATTRIB_SHARD_TIME_LIMIT_SECONDS": "120",
    }
    with faults.api() as api:
        inputs = upload_inputs(api)
        faults.start_worker(**limits)
        faults.start_worker(**limits)
        attribution = submit(api, inputs, top_k=TOP_K, options=OPTIONS)
        job = wait_job(api, attribution["job_id"], 120)
        assert job["status"] == "failed", job
        assert job["error"]["type"].endswith("/time-limit") and "time limit of 1 s" in job["error"]["detail"]
        assert any(s.status == "failed" for s in shards(faults, job["id"]))
        assert stored_rows(faults.database_url, attribution["id"]) == []
