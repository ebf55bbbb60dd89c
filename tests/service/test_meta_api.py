"""Meta-learning influence through the API: task and instance rankings, editing, bad meta-datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.service.conftest import Api
from tests.service.test_attributions import all_rows

SINE_ARCHITECTURE = {
    "type": "sequential",
    "layers": [
        {"type": "linear", "in_features": 1, "out_features": 8},
        {"type": "tanh"},
        {"type": "linear", "in_features": 8, "out_features": 1},
    ],
}
INNER = {"mode": "implicit_proximal", "reg": 10.0, "ihvp": "dense", "tol": 1e-8, "max_iter": 200}


def sine_tasks(num_tasks: int, seed: int, per_split: int = 6, first_task: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs, targets, task, split = [], [], [], []
    for t in range(num_tasks):
        amplitude, phase = rng.uniform(0.5, 1.5), rng.uniform(0, np.pi)
        for s in (0, 1):
            x = rng.uniform(-3, 3, size=(per_split, 1))
            inputs.append(x)
            targets.append(amplitude * np.sin(x + phase))
            task += [first_task + t] * per_split
            split += [s] * per_split
    return {
        "inputs": np.concatenate(inputs).astype(np.float32),
        "targets": np.concatenate(targets).astype(np.float32),
        "task": np.array(task, dtype=np.int64),
        "split": np.array(split, dtype=np.int64),
    }


def sine_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))


@pytest.fixture
def meta_setup(sqlite_api: Api) -> dict:
    api = sqlite_api
    model_id = api.upload_model(sine_model(), SINE_ARCHITECTURE, loss="mse").json()["id"]
    train = sine_tasks(5, seed=1)
    train_id = api.upload_npz(**train).json()["id"]
    query_id = api.upload_npz(**sine_tasks(2, seed=2, first_task=100)).json()["id"]
    return {
        "api": api,
        "model_id": model_id,
        "train_dataset_id": train_id,
        "query_dataset_id": query_id,
        "train": train,
    }


def submit_meta(setup: dict, method: str, mode: str, **options) -> dict:
    api = setup["api"]
    response = api.client.post(
        "/v1/attributions",
        json={
            "model_id": setup["model_id"],
            "train_dataset_id": setup["train_dataset_id"],
            "query_dataset_id": setup["query_dataset_id"],
            "method": method,
            "mode": mode,
            "top_k": 5,
            "options": {"inner": INNER, "solver": "exact", "outer_l2": 0.05, **options},
        },
    )
    assert response.status_code == 202, response.text
    job = api.client.get(f"/v1/jobs/{response.json()['job_id']}").json()
    assert job["status"] == "succeeded", job.get("error")
    return response.json()


def test_task_influence_ranks_every_task(meta_setup: dict) -> None:
    api = meta_setup["api"]
    attribution = submit_meta(meta_setup, "meta_task_influence", "aggregate")
    positive = all_rows(api, attribution["id"])
    negative = all_rows(api, attribution["id"], "negative")
    assert sorted(r["train_id"] for r in positive) == [0, 1, 2, 3, 4]
    assert [r["train_id"] for r in negative] == [r["train_id"] for r in reversed(positive)]
    details = api.client.get(f"/v1/attributions/{attribution['id']}").json()
    assert details["diagnostics"]
    pairwise = submit_meta(meta_setup, "meta_task_influence", "pairwise")
    rows = all_rows(api, pairwise["id"], page_size=100)
    assert {r["query_id"] for r in rows} == {100, 101}


def test_task_influence_with_the_ekfac_inner_inverse_and_matrix_free_solver(meta_setup: dict) -> None:
    api = meta_setup["api"]
    attribution = submit_meta(
        meta_setup, "meta_task_influence", "aggregate", inner={**INNER, "ihvp": "ekfac"}, solver="cg", damping=10.0
    )
    rows = all_rows(api, attribution["id"])
    assert sorted(r["train_id"] for r in rows) == [0, 1, 2, 3, 4]
    assert all(np.isfinite(r["score"]) for r in rows)


def test_instance_influence_rows_carry_task_and_split(meta_setup: dict) -> None:
    api = meta_setup["api"]
    attribution = submit_meta(meta_setup, "meta_instance_influence", "aggregate")
    rows = all_rows(api, attribution["id"])
    assert len(rows) == 5
    train = meta_setup["train"]
    for row in rows:
        assert row["task"] == int(train["task"][row["train_id"]])
        assert row["split"] == int(train["split"][row["train_id"]])


def test_edit_removes_tasks(meta_setup: dict) -> None:
    api = meta_setup["api"]
    attribution = submit_meta(meta_setup, "meta_task_influence", "aggregate")
    response = api.client.post(f"/v1/attributions/{attribution['id']}/edit", json={"remove": [1, 3], "name": "e"})
    assert response.status_code == 202, response.text
    job = api.client.get(f"/v1/jobs/{response.json()['job_id']}").json()
    assert job["kind"] == "edit" and job["status"] == "succeeded", job
    diagnostics = api.client.get(f"/v1/models/{response.json()['model_id']}").json()["edit_diagnostics"]
    assert diagnostics["estimator"] == "newton" and diagnostics["num_removed"] == 2
    assert len(diagnostics["query_loss_changes"]) == 2
    assert (
        api.client.post(f"/v1/attributions/{attribution['id']}/edit", json={"remove": [42], "name": "e"}).status_code
        == 422
    )


def test_newton_removal_ranks_tasks_and_edits(meta_setup: dict) -> None:
    api = meta_setup["api"]
    attribution = submit_meta(meta_setup, "meta_task_influence", "pairwise", removal="newton")
    rows = all_rows(api, attribution["id"], page_size=100)
    assert {r["query_id"] for r in rows} == {100, 101}
    details = api.client.get(f"/v1/attributions/{attribution['id']}").json()
    assert details["diagnostics"]["removal"] == "newton"
    response = api.client.post(f"/v1/attributions/{attribution['id']}/edit", json={"remove": [0, 2], "name": "n"})
    assert response.status_code == 202, response.text
    assert api.client.get(f"/v1/jobs/{response.json()['job_id']}").json()["status"] == "succeeded"


def test_newton_removal_is_refused_where_it_does_not_apply(meta_setup: dict) -> None:
    api = meta_setup["api"]
    base = {
        "model_id": meta_setup["model_id"],
        "train_dataset_id": meta_setup["train_dataset_id"],
        "query_dataset_id": meta_setup["query_dataset_id"],
        "mode": "aggregate",
    }
    for method, options, field in (
        ("meta_instance_influence", {"removal": "newton"}, "removal"),
        ("meta_task_influence", {"removal": "newton", "solver": "neumann"}, "solver"),
    ):
        response = api.client.post("/v1/attributions", json={**base, "method": method, "options": options})
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert field in response.text


def test_meta_methods_need_meta_datasets(meta_setup: dict) -> None:
    api = meta_setup["api"]
    plain = api.upload_npz(inputs=np.zeros((4, 1), np.float32), targets=np.zeros((4, 1), np.float32)).json()["id"]
    response = api.client.post(
        "/v1/attributions",
        json={
            "model_id": meta_setup["model_id"],
            "train_dataset_id": plain,
            "query_dataset_id": meta_setup["query_dataset_id"],
            "method": "meta_task_influence",
            "mode": "aggregate",
        },
    )
    assert response.status_code == 422
    assert "task" in response.json()["detail"]
    unknown_option = api.client.post(
        "/v1/attributions",
        json={
            "model_id": meta_setup["model_id"],
            "train_dataset_id": meta_setup["train_dataset_id"],
            "query_dataset_id": meta_setup["query_dataset_id"],
            "method": "meta_task_influence",
            "mode": "aggregate",
            "options": {"inner": {"mode": "implicit_proximal", "regg": 1}},
        },
    )
    assert unknown_option.status_code == 422


def test_a_task_with_an_empty_split_fails_the_job_clearly(meta_setup: dict) -> None:
    api = meta_setup["api"]
    broken = sine_tasks(3, seed=4)
    keep = ~((broken["task"] == 1) & (broken["split"] == 1))
    broken = {k: v[keep] for k, v in broken.items()}
    broken_id = api.upload_npz(**broken).json()["id"]
    response = api.client.post(
        "/v1/attributions",
        json={
            "model_id": meta_setup["model_id"],
            "train_dataset_id": broken_id,
            "query_dataset_id": meta_setup["query_dataset_id"],
            "method": "meta_task_influence",
            "mode": "aggregate",
            "options": {"inner": INNER, "solver": "exact"},
        },
    )
    job = api.client.get(f"/v1/jobs/{response.json()['job_id']}").json()
    assert job["status"] == "failed"
    assert "1" in job["error"]["detail"] and "split" in job["error"]["detail"]
