"""The SDK end to end against a real `attrib serve`: upload → attribute → wait → results → export → edit."""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from attrib import AsyncClient, Client, InvalidInput, NotFound, Unauthorized
from attrib.options import Edit, Influence
from tests.client.conftest import Served
from tests.service.conftest import MLP_ARCHITECTURE, tiny_classifier, tiny_dataset

pytestmark = pytest.mark.e2e

TOP_K = 4
TRAIN_IDS = np.arange(100, 140)
QUERY_IDS = ["q-a", "q-b", "q-c"]


@pytest.fixture(scope="module")
def pipeline(served: Served) -> dict[str, Any]:
    """Uploads from a torch module, tensors and a pandas DataFrame; an attribution followed to the end."""
    net = tiny_classifier()
    train = tiny_dataset(40, seed=1)
    queries = tiny_dataset(3, seed=2)
    frame = pd.DataFrame({f"x{i}": queries["inputs"][:, i] for i in range(4)})
    frame["targets"], frame["ids"] = queries["targets"], QUERY_IDS
    with Client(served.url, served.key) as client:
        model = client.upload_model(net, name="tiny", architecture=MLP_ARCHITECTURE["layers"], loss="cross_entropy")
        train_set = client.upload_dataset(
            name="train", inputs=torch.from_numpy(train["inputs"]), targets=train["targets"], ids=TRAIN_IDS
        )
        query_set = client.upload_dataset(frame, name="queries")  # sent as Parquet (tabular columns)
        attribution = client.attribute(model, train_set, query_set, top_k=TOP_K, options=Influence(strategy="ekfac"))
        state = attribution.job.wait(progress=False, timeout=180)
    return {
        "net": net,
        "model": model,
        "train": train_set,
        "queries": query_set,
        "attribution": attribution,
        "state": state,
    }


def test_uploads_describe_what_was_sent(pipeline: dict[str, Any]) -> None:
    assert pipeline["model"].tracked_layers == ["0", "2"]
    assert pipeline["model"].num_parameters == sum(p.numel() for p in pipeline["net"].parameters())
    assert pipeline["train"].num_examples == 40
    assert pipeline["queries"].num_examples == 3
    assert pipeline["queries"].fields["inputs"]["shape"][1:] == [4]
    assert pipeline["state"].status == "succeeded"
    assert pipeline["state"].result_url == f"/v1/attributions/{pipeline['attribution'].id}/results"


def test_results_export_and_edit(client_env: Served, pipeline: dict[str, Any], tmp_path: Path) -> None:
    attribution = pipeline["attribution"]
    with Client() as client:  # ATTRIB_URL and the data directory's key file, as a user would have them
        positive = list(client.results(attribution, page_size=5))  # 12 rows over 3 pages
        negative = list(client.results(attribution, direction="negative", page_size=5))
        assert [row.query_id for row in positive] == [q for q in QUERY_IDS for _ in range(TOP_K)]
        assert [row.rank for row in positive] == list(range(1, TOP_K + 1)) * 3
        assert all(row.train_id in TRAIN_IDS for row in positive + negative)
        for query in QUERY_IDS:
            scores = [row.score for row in positive if row.query_id == query]
            assert scores == sorted(scores, reverse=True)
        only_b = list(client.results(attribution, query_id="q-b", direction="negative"))
        assert only_b == [row for row in negative if row.query_id == "q-b"]

        table = client.results_table(attribution)
        assert table.num_rows == 2 * 3 * TOP_K
        frame = client.results_dataframe(attribution)
        mine = frame[frame.direction == "positive"].sort_values(["query_id", "rank"])
        assert mine.train_id.tolist() == [row.train_id for row in positive]
        assert mine.score.to_numpy() == pytest.approx([row.score for row in positive], rel=1e-6)

        exported = client.export(attribution, tmp_path / "rows.csv")
        with exported.open() as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 2 * 3 * TOP_K and {"query_id", "train_id", "score"} <= set(rows[0])

        remove = [row.train_id for row in negative[:2]]
        edited = client.edit(attribution, remove, name="tiny-edited", options=Edit(proximity=0.05, newton_steps=2))
        assert edited.id != pipeline["model"].id and edited.tracked_layers == ["0", "2"]
        diagnostics = edited.raw["edit_diagnostics"]
        assert diagnostics["proximity"] == 0.05 and diagnostics["proximity_rule"] == "given"
        assert diagnostics["solver"]["steps"] <= 2
        weights = load_file(client.download_weights(edited, tmp_path / "edited.safetensors"))
        original = pipeline["net"].state_dict()
        assert set(weights) == set(original)
        assert any(not torch.equal(weights[name], original[name]) for name in original)
        assert client.results_page_url(attribution).endswith(f"/ui/attributions/{attribution.id}")


def test_examples_by_id(served: Served, pipeline: dict[str, Any]) -> None:
    with Client(served.url, served.key) as client:
        examples = client.examples(pipeline["train"], [105, 101])
    train = tiny_dataset(40, seed=1)
    assert [e["id"] for e in examples] == [105, 101]
    assert examples[0]["input"] == pytest.approx(train["inputs"][5].tolist())


def test_problems_are_typed_exceptions(served: Served, pipeline: dict[str, Any]) -> None:
    with Client(served.url, served.key) as client:
        with pytest.raises(NotFound) as missing:
            client.get_model("mdl_missing")
        assert missing.value.status == 404 and "mdl_missing" in missing.value.detail
        with pytest.raises(NotFound, match="q-zz"):
            list(client.results(pipeline["attribution"], query_id="q-zz"))
        with pytest.raises(InvalidInput) as invalid:
            client.attribute(pipeline["model"], pipeline["train"], pipeline["queries"], options={"nonsense": 1})
        assert invalid.value.status == 422 and any("nonsense" in e.field + e.message for e in invalid.value.errors)
        with pytest.raises(InvalidInput, match="not supported yet"):
            client.upload_model(
                pipeline["net"],
                name="onnx",
                format="onnx",
                architecture={},
                loss="cross_entropy",
                config={"model_type": "bert"},
            )
    with Client(served.url, "atk_not-a-key") as stranger, pytest.raises(Unauthorized):
        stranger.get_model(pipeline["model"].id)


def test_async_client_reads_the_same_results(served: Served, pipeline: dict[str, Any]) -> None:
    attribution = pipeline["attribution"]

    async def read() -> tuple[list[Any], Any, str]:
        async with AsyncClient(served.url, served.key) as client:
            uploaded = await client.upload_dataset(name="async", **tiny_dataset(5, seed=4))
            assert (await client.get_dataset(uploaded.id)).num_examples == 5
            again = await client.get_attribution(attribution.id)
            state = await again.job.wait(progress=False)
            rows = [row async for row in client.results(attribution, page_size=5)]
            frame = await client.results_dataframe(attribution)
            return rows, frame, state.status

    rows, frame, status = asyncio.run(read())
    with Client(served.url, served.key) as client:
        assert rows == list(client.results(attribution))
    assert len(frame) == 2 * 3 * TOP_K and status == "succeeded"


def test_checkpoint_and_arrow_table_uploads(served: Served, pipeline: dict[str, Any], tmp_path: Path) -> None:
    import pyarrow as pa

    with Client(served.url, served.key) as client:
        checkpoint = client.upload_checkpoint(
            pipeline["model"], pipeline["net"].state_dict(), step=10, learning_rate=0.1
        )
        assert (checkpoint.model_id, checkpoint.step, checkpoint.stage) == (pipeline["model"].id, 10, 0)
        arrays = tiny_dataset(6, seed=3)
        table = pa.table({**{f"x{i}": arrays["inputs"][:, i] for i in range(4)}, "targets": arrays["targets"]})
        from_arrow = client.upload_dataset(table, name="arrow")
        np.savez(tmp_path / "same.npz", **arrays)
        from_file = client.upload_dataset(tmp_path / "same.npz", name="file")
        assert from_arrow.num_examples == from_file.num_examples == 6
        from_table_input = client.examples(from_arrow, [5])[0]["input"]
        assert from_table_input == pytest.approx(client.examples(from_file, [5])[0]["input"])
