"""A client generated from the live `/openapi.json` by `openapi-python-client` works with no hand-written glue.

The generator is a real, third-party one: it reads the spec of a running `attrib serve`, writes a package into a
temporary directory, and the test drives the service only through that package's functions and models —
upload a model and two datasets (multipart file parts), submit an influence attribution, poll its job, page the
results with `next_page_token`, export them as CSV, NDJSON and Parquet — checking the values against the plain
HTTP results route.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import subprocess
import sys
import time
import typing
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.torch import save as save_safetensors

from tests.client.conftest import Served
from tests.service.conftest import MLP_ARCHITECTURE, tiny_classifier, tiny_dataset

pytestmark = pytest.mark.e2e

PACKAGE = "attrib_generated_client"
TOP_K = 3
TRAIN_IDS = np.arange(100, 130)
QUERY_IDS = np.array(["q-a", "q-b", "q-c"])
# No post hooks: the generator's default runs `ruff` over the package, which this test does not need.
GENERATOR_CONFIG = f"post_hooks: []\nproject_name_override: {PACKAGE}\npackage_name_override: {PACKAGE}\n"


@pytest.fixture(scope="module")
def generated(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The generated package, imported from a temporary directory."""
    base = tmp_path_factory.mktemp("generated")
    spec = base / "openapi.json"
    spec.write_bytes(httpx.get(f"{served.url}/openapi.json", timeout=30).raise_for_status().content)
    config = base / "config.yaml"
    config.write_text(GENERATOR_CONFIG)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "openapi_python_client",
            "generate",
            "--path",
            str(spec),
            "--config",
            str(config),
            "--output-path",
            str(base / PACKAGE),
            "--meta",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The generator reports the parts of a spec it could not turn into code as warnings: there must be none.
    assert "Warning" not in result.stdout + result.stderr, result.stdout + result.stderr
    sys.path.insert(0, str(base))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(base))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def api(package: ModuleType, tag: str, operation: str) -> ModuleType:
    return importlib.import_module(f"{package.__name__}.api.{tag}.{operation}")


def request_body(function: Callable[..., Any], data: dict[str, Any]) -> Any:
    """The generated body for `data`: the body class's `from_dict`, or, for a union, the member that takes it.

    A body whose schema the generator cannot type (a bare `oneOf` of `required` lists) is a plain `Any`: the
    generated function then takes the JSON document itself."""
    hint = typing.get_type_hints(function)["body"]
    if hint is Any:
        return data
    for member in typing.get_args(hint) or (hint,):
        if not hasattr(member, "from_dict"):
            continue
        try:
            body = member.from_dict(data)
        except (KeyError, TypeError, ValueError):
            continue
        if body.to_dict() == {**body.to_dict(), **data}:  # every field given is kept as given
            return body
    raise AssertionError(f"no generated body class of {hint} takes {data}")


def npz_file(package: ModuleType, name: str, **arrays: np.ndarray) -> Any:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    return package.types.File(payload=buffer, file_name=f"{name}.npz", mime_type="application/octet-stream")


def plain_rows(served: Served, attribution_id: str, direction: str) -> list[dict[str, Any]]:
    """The same rows from the results route over plain HTTP (the reference the generated client is checked
    against)."""
    rows, token = [], None
    headers = {"Authorization": f"Bearer {served.key}"}
    while True:
        params = {"direction": direction, "page_size": 1000, **({"page_token": token} if token else {})}
        page = (
            httpx.get(
                f"{served.url}/v1/attributions/{attribution_id}/results", params=params, headers=headers, timeout=30
            )
            .raise_for_status()
            .json()
        )
        rows += page["results"]
        token = page["next_page_token"]
        if token is None:
            return rows


def key(row: dict[str, Any]) -> tuple[str, str, int]:
    return str(row["query_id"]), row["direction"], int(row["rank"])


def assert_utc_z(document: bytes, *fields: str) -> None:
    values = json.loads(document)
    for field in fields:
        assert values[field].endswith("Z") and "+" not in values[field], (field, values[field])


def test_generated_client_runs_the_whole_flow(served: Served, generated: ModuleType) -> None:
    models = importlib.import_module(f"{generated.__name__}.models")
    client = generated.AuthenticatedClient(base_url=served.url, token=served.key, timeout=60.0)

    # Upload a model: the `weights` part (repeatable) is a list of generated `File`s, each sent as a file part (a
    # text field would be a 422).
    net = tiny_classifier()
    weights = save_safetensors({k: v.contiguous() for k, v in net.state_dict().items()})
    metadata = {"name": "tiny", "format": "spec", "architecture": MLP_ARCHITECTURE, "task": {"loss": "cross_entropy"}}
    upload_model = api(generated, "models", "upload_model")
    sent = upload_model.sync_detailed(
        client=client,
        body=models.BodyUploadModel(
            metadata=json.dumps(metadata),
            weights=[
                generated.types.File(
                    payload=io.BytesIO(weights), file_name="tiny.safetensors", mime_type="application/octet-stream"
                )
            ],  # repeatable: hf shards
        ),
    )
    assert sent.status_code == 201, sent.content
    model = sent.parsed
    assert isinstance(model, models.ModelOut)
    assert model.tracked_layers == ["0", "2"]
    assert model.num_parameters == sum(p.numel() for p in net.parameters())
    assert sent.headers["location"] == f"/v1/models/{model.id}"
    assert_utc_z(sent.content, "created_at")

    upload_dataset = api(generated, "datasets", "upload_dataset")
    train_arrays = tiny_dataset(len(TRAIN_IDS), seed=1, ids=TRAIN_IDS)
    query_arrays = tiny_dataset(len(QUERY_IDS), seed=2, ids=QUERY_IDS)
    datasets = {}
    for name, arrays in (("train", train_arrays), ("queries", query_arrays)):
        sent = upload_dataset.sync_detailed(
            client=client,
            body=models.BodyUploadDataset(
                metadata=json.dumps({"name": name}), data=npz_file(generated, name, **arrays)
            ),
        )
        assert sent.status_code == 201, sent.content
        assert_utc_z(sent.content, "created_at")
        datasets[name] = sent.parsed
    assert datasets["train"].num_examples == len(TRAIN_IDS) and datasets["queries"].num_examples == len(QUERY_IDS)

    # Submit an influence attribution: 202, the job in `Location`.
    create_attribution = api(generated, "attributions", "create_attribution")
    request = {
        "model_id": model.id,
        "train_dataset_id": datasets["train"].id,
        "query_dataset_id": datasets["queries"].id,
        "method": "influence",
        "mode": "pairwise",
        "top_k": TOP_K,
        "options": {"strategy": "ekfac"},
    }
    sent = create_attribution.sync_detailed(client=client, body=request_body(create_attribution.sync_detailed, request))
    assert sent.status_code == 202, sent.content
    attribution = sent.parsed
    assert isinstance(attribution, models.AttributionOut)
    assert sent.headers["location"] == f"/v1/jobs/{attribution.job_id}"
    assert_utc_z(sent.content, "created_at")

    # Wait: poll the job until it has finished.
    get_job = api(generated, "jobs", "get_job")
    deadline = time.monotonic() + 240
    while True:
        polled = get_job.sync_detailed(job_id=attribution.job_id, client=client)
        job = polled.parsed
        assert isinstance(job, models.JobOut), polled.content
        if job.status in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert job.status == "succeeded", polled.content
    assert job.result_url == f"/v1/attributions/{attribution.id}/results"
    assert_utc_z(polled.content, "created_at", "started_at", "finished_at")
    assert isinstance(job.finished_at, datetime) and job.finished_at.utcoffset() == timedelta(0)  # parsed as UTC
    assert job.created_at <= job.finished_at

    # Page: 3 queries × top 3, four rows a page, following `next_page_token`.
    get_results = api(generated, "attributions", "get_results")
    for direction in ("positive", "negative"):
        rows: list[dict[str, Any]] = []
        token: str | None = None
        pages = 0
        while True:
            page = get_results.sync(
                attribution_id=attribution.id,
                client=client,
                direction=models.GetResultsDirection(direction),
                page_size=4,
                page_token=token if token is not None else generated.types.UNSET,
            )
            assert isinstance(page, models.ResultsPage)
            rows += [row.to_dict() for row in page.results]
            pages += 1
            token = page.next_page_token
            if token is None:
                break
        assert pages == 3
        assert [row["query_id"] for row in rows] == [q for q in QUERY_IDS.tolist() for _ in range(TOP_K)]
        assert [row["rank"] for row in rows] == list(range(1, TOP_K + 1)) * len(QUERY_IDS)
        assert all(row["train_id"] in TRAIN_IDS.tolist() for row in rows)
        for query in QUERY_IDS.tolist():  # rank 1 is the strongest: the largest score, or the most negative
            scores = [row["score"] for row in rows if row["query_id"] == query]
            assert scores == sorted(scores, reverse=direction == "positive")
        assert rows == plain_rows(served, attribution.id, direction)  # same ids, ranks and scores, exactly

    reference = plain_rows(served, attribution.id, "positive") + plain_rows(served, attribution.id, "negative")

    # Export: CSV and NDJSON as text, Parquet as bytes; every row, the same values.
    export_results = api(generated, "attributions", "export_results")
    as_csv = export_results.sync(attribution_id=attribution.id, client=client, format_=models.ExportResultsFormat.CSV)
    assert isinstance(as_csv, str)
    from_csv = list(csv.DictReader(io.StringIO(as_csv)))
    assert len(from_csv) == 2 * len(QUERY_IDS) * TOP_K
    by_key = {key(row): row for row in reference}
    for row in from_csv:
        expected = by_key[key(row)]
        assert int(row["train_id"]) == expected["train_id"] and float(row["score"]) == expected["score"]

    as_ndjson = export_results.sync(
        attribution_id=attribution.id, client=client, format_=models.ExportResultsFormat.NDJSON
    )
    assert isinstance(as_ndjson, str)
    from_ndjson = [json.loads(line) for line in as_ndjson.splitlines()]
    assert sorted(from_ndjson, key=key) == sorted(reference, key=key)

    as_parquet = export_results.sync_detailed(
        attribution_id=attribution.id, client=client, format_=models.ExportResultsFormat.PARQUET
    )
    assert as_parquet.status_code == 200
    assert as_parquet.headers["content-type"] == "application/vnd.apache.parquet"
    table = pq.read_table(io.BytesIO(as_parquet.content)).to_pylist()
    assert sorted(table, key=key) == sorted(reference, key=key)
