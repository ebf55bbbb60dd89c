"""The OpenAPI document is complete enough for generated clients and people (`service/openapi.py`)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from service.app import create_app
from service.schemas.attributions import AttributionOut
from service.schemas.datasets import DatasetOut
from service.schemas.fits import FitOut
from service.schemas.jobs import JobOut, JobProgress
from service.schemas.models import CheckpointOut, ModelOut
from service.settings import Settings

PLUS_TWO = timezone(timedelta(hours=2))


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data_dir: Path = tmp_path_factory.mktemp("openapi")
    return create_app(Settings(data_dir=data_dir)).openapi()


def operations(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{method.upper()} {path}", op) for path, item in spec["paths"].items() for method, op in item.items()]


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return spec["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else schema


def test_every_operation_has_a_summary_a_description_and_examples(spec: dict[str, Any]) -> None:
    ids = [op["operationId"] for _, op in operations(spec)]
    assert len(ids) == len(set(ids)) and "upload_model" in ids and "export_results" in ids
    for label, op in operations(spec):
        assert op.get("summary") and op.get("description"), label
        for media_type, media in op.get("requestBody", {}).get("content", {}).items():
            assert "example" in media, (label, media_type)
        for parameter in op.get("parameters", []):
            assert "example" in parameter, (label, parameter["name"])
        successes = {status: r for status, r in op["responses"].items() if status.startswith("2")}
        assert successes, label
        for status, response in successes.items():
            for media_type, media in response.get("content", {}).items():
                binary = media.get("schema", {}).get("format") == "binary"
                assert binary or "example" in media, (label, status, media_type)


def test_upload_file_parts_are_binary(spec: dict[str, Any]) -> None:
    expected = {
        "POST /v1/models": [
            "weights",
            "config",
            "weights_index",
            "tokenizer",
            "tokenizer_config",
            "archive",
            "adapter_config",
        ],
        "POST /v1/models/{model_id}/checkpoints": ["weights"],
        "POST /v1/datasets": ["data"],
    }
    found = {}
    for label, op in operations(spec):
        media = op.get("requestBody", {}).get("content", {}).get("multipart/form-data")
        if media is None:
            continue
        parts = resolve(spec, media["schema"])["properties"]
        found[label] = [name for name, part in parts.items() if is_binary(part)]
        assert parts["metadata"]["type"] == "string" and "format" not in parts["metadata"], label
    assert found == expected


def is_binary(part: dict[str, Any]) -> bool:
    """A file part: binary itself, or an optional (`anyOf` with null) or repeated (array `items`) file part."""
    variants = [part, *part.get("anyOf", [])]
    return any(v.get("format") == "binary" or v.get("items", {}).get("format") == "binary" for v in variants)


def test_export_declares_only_the_media_types_it_sends(spec: dict[str, Any]) -> None:
    content = spec["paths"]["/v1/attributions/{attribution_id}/results/export"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"text/csv", "application/x-ndjson", "application/vnd.apache.parquet"}
    weights = spec["paths"]["/v1/models/{model_id}/weights"]["get"]["responses"]["200"]["content"]
    assert set(weights) == {"application/octet-stream"}


def test_accepted_and_created_answers_declare_location(spec: dict[str, Any]) -> None:
    for label, op in operations(spec):
        for status in ("201", "202"):
            if status in op["responses"] and not label.endswith("/checkpoints"):
                header = op["responses"][status]["headers"]["Location"]
                assert header["required"] and header["schema"] == {"type": "string"}, label
    assert {label for label, op in operations(spec) if "202" in op["responses"]} == {
        "POST /v1/fits",
        "POST /v1/attributions",
        "POST /v1/attributions/{attribution_id}/edit",
    }


def test_timestamps_are_declared_as_date_times(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    for name in ("ModelOut", "CheckpointOut", "DatasetOut", "FitOut", "AttributionOut", "JobOut"):
        created = schemas[name]["properties"]["created_at"]
        assert created["type"] == "string" and created["format"] == "date-time", name
        assert created["examples"][0].endswith("Z"), name


def resources(moment: datetime) -> list[BaseModel]:
    """One of each response that carries timestamps, all made at `moment`."""
    job = JobOut(
        id="job_1",
        kind="edit",
        status="succeeded",
        progress=JobProgress(stage="done", completed=1, total=1),
        error=None,
        result_url="/v1/models/mdl_2",
        model_id="mdl_2",
        created_at=moment,
        started_at=moment,
        finished_at=moment,
    )
    return [
        ModelOut(
            id="mdl_2",
            name="edited",
            format="spec",
            num_parameters=1,
            tracked_layers=["0"],
            architecture={},
            task={"loss": "mse"},
            source_attribution_id="attr_1",
            created_at=moment,
        ),
        CheckpointOut(
            id="ckpt_1", model_id="mdl_1", step=1, learning_rate=0.1, momentum=0.0, stage=0, created_at=moment
        ),
        DatasetOut(id="ds_1", name="d", format="npz", num_examples=1, fields={}, created_at=moment),
        FitOut(
            id="fit_1",
            job_id="job_1",
            status="queued",
            model_id="mdl_1",
            dataset_id="ds_1",
            strategy="ekfac",
            damping=None,
            checkpoint_ids=None,
            options={},
            created_at=moment,
        ),
        AttributionOut(
            id="attr_1",
            job_id="job_1",
            status="queued",
            model_ids=["mdl_1"],
            train_dataset_id="ds_1",
            query_dataset_id=None,
            method="influence",
            fit_id=None,
            measurement="loss",
            mode="self",
            top_k=1,
            options={},
            num_results=0,
            results_url="/v1/attributions/attr_1/results",
            created_at=moment,
        ),
        job,
    ]


def test_timestamps_are_rfc3339_utc_with_z_whatever_the_zone_they_were_made_in() -> None:
    moment = datetime(2026, 3, 1, 12, 0, 0, 250_000, tzinfo=PLUS_TWO)
    for resource in resources(moment):
        document = resource.model_dump(mode="json")
        stamps = {name: value for name, value in document.items() if name.endswith("_at") and value is not None}
        assert stamps, type(resource).__name__
        assert set(stamps.values()) == {"2026-03-01T10:00:00.250000Z"}, (type(resource).__name__, stamps)


def test_a_timestamp_without_a_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        DatasetOut(id="ds_1", name="d", format="npz", num_examples=1, fields={}, created_at=datetime(2026, 3, 1))


def test_problem_examples_have_the_status_they_illustrate(spec: dict[str, Any]) -> None:
    checked = 0
    for label, op in operations(spec):
        for status, response in op["responses"].items():
            media = response.get("content", {}).get("application/problem+json")
            if media is not None:
                assert media["example"]["status"] == int(status), (label, status)
                assert media["example"]["type"].startswith("https://attrib.dev/problems/"), (label, status)
                checked += 1
    assert checked > 100, checked
    results = spec["paths"]["/v1/attributions/{attribution_id}/results"]["get"]["responses"]
    assert results["409"]["content"]["application/problem+json"]["example"]["type"].endswith("/results-not-ready")


def test_the_served_document_is_refined_once_and_stays_the_same(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path))
    first = app.openapi()
    assert app.openapi() == first
    with TestClient(app) as client:
        assert client.get("/openapi.json").json() == first
