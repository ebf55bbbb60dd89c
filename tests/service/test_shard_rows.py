"""The claims of a sharded job's rows (`worker.shard_rows`) on real databases: a coordinator claims from the last
shard down while the other workers, taking the shards' messages in order, claim from the first up, so that they
meet once in the middle instead of racing for the same shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.db.migrate import upgrade_to_head
from service.db.session import session_scope
from service.liveness import claim
from tests.service.conftest import make_settings
from tests.service.test_liveness import POLICY, new_job
from worker.attribution.shards import shard_ranges
from worker.shard_rows import claim_shard, create_shards, finish_shard, shards_of


@pytest.fixture
def url(tmp_path: Path, backend: str | None) -> str:
    database_url = make_settings(tmp_path, backend).resolved_database_url
    upgrade_to_head(database_url)
    return database_url


def running_job_with_shards(url: str, count: int) -> str:
    job_id = new_job(url)
    with session_scope(url) as session:
        assert claim(session, job_id, POLICY, "coordinator") == 1
        create_shards(session, job_id, shard_ranges(count * 10, 10), {"curvatures": None, "queries": None})
    return job_id


def claim_next(url: str, job_id: str, worker: str, last_first: bool) -> int | None:
    with session_scope(url) as session:
        claimed = claim_shard(session, job_id, None, POLICY, worker, last_first=last_first)
        return None if claimed is None else claimed[0].shard


def test_the_coordinator_claims_from_the_last_shard_and_the_workers_from_the_first(url: str) -> None:
    job_id = running_job_with_shards(url, 5)
    order = [
        claim_next(url, job_id, "coordinator", last_first=True),
        claim_next(url, job_id, "worker", last_first=False),
        claim_next(url, job_id, "coordinator", last_first=True),
        claim_next(url, job_id, "worker", last_first=False),
        claim_next(url, job_id, "coordinator", last_first=True),
    ]
    assert order == [4, 0, 3, 1, 2]
    assert claim_next(url, job_id, "worker", last_first=False) is None  # every shard runs under a live worker
    assert claim_next(url, job_id, "coordinator", last_first=True) is None
    with session_scope(url) as session:
        rows = {row.shard: row.claimed_by for row in shards_of(session, job_id)}
    assert rows == {0: "worker", 1: "worker", 2: "coordinator", 3: "coordinator", 4: "coordinator"}


def test_a_done_shard_is_skipped_whichever_end_a_claim_starts_from(url: str) -> None:
    job_id = running_job_with_shards(url, 3)
    assert claim_next(url, job_id, "coordinator", last_first=True) == 2
    with session_scope(url) as session:
        finish_shard(session, job_id, 2, 1, "0" * 64)
    assert claim_next(url, job_id, "coordinator", last_first=True) == 1
    assert claim_next(url, job_id, "worker", last_first=False) == 0
