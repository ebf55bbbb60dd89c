"""Sharded fit jobs through the API and the real job runner, on SQLite and PostgreSQL: the stored fit equals the
unsharded job's (K-FAC, EK-FAC with its second phase, the diagonal; the float64 statistics to 1e-9 relative, only
the order of float64 additions differs; EK-FAC's corrected eigenvalues to 1e-5: they are summed in the float32
model, and the unsharded job's one-pass fit takes its cached path, whose float32 arithmetic differs in the last
bits) and so do the scores of an attribution that uses it (1e-5 relative); a second merge
writes nothing; a job whose coordinator died between the phases resumes from the rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import delete, select

from service.db.session import session_scope
from service.db.tables import Fit, Job, JobShard
from service.liveness import LivenessPolicy, Superseded
from tests.service.conftest import Api, build_api, tiny_classifier, tiny_dataset
from tests.service.test_sharded_jobs import N_TRAIN, assert_same_rows, result_rows, upload
from worker.context import JobContext
from worker.loading import load_curvatures
from worker.runner import store_for
from worker.tasks.sharded_fit import load_fit_request, merge_fit

SHARD, BATCH = 16, 8  # 45 training examples: shards of 16, 16, 13


def fit_and_attribute(api: Api, strategy: str) -> tuple[dict[str, Any], dict[str, Any]]:
    model = api.upload_model(tiny_classifier()).json()["id"]
    train = upload(api, tiny_dataset(N_TRAIN, seed=1))
    query = upload(api, tiny_dataset(5, seed=2))
    response = api.client.post(
        "/v1/fits", json={"model_id": model, "dataset_id": train, "strategy": strategy, "batch_size": BATCH}
    )
    assert response.status_code == 202, response.text
    fit: dict[str, Any] = response.json()
    assert api.client.get(f"/v1/jobs/{fit['job_id']}").json()["status"] == "succeeded"
    body = {
        "model_id": model,
        "train_dataset_id": train,
        "query_dataset_id": query,
        "method": "influence",
        "fit_id": fit["id"],
        "top_k": 4,
        "options": {"batch_size": BATCH},
    }
    response = api.client.post("/v1/attributions", json=body)
    assert response.status_code == 202, response.text
    attribution: dict[str, Any] = response.json()
    assert api.client.get(f"/v1/jobs/{attribution['job_id']}").json()["status"] == "succeeded"
    return fit, attribution


def stored_fit(api: Api, fit_id: str) -> dict[str, torch.Tensor]:
    with session_scope(api.settings.resolved_database_url) as session:
        sha256 = session.get_one(Fit, fit_id).artifact_sha256
    assert sha256 is not None
    tensors = load_curvatures(store_for(api.settings), sha256)["model"].to_tensors()
    return {key: value for key, value in tensors.items() if "index_" not in key}  # a sharded fit keeps no index


def shard_phases(api: Api, job_id: str) -> list[str]:
    with session_scope(api.settings.resolved_database_url) as session:
        rows = session.scalars(select(JobShard).where(JobShard.job_id == job_id).order_by(JobShard.shard))
        return [str(row.prepared["phase"]) for row in rows]


def context_of(api: Api, job_id: str) -> JobContext:
    with session_scope(api.settings.resolved_database_url) as session:
        attempt = session.get_one(Job, job_id).attempts
    return JobContext(
        job_id=job_id,
        database_url=api.settings.resolved_database_url,
        store=store_for(api.settings),
        attempt=attempt,
        policy=LivenessPolicy.from_settings(api.settings),
        shard_examples=SHARD,
    )


@pytest.mark.parametrize("strategy", ["kfac", "ekfac", "diagonal"])
def test_a_sharded_fit_gives_the_unsharded_fit_and_scores(tmp_path: Path, backend: str | None, strategy: str) -> None:
    results = {}
    for shard_examples in (0, SHARD):
        folder = tmp_path / f"s{shard_examples}"
        folder.mkdir()
        for api in build_api(folder, backend, shard_examples=shard_examples):
            fit, attribution = fit_and_attribute(api, strategy)
            phases = shard_phases(api, fit["job_id"])
            if shard_examples:
                first = "diagonal" if strategy == "diagonal" else "covariances"
                assert phases == [first] * 3 + (["eigenvalues"] * 3 if strategy == "ekfac" else [])
            else:
                assert phases == []
            results[shard_examples] = (stored_fit(api, fit["id"]), result_rows(api, attribution["id"]))
    (sharded, sharded_rows), (reference, reference_rows) = results[SHARD], results[0]
    assert set(sharded) == set(reference)
    for key in reference:
        if "eigenvectors" in key:  # equal up to each column's sign: compared through the scores
            torch.testing.assert_close(sharded[key].abs(), reference[key].abs(), rtol=1e-6, atol=1e-9)
        else:  # float64 sums: 1e-9; EK-FAC's eigenvalues are summed in the model's float32: 1e-5
            rtol = 1e-5 if "corrected_eigenvalues" in key else 1e-9
            torch.testing.assert_close(sharded[key], reference[key], rtol=rtol, atol=1e-12)
    assert_same_rows(sharded_rows, reference_rows)


def test_a_second_fit_merge_writes_nothing(tmp_path: Path, backend: str | None) -> None:
    for api in build_api(tmp_path, backend, shard_examples=SHARD):
        fit, _ = fit_and_attribute(api, "ekfac")
        before = stored_fit(api, fit["id"])
        context = context_of(api, fit["job_id"])
        with pytest.raises(Superseded):
            merge_fit(context, load_fit_request(context))
        after = stored_fit(api, fit["id"])
        assert all(torch.equal(after[key], before[key]) for key in before)


def test_a_fit_resumes_between_its_phases(tmp_path: Path, backend: str | None) -> None:
    """The job's first attempt stopped after phase one (as if its worker died before creating phase two); the
    next attempt keeps phase one's shards, runs phase two, and the fit equals the uninterrupted one."""
    for api in build_api(tmp_path, backend, shard_examples=SHARD):
        fit, _ = fit_and_attribute(api, "ekfac")
        expected = stored_fit(api, fit["id"])
        url = api.settings.resolved_database_url
        with session_scope(url) as session:
            job = session.get_one(Job, fit["job_id"])
            job.status, job.finished_at = "running", None
            session.get_one(Fit, fit["id"]).artifact_sha256 = None
            session.execute(delete(JobShard).where(JobShard.job_id == job.id, JobShard.shard >= 3))
            kept = {
                s.shard: s.output_sha256 for s in session.scalars(select(JobShard).where(JobShard.job_id == job.id))
            }
        from worker.tasks.fit import run_fit

        run_fit(context_of(api, fit["job_id"]))
        with session_scope(url) as session:
            assert session.get_one(Job, fit["job_id"]).status == "succeeded"
            rows = list(session.scalars(select(JobShard).where(JobShard.job_id == fit["job_id"])))
        assert {s.shard: s.output_sha256 for s in rows if s.shard < 3} == kept
        assert sorted(s.shard for s in rows) == list(range(6)) and all(s.status == "done" for s in rows)
        after = stored_fit(api, fit["id"])
        assert all(torch.equal(after[key], expected[key]) for key in expected)
