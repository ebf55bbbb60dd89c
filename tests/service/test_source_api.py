"""SOURCE and TracInCP through the API: checkpoints + stage datasets uploaded, jobs run inline, rows equal the
engine's, editing uses SOURCE's own estimate, bad input is a 4xx before anything is queued."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from tests.service.conftest import Api, tiny_classifier, tiny_dataset
from worker.attribution import Examples
from worker.attribution.methods.source import attribute_source, edit_source
from worker.attribution.methods.tracin import attribute_tracin
from worker.attribution.trajectory import TrajectoryCheckpoint

LR = 0.3


def _examples(arrays: dict[str, np.ndarray]) -> Examples:
    return Examples(inputs=torch.tensor(arrays["inputs"]), targets=torch.tensor(arrays["targets"]).long())


def _train_two_stages(stage0: dict, stage1: dict) -> tuple[nn.Module, list[TrajectoryCheckpoint]]:
    model = tiny_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    checkpoints = []
    for stage, arrays in ((0, stage0), (1, stage1)):
        data = _examples(arrays)
        for step in range(1, 7):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(data.inputs), data.targets).backward()
            optimizer.step()
            if step % 2 == 0:
                checkpoints.append(TrajectoryCheckpoint(copy.deepcopy(model).eval(), 6 * stage + step, LR, 0.0, stage))
    return model.eval(), checkpoints


@pytest.fixture
def trajectory(sqlite_api: Api) -> dict:
    api = sqlite_api
    stage0, stage1 = tiny_dataset(24, seed=1), tiny_dataset(20, seed=3)
    query = tiny_dataset(4, seed=2, ids=np.arange(500, 504))
    final, checkpoints = _train_two_stages(stage0, stage1)
    model_id = api.upload_model(final).json()["id"]
    for c in checkpoints:
        meta = {"step": c.step, "learning_rate": c.learning_rate, "stage": c.stage}
        weights = save_safetensors({k: v.contiguous() for k, v in c.model.state_dict().items()})
        response = api.client.post(
            f"/v1/models/{model_id}/checkpoints",
            data={"metadata": json.dumps(meta)},
            files={"weights": ("w.safetensors", weights)},
        )
        assert response.status_code == 201, response.text
    ids = {
        name: api.upload_npz(**arrays).json()["id"]
        for name, arrays in (("stage0", stage0), ("stage1", stage1), ("query", query))
    }
    return {
        "api": api,
        "final": final,
        "checkpoints": checkpoints,
        "model_id": model_id,
        "ids": ids,
        "stage0": stage0,
        "stage1": stage1,
        "query": query,
    }


def _body(t: dict, method: str, **overrides) -> dict:
    return {
        "model_id": t["model_id"],
        "train_dataset_id": t["ids"]["stage0"],
        "query_dataset_id": t["ids"]["query"],
        "method": method,
        "mode": "pairwise",
        "top_k": 3,
        "measurement": "margin",
        "options": {"stage_datasets": {"0": t["ids"]["stage0"], "1": t["ids"]["stage1"]}},
        **overrides,
    }


def _post(api: Api, body: dict) -> dict:
    response = api.client.post("/v1/attributions", json=body)
    assert response.status_code == 202, response.text
    attribution = response.json()
    job = api.client.get(f"/v1/jobs/{attribution['job_id']}").json()
    assert job["status"] == "succeeded", job
    return api.client.get(f"/v1/attributions/{attribution['id']}").json()


def _rows(api: Api, attribution_id: str, direction: str = "positive") -> list[dict]:
    page = api.client.get(
        f"/v1/attributions/{attribution_id}/results", params={"direction": direction, "page_size": 500}
    ).json()
    assert page["next_page_token"] is None
    return page["results"]


def test_source_pairwise_rows_equal_the_engine_and_edit_uses_its_estimate(trajectory: dict) -> None:
    t, api = trajectory, trajectory["api"]
    attribution = _post(api, _body(t, "source"))
    diagnostics = attribution["diagnostics"]
    assert [s["stage"] for s in diagnostics["segments"]] == [0, 1]  # several stages: one segment per stage
    assert diagnostics["attributed_segments"] == [0] and diagnostics["variant"] == "full"
    assert [s["num_examples"] for s in diagnostics["segments"]] == [24, 20]
    stage_data = {0: _examples(t["stage0"]), 1: _examples(t["stage1"])}
    expected = attribute_source(
        t["final"],
        t["checkpoints"],
        stage_data,
        stage_data[0],
        _examples(t["query"]),
        loss="cross_entropy",
        mode="pairwise",
        measurement="margin",
        top_k=3,
        attributed_stages=[0],
    )
    rows = _rows(api, attribution["id"])
    assert [r["query_id"] for r in rows[:3]] == [500] * 3 and [r["rank"] for r in rows[:3]] == [1, 2, 3]
    assert [r["train_id"] for r in rows] == expected.topk.positive_indices.flatten().tolist()
    assert [r["score"] for r in rows] == pytest.approx(expected.topk.positive_scores.flatten().tolist(), rel=1e-5)

    edited = api.client.post(
        f"/v1/attributions/{attribution['id']}/edit",
        json={"remove": [1, 4], "name": "minus2", "options": {"estimator": "first_order"}},
    )
    assert edited.status_code == 202, edited.text
    assert api.client.get(f"/v1/jobs/{edited.json()['job_id']}").json()["status"] == "succeeded"
    weights = load_safetensors(api.client.get(f"/v1/models/{edited.json()['model_id']}/weights").content)
    estimate = edit_source(
        t["final"],
        t["checkpoints"],
        stage_data,
        stage_data[0],
        torch.tensor([1, 4]),
        loss="cross_entropy",
        attributed_stages=[0],
    )
    for key, value in estimate.items():
        assert torch.allclose(weights[key], value.float(), atol=1e-6), key
    assert any(not torch.equal(weights[k], v) for k, v in t["final"].state_dict().items())
    newton = api.client.post(f"/v1/attributions/{attribution['id']}/edit", json={"remove": [1, 4], "name": "n"})
    assert newton.status_code == 202, newton.text
    model = api.client.get(f"/v1/models/{newton.json()['model_id']}").json()
    assert model["edit_diagnostics"]["estimator"] == "newton"


def test_source_variants_modes_and_tracin(trajectory: dict) -> None:
    t, api = trajectory, trajectory["api"]
    averaged = _post(
        api,
        _body(
            t,
            "source",
            mode="aggregate",
            options={
                "stage_datasets": {"0": t["ids"]["stage0"], "1": t["ids"]["stage1"]},
                "variant": "averaged_parameters",
                "segments": 3,
            },
        ),
    )
    assert averaged["diagnostics"]["variant"] == "averaged_parameters"
    assert len(averaged["diagnostics"]["segments"]) == 4  # 3 equal parts, the middle one cut at the stage change
    assert len(_rows(api, averaged["id"])) == 3 and len(_rows(api, averaged["id"], "negative")) == 3
    self_rows = _rows(api, _post(api, _body(t, "source", mode="self", query_dataset_id=None))["id"])
    assert len(self_rows) == 24 and all(r["score"] > 0 for r in self_rows)

    tracin = _post(api, _body(t, "tracin", mode="aggregate", top_k=30))
    stage0 = [c for c in t["checkpoints"] if c.stage == 0]
    expected = attribute_tracin(
        stage0,
        _examples(t["stage0"]),
        _examples(t["query"]),
        loss="cross_entropy",
        mode="aggregate",
        measurement="margin",
    ).scores
    rows = _rows(api, tracin["id"])
    assert len(rows) == 24
    assert [r["score"] for r in rows] == pytest.approx(sorted(expected.tolist(), reverse=True), rel=1e-5)
    assert [c["step"] for c in tracin["diagnostics"]["checkpoints"]] == [2, 4, 6]
    not_editable = api.client.post(f"/v1/attributions/{tracin['id']}/edit", json={"remove": [1], "name": "x"})
    assert not_editable.status_code in (409, 422)


@pytest.mark.parametrize("method", ["source", "tracin"])
def test_bad_trajectory_requests_are_4xx_before_queueing(trajectory: dict, method: str) -> None:
    t, api = trajectory, trajectory["api"]
    queued = len(api.queue.enqueued)
    ids = t["ids"]

    def rejected(body: dict, status: int, words: str) -> None:
        response = api.client.post("/v1/attributions", json=body)
        assert response.status_code == status, response.text
        assert words in response.json()["detail"], response.json()["detail"]

    bare = api.upload_model(tiny_classifier()).json()["id"]
    rejected({**_body(t, method), "model_id": bare}, 422, "checkpoints")
    rejected(_body(t, method, options={"stage_datasets": {"0": ids["stage0"]}}), 422, "no dataset for stage(s) [1]")
    rejected(_body(t, method, options={"stage_datasets": {"0": ids["stage0"], "1": "ds_missing"}}), 404, "ds_missing")
    rejected(_body(t, method, options={"stages": [7]}), 422, "stage 7 has no checkpoint")
    both = {"0": ids["stage0"], "1": ids["stage1"]}
    rejected(_body(t, method, options={"stage_datasets": both, "stages": [1]}), 422, "another dataset")
    rejected(
        _body(t, method, options={"stage_datasets": {"0": ids["stage1"], "1": ids["stage1"]}}),
        422,
        "no stage to attribute",
    )
    rejected(_body(t, method, options={"damping_typo": 1}), 422, "damping_typo")
    if method == "source":
        rejected(_body(t, method, options={"segments": 99}), 422, "no checkpoint")
        rejected(_body(t, method, options={"segments": 0}), 422, "segments")
    assert len(api.queue.enqueued) == queued


def test_checkpoints_that_do_not_fit_or_lack_a_learning_rate_are_rejected(trajectory: dict) -> None:
    t, api = trajectory, trajectory["api"]
    bad = {k: torch.zeros(3, 3) if k == "0.weight" else v for k, v in t["final"].state_dict().items()}
    response = api.client.post(
        f"/v1/models/{t['model_id']}/checkpoints",
        data={"metadata": json.dumps({"step": 99, "learning_rate": 0.1})},
        files={"weights": ("w", save_safetensors(bad))},
    )
    assert response.status_code == 422
    response = api.client.post(
        f"/v1/models/{t['model_id']}/checkpoints",
        data={"metadata": json.dumps({"step": 98})},
        files={"weights": ("w", save_safetensors(t["final"].state_dict()))},
    )
    assert response.status_code == 422 and "learning_rate" in json.dumps(response.json()["errors"])


def test_adam_trajectories_are_refused_by_source_and_accepted_by_tracin(sqlite_api: Api) -> None:
    api = sqlite_api
    final = tiny_classifier()
    model_id = api.upload_model(final).json()["id"]
    meta = {"step": 5, "learning_rate": 0.001, "optimizer": "adam"}
    response = api.client.post(
        f"/v1/models/{model_id}/checkpoints",
        data={"metadata": json.dumps(meta)},
        files={"weights": ("w", save_safetensors(final.state_dict()))},
    )
    assert response.status_code == 201 and response.json()["optimizer"] == "adam"
    train_id = api.upload_npz(**tiny_dataset(10, seed=1)).json()["id"]
    body = {"model_id": model_id, "train_dataset_id": train_id, "mode": "self", "method": "source"}
    queued = len(api.queue.enqueued)
    refused = api.client.post("/v1/attributions", json=body)
    assert refused.status_code == 422 and "Adam" in refused.json()["detail"]
    assert "appendix C" in refused.json()["detail"] and len(api.queue.enqueued) == queued
    accepted = api.client.post("/v1/attributions", json={**body, "method": "tracin"})
    assert accepted.status_code == 202, accepted.text
