"""The merge of a sharded job runs on a worker of the ``cpu`` queue when its coordinator's worker consumes only
``gpu`` (PostgreSQL in a private schema, a private redis-server, `attrib worker` subprocesses, as
tests/service/test_job_faults.py).

With only a ``gpu`` worker running, a sharded fit (EK-FAC: both phases) computes every shard and then waits with
its merge message in the ``cpu`` queue (the coordinator would merge itself only after
``ATTRIB_MERGE_HANDOFF_SECONDS``, set far beyond the test); a worker started with ``--queues cpu`` takes the
message and the job succeeds with the fit of an unsharded run. A sharded attribution then runs the same way.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from sqlalchemy import select

from service.db.session import session_scope
from service.db.tables import Fit, JobShard
from tests.service.conftest import tiny_classifier, tiny_dataset
from tests.service.test_job_faults import FaultEnv, faults, wait_job
from tests.service.test_sharded_jobs import N_TRAIN, upload
from worker.attribution import Examples, fit_curvature
from worker.attribution.options import FitOptions
from worker.loading import load_curvatures
from worker.runner import store_for

__all__ = ["faults"]

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

ENV = {"ATTRIB_SHARD_EXAMPLES": "16", "ATTRIB_MERGE_HANDOFF_SECONDS": "600"}


def wait_for(what: Any, seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    while not (found := what()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)
    return found


def test_a_merge_runs_on_a_worker_that_only_consumes_the_cpu_queue(faults: FaultEnv) -> None:
    with faults.api() as api:
        model = api.upload_model(tiny_classifier()).json()["id"]
        arrays = tiny_dataset(N_TRAIN, seed=1)
        train = upload(api, arrays)
        faults.start_worker("--queues", "gpu", **ENV)
        response = api.client.post(
            "/v1/fits", json={"model_id": model, "dataset_id": train, "strategy": "ekfac", "batch_size": 8}
        )
        assert response.status_code == 202, response.text
        fit = response.json()

        def shards_done_and_merge_queued() -> bool:
            with session_scope(faults.database_url) as session:
                rows = list(session.scalars(select(JobShard).where(JobShard.job_id == fit["job_id"])))
            return len(rows) == 6 and all(row.status == "done" for row in rows) and api.queue.backlogs()["cpu"] == 1

        wait_for(shards_done_and_merge_queued, 120)
        assert faults.row(fit["job_id"]).status == "running"
        faults.start_worker("--queues", "cpu", **ENV)
        assert wait_job(api, fit["job_id"], 60)["status"] == "succeeded"
        assert api.queue.backlogs()["cpu"] == 0

        with session_scope(faults.database_url) as session:
            sha256 = session.get_one(Fit, fit["id"]).artifact_sha256
        assert sha256 is not None
        stored = load_curvatures(store_for(api.settings), sha256)["model"].to_tensors()
        train_examples = Examples(
            inputs=torch.from_numpy(arrays["inputs"]), targets=torch.from_numpy(arrays["targets"]).long()
        )
        reference = fit_curvature(
            tiny_classifier(),
            train_examples,
            "cross_entropy",
            FitOptions(strategy="ekfac", batch_size=8),
        ).to_tensors()
        for key, value in stored.items():
            if "eigenvectors" in key:
                torch.testing.assert_close(value.abs(), reference[key].abs(), rtol=1e-6, atol=1e-9)
            else:
                torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-12)

        query = upload(api, tiny_dataset(5, seed=2))
        body = {"model_id": model, "train_dataset_id": train, "query_dataset_id": query, "method": "influence"}
        response = api.client.post("/v1/attributions", json={**body, "options": {"strategy": "kfac"}, "top_k": 3})
        assert response.status_code == 202, response.text
        attribution = response.json()
        assert wait_job(api, attribution["job_id"], 120)["status"] == "succeeded"
        assert api.client.get(f"/v1/attributions/{attribution['id']}").json()["num_results"] == 2 * 5 * 3
