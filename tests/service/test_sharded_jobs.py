"""Sharded attribution jobs through the real job runner, on SQLite and PostgreSQL: the result rows equal those
of the same job unsharded (several shard sizes, an uneven last shard, every mode and factor strategy), a
second merge writes nothing, and a job resumes from the shards an earlier attempt finished."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import delete, select

from service.db.session import session_scope
from service.db.tables import AttributionQuery, Job, JobShard, ResultChunk
from service.liveness import LivenessPolicy, Superseded
from service.results import all_results
from tests.service.conftest import Api, build_api, tiny_classifier, tiny_dataset
from worker.context import JobContext
from worker.runner import store_for
from worker.tasks.attribution import load_request
from worker.tasks.options import method_of
from worker.tasks.sharded import ShardWork, merge_and_save

N_TRAIN = 45


def upload(api: Api, arrays: dict[str, np.ndarray]) -> str:
    return str(api.upload_npz(inputs=arrays["inputs"], targets=arrays["targets"]).json()["id"])


def run_attribution(api: Api, mode: str = "pairwise", strategy: str = "ekfac") -> dict[str, Any]:
    model = api.upload_model(tiny_classifier()).json()["id"]
    train = upload(api, tiny_dataset(N_TRAIN, seed=1))
    body: dict[str, Any] = {
        "model_id": model,
        "train_dataset_id": train,
        "method": "influence",
        "mode": mode,
        "top_k": 4,
        "options": {"strategy": strategy, "batch_size": 8},
    }
    if mode != "self":
        body["query_dataset_id"] = upload(api, tiny_dataset(5, seed=2))
    response = api.client.post("/v1/attributions", json=body)
    assert response.status_code == 202, response.text
    attribution: dict[str, Any] = response.json()
    job = api.client.get(f"/v1/jobs/{attribution['job_id']}").json()
    assert job["status"] == "succeeded", job
    return attribution


def result_rows(api: Api, attribution_id: str) -> list[tuple[Any, ...]]:
    with session_scope(api.settings.resolved_database_url) as session:
        rows = [
            (row.direction, row.query_pos, row.rank, row.query_id, row.train_id, row.score)
            for row in all_results(session, attribution_id)
        ]
        return sorted(rows, key=lambda row: (row[0], row[1], row[2]))


def assert_same_rows(sharded: list[tuple[Any, ...]], reference: list[tuple[Any, ...]]) -> None:
    assert [row[:5] for row in sharded] == [row[:5] for row in reference]
    assert sharded and all(
        abs(a[5] - b[5]) <= 1e-5 * max(1.0, abs(b[5])) for a, b in zip(sharded, reference, strict=True)
    )


def shard_count(api: Api, job_id: str) -> int:
    """The job's scoring shards (not those of a fit it made for itself in shards)."""
    with session_scope(api.settings.resolved_database_url) as session:
        rows = session.scalars(select(JobShard).where(JobShard.job_id == job_id))
        return sum(1 for row in rows if row.prepared.get("job") is None)


@pytest.mark.parametrize(
    ("mode", "strategy"),
    [("pairwise", "ekfac"), ("pairwise", "kfac"), ("aggregate", "diagonal"), ("self", "identity"), ("self", "ekfac")],
)
def test_sharded_rows_equal_unsharded_rows(tmp_path: Path, backend: str | None, mode: str, strategy: str) -> None:
    expected: list[tuple[Any, ...]] | None = None
    for shard_examples in (0, 45, 16, 7):  # 0: unsharded; 45: one task (the set fits a shard); 16, 7: uneven last
        folder = tmp_path / f"s{shard_examples}"
        folder.mkdir()
        for api in build_api(folder, backend, shard_examples=shard_examples):
            attribution = run_attribution(api, mode, strategy)
            rows = result_rows(api, attribution["id"])
            shards = shard_count(api, attribution["job_id"])
            assert shards == (0 if shard_examples in (0, 45) else -(-N_TRAIN // shard_examples))
            if expected is None:
                expected = rows
            else:
                assert_same_rows(rows, expected)
            stored = api.client.get(f"/v1/attributions/{attribution['id']}").json()
            assert stored["status"] == "succeeded", stored


def test_a_second_merge_writes_nothing(tmp_path: Path, backend: str | None) -> None:
    for api in build_api(tmp_path, backend, shard_examples=10):
        attribution = run_attribution(api)
        before = result_rows(api, attribution["id"])
        url = api.settings.resolved_database_url
        with session_scope(url) as session:
            job = session.get(Job, attribution["job_id"])
            assert job is not None
            attempt = job.attempts
            prepared = next(  # a scoring shard's (the job's own fit, in shards, has rows of its own first)
                p for p in session.scalars(select(JobShard.prepared).where(JobShard.job_id == job.id)) if "job" not in p
            )
        assert prepared is not None
        context = JobContext(
            job_id=attribution["job_id"],
            database_url=url,
            store=store_for(api.settings),
            attempt=attempt,
            policy=LivenessPolicy.from_settings(api.settings),
            shard_examples=10,
        )
        request = load_request(context)
        work = ShardWork.load(context.store, request, prepared)
        with pytest.raises(Superseded):
            merge_and_save(context, request, method_of("influence"), work)
        assert result_rows(api, attribution["id"]) == before


def test_a_job_resumes_from_the_shards_an_earlier_attempt_finished(tmp_path: Path, backend: str | None) -> None:
    """The job's first attempt is stopped after two scoring shards (as if its worker died); the second attempt
    keeps them (and the shards of its fit), scores the rest, and the rows equal those of an uninterrupted run."""
    for api in build_api(tmp_path, backend, shard_examples=10):
        reference = run_attribution(api)
        expected = result_rows(api, reference["id"])
        url = api.settings.resolved_database_url
        with session_scope(url) as session:
            job = session.get(Job, reference["job_id"])
            assert job is not None
            # replay: the job is running again under a new attempt, with only scoring shards 0 and 1 done
            job.status, job.finished_at = "running", None
            rows = list(session.scalars(select(JobShard).where(JobShard.job_id == job.id)))
            first = min(s.shard for s in rows if "job" not in s.prepared)  # after the 6 rows of its EK-FAC fit
            assert first == 6
            for shard in (s for s in rows if s.shard >= first + 2):
                shard.status, shard.output_sha256, shard.attempts = "queued", None, 0
            done = {
                s.shard: s.output_sha256 for s in session.scalars(select(JobShard).where(JobShard.job_id == job.id))
            }
            session.execute(delete(ResultChunk).where(ResultChunk.attribution_id == reference["id"]))
            session.execute(delete(AttributionQuery).where(AttributionQuery.attribution_id == reference["id"]))
            attempt = job.attempts
        context = JobContext(
            job_id=reference["job_id"],
            database_url=url,
            store=store_for(api.settings),
            attempt=attempt,
            policy=LivenessPolicy.from_settings(api.settings),
            shard_examples=10,
        )
        from worker.tasks.attribution import run_attribution as run_task

        run_task(context)
        with session_scope(url) as session:
            after = {
                s.shard: (s.output_sha256, s.attempts)
                for s in session.scalars(select(JobShard).where(JobShard.job_id == reference["job_id"]))
            }
            job = session.get(Job, reference["job_id"])
            assert job is not None and job.status == "succeeded"
        assert all(after[s][0] == done[s] for s in range(first + 2))  # kept, not run again
        assert all(after[shard][1] == 1 for shard in range(first + 2, first + 5))
        assert_same_rows(result_rows(api, reference["id"]), expected)


@pytest.mark.parametrize(("mode", "normalize"), [("pairwise", True), ("aggregate", False), ("self", False)])
def test_sharded_gradient_similarity_equals_unsharded(tmp_path: Path, mode: str, normalize: bool) -> None:
    """On SQLite only: the rows' storage is the same as for `influence` (tested on both databases above)."""
    rows = {}
    for shard_examples in (0, 16):
        folder = tmp_path / f"s{shard_examples}"
        folder.mkdir()
        for api in build_api(folder, None, shard_examples=shard_examples):
            model = api.upload_model(tiny_classifier()).json()["id"]
            body: dict[str, Any] = {
                "model_id": model,
                "train_dataset_id": upload(api, tiny_dataset(N_TRAIN, seed=1)),
                "method": "gradient_similarity",
                "mode": mode,
                "top_k": 4,
                "options": {"normalize": normalize, "batch_size": 8},
            }
            if mode != "self":
                body["query_dataset_id"] = upload(api, tiny_dataset(5, seed=2))
            response = api.client.post("/v1/attributions", json=body)
            assert response.status_code == 202, response.text
            attribution = response.json()
            assert api.client.get(f"/v1/jobs/{attribution['job_id']}").json()["status"] == "succeeded"
            assert shard_count(api, attribution["job_id"]) == (3 if shard_examples else 0)
            rows[shard_examples] = result_rows(api, attribution["id"])
    assert_same_rows(rows[16], rows[0])
