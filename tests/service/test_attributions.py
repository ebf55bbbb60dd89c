"""Attribution jobs through the API: scores, ranked rows, paging, export, fits, editing, cancellation."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from torch import nn

from tests.service.conftest import Api, tiny_classifier, tiny_dataset
from worker.attribution.options import DEFAULT_PROXIMITY_FRACTION, WEIGHT_DECAY_EVIDENCE


def setup_job(api: Api, n_train: int = 30, n_query: int = 4, string_ids: bool = False) -> dict:
    module = tiny_classifier()
    train = tiny_dataset(n_train, seed=1)
    if string_ids:
        train["ids"] = np.array([f"ex-{i}" for i in range(n_train)])
    query = tiny_dataset(n_query, seed=2, ids=np.arange(500, 500 + n_query))
    model_id = api.upload_model(module).json()["id"]
    train_id = api.upload_npz(**train).json()["id"]
    query_id = api.upload_npz(**query).json()["id"]
    return {
        "module": module,
        "train": train,
        "query": query,
        "model_id": model_id,
        "train_dataset_id": train_id,
        "query_dataset_id": query_id,
    }


def submit(api: Api, setup: dict, **overrides) -> dict:
    body = {
        "model_id": setup["model_id"],
        "train_dataset_id": setup["train_dataset_id"],
        "query_dataset_id": setup["query_dataset_id"],
        "method": "gradient_similarity",
        "mode": "pairwise",
        "top_k": 5,
        **overrides,
    }
    body = {k: v for k, v in body.items() if v is not None}
    response = api.client.post("/v1/attributions", json=body)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/jobs/{response.json()['job_id']}"
    return response.json()


def all_rows(api: Api, attribution_id: str, direction: str = "positive", page_size: int = 7) -> list[dict]:
    rows, token = [], None
    while True:
        params = {"direction": direction, "page_size": page_size, **({"page_token": token} if token else {})}
        page = api.client.get(f"/v1/attributions/{attribution_id}/results", params=params).json()
        rows += page["results"]
        token = page["next_page_token"]
        if token is None:
            return rows


def loss_gradients(module: nn.Module, inputs: np.ndarray, targets: np.ndarray) -> torch.Tensor:
    grads = []
    for x, y in zip(inputs, targets, strict=True):
        module.zero_grad()
        loss = nn.functional.cross_entropy(module(torch.tensor(x)[None]), torch.tensor([int(y)]))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
    return torch.stack(grads)


def test_gradient_similarity_scores_equal_gradient_dot_products(api: Api) -> None:
    setup = setup_job(api)
    attribution = submit(api, setup)
    job = api.client.get(f"/v1/jobs/{attribution['job_id']}").json()
    assert job["status"] == "succeeded", job
    assert job["attribution_id"] == attribution["id"]
    assert job["result_url"] == f"/v1/attributions/{attribution['id']}/results"
    train_grads = loss_gradients(setup["module"], setup["train"]["inputs"], setup["train"]["targets"])
    query_grads = loss_gradients(setup["module"], setup["query"]["inputs"], setup["query"]["targets"])
    exact = query_grads @ train_grads.T  # (Q, N)
    for direction in ("positive", "negative"):
        rows = all_rows(api, attribution["id"], direction)
        assert len(rows) == 4 * 5
        for pos, query_id in enumerate(range(500, 504)):
            mine = [r for r in rows if r["query_id"] == query_id]
            assert [r["rank"] for r in mine] == [1, 2, 3, 4, 5]
            order = torch.argsort(exact[pos], descending=direction == "positive")[:5]
            assert [r["train_id"] for r in mine] == order.tolist()
            for row in mine:
                assert row["score"] == pytest.approx(float(exact[pos, row["train_id"]]), rel=1e-4, abs=1e-6)
        assert [r["query_id"] for r in rows] == sorted(r["query_id"] for r in rows)


def test_query_filter_and_string_ids(api: Api) -> None:
    setup = setup_job(api, string_ids=True)
    attribution = submit(api, setup)
    page = api.client.get(
        f"/v1/attributions/{attribution['id']}/results", params={"query_id": 502, "direction": "negative"}
    ).json()
    assert {r["query_id"] for r in page["results"]} == {502}
    assert all(isinstance(r["train_id"], str) and r["train_id"].startswith("ex-") for r in page["results"])
    assert page["results"][0]["score"] <= page["results"][-1]["score"]


def test_aggregate_and_self_modes(api: Api) -> None:
    setup = setup_job(api)
    aggregate = submit(api, setup, mode="aggregate", top_k=3)
    rows = all_rows(api, aggregate["id"])
    assert len(rows) == 3 and all(r["query_id"] is None for r in rows)
    negative = all_rows(api, aggregate["id"], "negative")
    assert rows[0]["score"] >= rows[-1]["score"] >= negative[-1]["score"] >= negative[0]["score"]
    self_attr = submit(api, setup, mode="self", query_dataset_id=None)
    ranked = all_rows(api, self_attr["id"], page_size=100)
    assert len(ranked) == 30
    assert all(r["score"] >= 0 for r in ranked)
    scores = [r["score"] for r in ranked]
    assert scores == sorted(scores, reverse=True)


def test_export_formats_hold_every_row(api: Api) -> None:
    setup = setup_job(api)
    attribution = submit(api, setup, top_k=3)
    expected = {
        (r["query_id"], r["direction"], r["rank"], r["train_id"])
        for d in ("positive", "negative")
        for r in all_rows(api, attribution["id"], d)
    }
    url = f"/v1/attributions/{attribution['id']}/results/export"
    text = api.client.get(url, params={"format": "csv"}).text
    from_csv = {
        (int(r["query_id"]), r["direction"], int(r["rank"]), int(r["train_id"]))
        for r in csv.DictReader(io.StringIO(text))
    }
    assert from_csv == expected
    lines = api.client.get(url, params={"format": "ndjson"}).text.strip().splitlines()
    from_ndjson = {(r["query_id"], r["direction"], r["rank"], r["train_id"]) for r in map(json.loads, lines)}
    assert from_ndjson == expected
    table = pq.read_table(io.BytesIO(api.client.get(url, params={"format": "parquet"}).content)).to_pylist()
    assert {(r["query_id"], r["direction"], r["rank"], r["train_id"]) for r in table} == expected


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"options": {"dampingg": 0.1}}, "options"),
        ({"method": "influence", "options": {"damping": -1}}, "damping"),
        ({"mode": "self"}, "query_dataset_id"),
        ({"measurement": "margin", "train_dataset_id": "ds_missing"}, None),
        ({"top_k": 0}, "top_k"),
        ({"method": "source"}, "model_id"),
        ({"method": "meta_task_influence"}, "dataset"),
    ],
)
def test_bad_attribution_requests_are_4xx(api: Api, overrides: dict, field: str | None) -> None:
    setup = setup_job(api)
    body = {
        "model_id": setup["model_id"],
        "train_dataset_id": setup["train_dataset_id"],
        "query_dataset_id": setup["query_dataset_id"],
        "method": "gradient_similarity",
        **overrides,
    }
    response = api.client.post("/v1/attributions", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    if field:
        assert field in json.dumps(response.json())
    assert api.queue.enqueued == []


def test_inputs_that_do_not_fit_the_model_are_422(api: Api) -> None:
    setup = setup_job(api)
    wide = api.upload_npz(inputs=np.zeros((5, 7), np.float32), targets=np.zeros(5, np.int64)).json()["id"]
    response = api.client.post(
        "/v1/attributions",
        json={"model_id": setup["model_id"], "train_dataset_id": wide, "query_dataset_id": setup["query_dataset_id"]},
    )
    assert response.status_code == 422
    assert "do not fit" in response.json()["detail"]


def test_targets_out_of_range_fail_the_job_with_a_clear_error(api: Api) -> None:
    setup = setup_job(api)
    bad = tiny_dataset(10, seed=3)
    bad["targets"][4] = 7
    bad_id = api.upload_npz(**bad).json()["id"]
    attribution = submit(api, setup, train_dataset_id=bad_id)
    job = api.client.get(f"/v1/jobs/{attribution['job_id']}").json()
    assert job["status"] == "failed"
    assert job["error"]["status"] == 422 and job["error"]["detail"]
    assert api.client.get(f"/v1/attributions/{attribution['id']}/results").status_code == 409


def test_cancel_a_queued_job(api: Api) -> None:
    setup = setup_job(api)
    api.queue.paused = True
    attribution = submit(api, setup)
    cancelled = api.client.post(f"/v1/jobs/{attribution['job_id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    from worker.runner import run_job

    run_job(attribution["job_id"], api.settings)  # the message arrives late: nothing runs
    assert api.client.get(f"/v1/jobs/{attribution['job_id']}").json()["status"] == "cancelled"
    assert api.client.post(f"/v1/jobs/{attribution['job_id']}/cancel").status_code == 409


def test_idempotency_key_replays_the_first_response(api: Api) -> None:
    setup = setup_job(api)
    body = {
        "model_id": setup["model_id"],
        "train_dataset_id": setup["train_dataset_id"],
        "query_dataset_id": setup["query_dataset_id"],
        "method": "gradient_similarity",
    }
    first = api.client.post("/v1/attributions", json=body, headers={"Idempotency-Key": "abc"})
    second = api.client.post("/v1/attributions", json=body, headers={"Idempotency-Key": "abc"})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert len(api.queue.enqueued) == 1
    changed = api.client.post("/v1/attributions", json={**body, "top_k": 3}, headers={"Idempotency-Key": "abc"})
    assert changed.status_code == 422


def test_fit_then_influence_with_fit_id_then_edit(api: Api) -> None:
    setup = setup_job(api)
    response = api.client.post(
        "/v1/fits",
        json={
            "model_id": setup["model_id"],
            "dataset_id": setup["train_dataset_id"],
            "strategy": "ekfac",
            "fisher": "empirical",
        },
    )
    assert response.status_code == 202, response.text
    fit = response.json()
    assert api.client.get(f"/v1/jobs/{fit['job_id']}").json()["status"] == "succeeded"
    assert api.client.get(f"/v1/fits/{fit['id']}").json()["status"] == "succeeded"
    mismatch = api.client.post(
        "/v1/attributions",
        json={
            "model_id": setup["model_id"],
            "train_dataset_id": setup["train_dataset_id"],
            "query_dataset_id": setup["query_dataset_id"],
            "method": "influence",
            "fit_id": fit["id"],
            "options": {"fisher": "true"},
        },
    )
    assert mismatch.status_code == 422 and "fisher" in mismatch.json()["detail"]
    with_fit = submit(api, setup, method="influence", fit_id=fit["id"])
    fresh = submit(api, setup, method="influence", options={"fisher": "empirical"})
    a = all_rows(api, with_fit["id"])
    b = all_rows(api, fresh["id"])
    assert [r["train_id"] for r in a] == [r["train_id"] for r in b]
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], rel=1e-5)
    edited = api.client.post(f"/v1/attributions/{with_fit['id']}/edit", json={"remove": [0, 3, 5], "name": "minus3"})
    assert edited.status_code == 202, edited.text
    accepted = edited.json()
    assert edited.headers["location"] == f"/v1/jobs/{accepted['job_id']}"
    job = api.client.get(f"/v1/jobs/{accepted['job_id']}").json()
    assert (job["kind"], job["status"], job["model_id"]) == ("edit", "succeeded", accepted["model_id"])
    assert job["result_url"] == f"/v1/models/{accepted['model_id']}"
    new_model = api.client.get(f"/v1/models/{accepted['model_id']}").json()
    assert new_model["source_attribution_id"] == with_fit["id"]
    diagnostics = new_model["edit_diagnostics"]
    assert diagnostics["estimator"] == "newton" and diagnostics["num_removed"] == 3
    # auto: a classifier of linear layers only gains little from stored products
    assert (
        diagnostics["curvature"]["products"] == "matrix_free" and "linear layers" in diagnostics["curvature"]["reason"]
    )
    assert diagnostics["remaining_loss_after"] <= diagnostics["remaining_loss_before"] * 1.1
    # what the model had learned about the rows it keeps (their loss below the class frequencies'), and the share
    # of it the edit gave back: both reach the client
    constant, before = diagnostics["remaining_loss_constant"], diagnostics["remaining_loss_before"]
    assert constant > before and diagnostics["learned_given_back"] == pytest.approx(
        (diagnostics["remaining_loss_after"] - before) / (constant - before)
    )
    solver = diagnostics["solver"]  # the default boundary line search: the edge found, and the share of it taken
    assert solver["line_search_step"] == pytest.approx(min(1.0, 0.85 * solver["line_search_boundary"]))
    # auto newton_steps: one step where the products are matrix-free (a second would cost as much as the first)
    assert solver["steps"] == 1 and solver["further_step_scales"] == []
    assert len(diagnostics["query_loss_changes"]) == len(setup["query"]["targets"]) and "warnings" in diagnostics
    weights = load_safetensors(api.client.get(f"/v1/models/{new_model['id']}/weights").content)
    original = setup["module"].state_dict()
    assert set(weights) == set(original)
    assert any(not torch.equal(weights[k], original[k]) for k in original)
    unknown = api.client.post(f"/v1/attributions/{with_fit['id']}/edit", json={"remove": [9999], "name": "x"})
    assert unknown.status_code == 422
    # the default λ's scale (trace(G)/D over every training row) is the attribution's: a second edit reuses it
    scale = diagnostics["curvature_scale"]
    assert scale["mean_eigenvalue"] > 0 and diagnostics["proximity"] == pytest.approx(
        DEFAULT_PROXIMITY_FRACTION * scale["mean_eigenvalue"]
    )
    assert "earlier edit" not in diagnostics["proximity_rule"]
    # the L2 penalty the model's gradient shows reaches the client: this model shows none, so λ is the curvature's
    assert -1.0 <= diagnostics["implied_weight_decay_cosine"] < WEIGHT_DECAY_EVIDENCE
    assert isinstance(diagnostics["implied_weight_decay"], float)
    second = api.client.post(f"/v1/attributions/{with_fit['id']}/edit", json={"remove": [1, 2], "name": "minus2"})
    again = api.client.get(f"/v1/models/{second.json()['model_id']}").json()["edit_diagnostics"]
    assert again["curvature_scale"] == scale and again["proximity"] == diagnostics["proximity"]
    assert "computed by an earlier edit of this model" in again["proximity_rule"]
    other = api.client.post(f"/v1/attributions/{fresh['id']}/edit", json={"remove": [1, 2], "name": "other"})
    own = api.client.get(f"/v1/models/{other.json()['model_id']}").json()["edit_diagnostics"]
    assert "earlier edit" not in own["proximity_rule"]  # another attribution computes its own


POOLING_CNN = {
    "type": "sequential",
    "layers": [
        {"type": "conv2d", "in_channels": 1, "out_channels": 4, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "in_features": 36, "out_features": 3},
    ],
}


def test_edit_of_a_pooling_cnn_is_the_engines(sqlite_api: Api) -> None:
    """A spec CNN with max-pooling edited through the API (its forward-only passes pool channels-last:
    ``pooling_layout``): the rows of its curvature are stored, and the weights served are those of the engine's
    edit of the same model and rows, for the default reduction (the kept rows' mean loss) and for ``sum``, which
    the diagnostics name and which give different weights."""
    from worker.attribution import EditOptions, Examples, edit_parameters

    api = sqlite_api
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 3))
    rng = np.random.default_rng(3)
    train = {"inputs": rng.normal(size=(40, 1, 6, 6)).astype(np.float32), "targets": rng.integers(0, 3, size=40)}
    query = {"inputs": rng.normal(size=(3, 1, 6, 6)).astype(np.float32), "targets": rng.integers(0, 3, size=3)}
    optimizer = torch.optim.Adam(module.parameters(), lr=0.02, weight_decay=1e-3)
    for _ in range(150):  # trained, as a model a user edits is
        optimizer.zero_grad()
        F.cross_entropy(module(torch.from_numpy(train["inputs"])), torch.from_numpy(train["targets"])).backward()
        optimizer.step()
    uploaded = api.upload_model(module, architecture=POOLING_CNN)
    assert uploaded.status_code == 201, uploaded.text
    setup = {
        "model_id": uploaded.json()["id"],
        "train_dataset_id": api.upload_npz(**train).json()["id"],
        "query_dataset_id": api.upload_npz(**query).json()["id"],
    }
    attribution = submit(api, setup, method="influence")
    examples = Examples(torch.from_numpy(train["inputs"]), torch.from_numpy(train["targets"]))
    served_edits = []
    for reduction in ("mean", "sum"):  # the default; each row keeping its weight
        request: dict[str, Any] = {"remove": [2, 7, 11], "name": f"cnn-{reduction}"}
        if reduction != "mean":
            request["options"] = {"reduction": reduction}
        edited = api.client.post(f"/v1/attributions/{attribution['id']}/edit", json=request)
        assert edited.status_code == 202, edited.text
        model_id = edited.json()["model_id"]
        diagnostics = api.client.get(f"/v1/models/{model_id}").json()["edit_diagnostics"]
        assert diagnostics["curvature"]["products"] == "stored" and diagnostics["warnings"] == []
        assert diagnostics["reduction"] == reduction
        served = load_safetensors(api.client.get(f"/v1/models/{model_id}/weights").content)
        engine = edit_parameters(
            module,
            examples,
            torch.tensor([2, 7, 11]),
            loss="cross_entropy",
            method="influence",
            edit=EditOptions(reduction=reduction),  # type: ignore[arg-type]
        )
        assert set(served) == set(engine.state)
        for key, value in engine.state.items():
            assert torch.allclose(served[key], value, rtol=1e-5, atol=1e-7), key
        assert any(not torch.equal(served[key], value) for key, value in module.state_dict().items())
        served_edits.append(served)
    assert any(not torch.allclose(served_edits[0][key], value) for key, value in served_edits[1].items())


def test_edit_is_a_job_the_model_exists_once_it_succeeds(sqlite_api: Api) -> None:
    from worker.runner import run_job

    api = sqlite_api
    setup = setup_job(api)
    attribution = submit(api, setup, method="influence", options={"strategy": "kfac"})
    api.queue.paused = True
    route = f"/v1/attributions/{attribution['id']}/edit"
    body = {
        "remove": [1, 2],
        "name": "minus2",
        "options": {
            "estimator": "proximal",
            "max_steps": 3,
            "curvature_products": "stored",
            "curvature_tol": 0,
            "line_search": "halving",
            "preconditioner": "kronecker",
        },
    }
    first = api.client.post(route, json=body, headers={"Idempotency-Key": "edit-1"})
    again = api.client.post(route, json=body, headers={"Idempotency-Key": "edit-1"})
    assert first.status_code == again.status_code == 202 and first.json() == again.json()
    accepted = first.json()
    assert api.queue.enqueued.count(accepted["job_id"]) == 1
    queued = api.client.get(f"/v1/jobs/{accepted['job_id']}").json()
    assert (queued["kind"], queued["status"], queued["model_id"]) == ("edit", "queued", accepted["model_id"])
    assert api.client.get(f"/v1/models/{accepted['model_id']}").status_code == 404
    run_job(accepted["job_id"], api.settings)
    assert api.client.get(f"/v1/jobs/{accepted['job_id']}").json()["status"] == "succeeded"
    model = api.client.get(f"/v1/models/{accepted['model_id']}").json()
    assert model["name"] == "minus2" and model["edit_diagnostics"]["estimator"] == "proximal"
    curvature = model["edit_diagnostics"]["curvature"]
    assert (curvature["products"], curvature["left_out_share"]) == ("stored", 0.0)
    assert curvature["preconditioner"] == "kronecker"
    assert model["edit_diagnostics"]["solver"]["line_search_boundary"] is None  # halving looks for no edge
    assert curvature["stored_terms"] == curvature["candidate_terms"]
    listed = {m["id"]: m for m in api.client.get("/v1/models").json()["models"]}
    assert listed[accepted["model_id"]]["edit_diagnostics"] == model["edit_diagnostics"]

    cancelled = api.client.post(route, json={"remove": [3], "name": "never"}).json()
    assert api.client.post(f"/v1/jobs/{cancelled['job_id']}/cancel").json()["status"] == "cancelled"
    run_job(cancelled["job_id"], api.settings)
    assert api.client.get(f"/v1/models/{cancelled['model_id']}").status_code == 404

    for bad, field in (
        ({"remove": [], "name": "x"}, "remove"),
        ({"remove": [1], "name": "x", "options": {"proximity": -1}}, "proximity"),
        ({"remove": [1], "name": "x", "options": {"estimator": "retrain"}}, "estimator"),
        ({"remove": [1], "name": "x", "options": {"steps": 3}}, "steps"),
        ({"remove": [1], "name": "x", "options": {"curvature_products": "dense"}}, "curvature_products"),
        ({"remove": [1], "name": "x", "options": {"curvature_tol": 1}}, "curvature_tol"),
        ({"remove": [1], "name": "x", "options": {"line_search": "exact"}}, "line_search"),
        ({"remove": [1], "name": "x", "options": {"boundary_share": 1.5}}, "boundary_share"),
        ({"remove": [1], "name": "x", "options": {"boundary_share": 0}}, "boundary_share"),
        ({"remove": [1], "name": "x", "options": {"preconditioner": "jacobi"}}, "preconditioner"),
        ({"remove": [1], "name": "x", "options": {"newton_steps": 0}}, "newton_steps"),
        ({"remove": [1], "name": "x", "options": {"newton_steps": 1.5}}, "newton_steps"),
    ):
        response = api.client.post(route, json=bad)
        assert response.status_code == 422 and field in response.text, (bad, response.text)
