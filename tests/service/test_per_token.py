"""Per-token query attribution through the API (`per_token: true`, causal LM, pairwise).

A tiny GPT-2 and a BPE tokenizer trained in the test (nothing downloaded) are uploaded; text datasets are tokenized
with it. The per-token rows equal the engine's scores of `per_token_queries`, the token scores of a query sum to the
query's whole score, the whole score is the gradient of the summed NLL of the completion tokens, the results and the
exports filter by `query_token`, such pages are index range scans, sharded jobs give the same rows, TracInCP and
SOURCE (uploaded checkpoints) give per-token rows too, and per_token on a classifier or outside pairwise mode is a 422.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save as save_safetensors
from sqlalchemy import text
from tokenizers import Tokenizer
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.trainers import BpeTrainer
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedModel

from service.db.session import session_scope
from service.db.tables import Dataset, Model
from service.pagination import RankCursor
from service.results import CHUNK_COLUMNS, chunk_query, page_of_results, query_positions
from service.storage.local import LocalBlobStore
from tests.service.conftest import Api, build_api
from tests.service.test_hf_models import (
    MODELS,
    parquet_bytes,
    post_dataset,
    post_parts,
    saved,
    stored_text,
    summed_nll_gradients,
)
from tests.service.test_result_storage import add_other_query_rows, page_plan, pairwise_scores, sqlite_index
from worker.attribution import attribute
from worker.attribution.methods.source import attribute_source
from worker.attribution.methods.tracin import attribute_tracin
from worker.attribution.options import GradientSimilarityOptions
from worker.attribution.text import IGNORE_INDEX, per_token_queries
from worker.attribution.trajectory import TrajectoryCheckpoint
from worker.loading import load_examples, load_model
from worker.methods.engine_options import source_options
from worker.methods.source import SourceOptions
from worker.tasks.result_writer import write_results
from worker.tasks.rows import QueryTokenLabels, result_columns

CORPUS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the cat slept and then it ran",
    "a dog sat on a mat in the park",
]
TRAIN_TEXT = ["the cat sat on the mat", "a dog ran in the park", "the cat slept", "a dog sat"]
PROMPTS = ["the cat", "a dog ran"]
COMPLETIONS = ["sat on the mat", "in the park"]
REL = 1e-4  # float32 model: engine vs autograd, and a sum of token scores vs the whole score
ABS = 1e-6


def bpe_tokenizer() -> Tokenizer:
    """A tiny BPE tokenizer trained in memory on CORPUS, with [PAD] = 0 and [UNK] = 1."""
    tokenizer = Tokenizer(BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.train_from_iterator(CORPUS, BpeTrainer(vocab_size=40, special_tokens=["[PAD]", "[UNK]"]))
    return tokenizer


def tiny_gpt2(vocab_size: int) -> PreTrainedModel:
    torch.manual_seed(5)
    return AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    ).eval()


class Setup:
    def __init__(self, api: Api, folder: Path) -> None:
        self.api = api
        self.tokenizer = bpe_tokenizer()
        self.model = tiny_gpt2(self.tokenizer.get_vocab_size())
        self.model.save_pretrained(folder)
        (folder / "tokenizer.json").write_text(self.tokenizer.to_str())
        (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))
        self.uploaded = post_parts(api, folder, {"loss": "causal_lm"}).json()
        model_id = self.uploaded["id"]
        train = parquet_bytes({"text": TRAIN_TEXT, "ids": ["t0", "t1", "t2", "t3"]})
        self.train = post_dataset(api, train, "train.parquet", tokenize_with=model_id).json()
        queries = parquet_bytes({"prompt": PROMPTS, "completion": COMPLETIONS, "ids": ["q0", "q1"]})
        self.query = post_dataset(api, queries, "query.parquet", tokenize_with=model_id).json()

    def submit(self, **overrides: Any) -> Any:
        body = {
            "model_id": self.uploaded["id"],
            "train_dataset_id": self.train["id"],
            "query_dataset_id": self.query["id"],
            "method": "gradient_similarity",
            "mode": "pairwise",
            "top_k": len(TRAIN_TEXT),
            "per_token": True,
            **overrides,
        }
        return self.api.client.post("/v1/attributions", json=body)

    def run(self, **overrides: Any) -> dict[str, Any]:
        response = self.submit(**overrides)
        assert response.status_code == 202, response.text
        job = self.api.client.get(f"/v1/jobs/{response.json()['job_id']}").json()
        assert job["status"] == "succeeded", job["error"]
        attribution: dict[str, Any] = response.json()
        return attribution

    def rows(self, attribution_id: str, direction: str = "positive", **params: Any) -> list[dict[str, Any]]:
        """Every row of one direction, one row per page (the cursor walks every (query_pos, rank))."""
        rows: list[dict[str, Any]] = []
        token = None
        while True:
            query = {"direction": direction, "page_size": 3, **params, **({"page_token": token} if token else {})}
            response = self.api.client.get(f"/v1/attributions/{attribution_id}/results", params=query)
            assert response.status_code == 200, response.text
            rows += response.json()["results"]
            token = response.json()["next_page_token"]
            if token is None:
                return rows


@pytest.fixture
def setup(sqlite_api: Api, tmp_path: Path) -> Setup:
    return Setup(sqlite_api, tmp_path / "gpt2")


def stored_rows(api: Api, model_id: str, dataset_id: str) -> tuple[torch.nn.Module, Any]:
    with session_scope(api.settings.resolved_database_url) as session:
        model, dataset = session.get(Model, model_id), session.get(Dataset, dataset_id)
        assert model is not None and dataset is not None
        store = LocalBlobStore(api.settings.resolved_storage_dir)
        return load_model(store, model), load_examples(store, dataset)[0]


def by_key(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], float]:
    return {(r["query_id"], r["query_token"], r["train_id"]): r["score"] for r in rows}


def test_per_token_rows_equal_the_engine_and_sum_to_the_whole_query(setup: Setup) -> None:
    api = setup.api
    attribution = setup.run()
    assert attribution["per_token"] is True
    rows = setup.rows(attribution["id"])
    model, train = stored_rows(api, setup.uploaded["id"], setup.train["id"])
    _, queries = stored_rows(api, setup.uploaded["id"], setup.query["id"])

    # the engine on per_token_queries, directly
    tokens = per_token_queries(queries)
    engine = attribute(
        [model],
        train,
        tokens.examples,
        loss="causal_lm",
        method="gradient_similarity",
        mode="pairwise",
        top_k=len(TRAIN_TEXT),
        options=GradientSimilarityOptions(),
    )
    assert engine.topk is not None
    expected: dict[tuple[Any, ...], float] = {}
    for r, (q, position) in enumerate(zip(tokens.query.tolist(), tokens.position.tolist(), strict=True)):
        for index, score in zip(
            engine.topk.positive_indices[r].tolist(), engine.topk.positive_scores[r].tolist(), strict=True
        ):
            expected[(f"q{q}", position, f"t{index}")] = score
    assert set(by_key(rows)) == set(expected)
    for key, score in by_key(rows).items():
        assert score == pytest.approx(expected[key], rel=REL, abs=ABS), key

    # each row's token: its position in the query (right padded: the column), decoded with the uploaded tokenizer
    query_ids = stored_text(api, setup.query["id"]).input_ids
    for row in rows:
        token_id = int(query_ids[int(row["query_id"][1]), row["query_token"]])
        assert row["query_token_text"] == setup.tokenizer.decode([token_id])
    # scored tokens are the completion's, after the prompt
    for q, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
        start = len(setup.tokenizer.encode(prompt).ids)
        count = len(setup.tokenizer.encode(f"{prompt} {completion}").ids) - start
        assert {r["query_token"] for r in rows if r["query_id"] == f"q{q}"} == set(range(start, start + count))

    # the whole query: the summed NLL of its completion tokens, and the sum of its token scores
    whole = setup.run(per_token=False)
    assert whole["per_token"] is False
    whole_rows = setup.rows(whole["id"])
    assert all(r["query_token"] is None and r["query_token_text"] is None for r in whole_rows)
    text_rows = stored_text(api, setup.query["id"]), stored_text(api, setup.train["id"])
    gradients = [
        summed_nll_gradients(
            setup.model,
            torch.from_numpy(t.input_ids),
            torch.from_numpy(t.attention_mask),
            torch.from_numpy(t.labels),
            setup.uploaded["tracked_layers"],
        )
        for t in text_rows
    ]
    exact = gradients[0] @ gradients[1].T
    summed: dict[tuple[str, str], float] = {}
    for (query_id, _, train_id), score in by_key(rows).items():
        summed[(query_id, train_id)] = summed.get((query_id, train_id), 0.0) + score
    for row in whole_rows:
        key = (row["query_id"], row["train_id"])
        assert row["score"] == pytest.approx(float(exact[int(key[0][1]), int(key[1][1])]), rel=REL, abs=ABS)
        assert summed[key] == pytest.approx(row["score"], rel=REL, abs=ABS)


def test_results_and_exports_filter_by_query_token(setup: Setup) -> None:
    api = setup.api
    attribution = setup.run()
    everything = setup.rows(attribution["id"]) + setup.rows(attribution["id"], "negative")
    positions = sorted({r["query_token"] for r in everything})
    assert len(positions) >= 3
    chosen = positions[len(positions) // 2]
    wanted = [r for r in everything if r["query_token"] == chosen]
    assert setup.rows(attribution["id"], query_token=chosen) + setup.rows(
        attribution["id"], "negative", query_token=chosen
    ) == sorted(wanted, key=lambda r: r["direction"] == "negative")
    one = setup.rows(attribution["id"], query_token=chosen, query_id="q1")
    assert one == [r for r in wanted if r["query_id"] == "q1" and r["direction"] == "positive"] and one
    assert all(r["rank"] == i for i, r in enumerate(one, start=1))
    missing = api.client.get(f"/v1/attributions/{attribution['id']}/results", params={"query_token": 0})
    assert missing.status_code == 404 and "query_token" in missing.json()["detail"]  # the first token is never scored
    negative = api.client.get(f"/v1/attributions/{attribution['id']}/results", params={"query_token": -1})
    assert negative.status_code == 422

    url = f"/v1/attributions/{attribution['id']}/results/export"
    expected = {(r["query_id"], r["direction"], r["rank"], r["train_id"], r["query_token_text"]) for r in wanted}
    as_csv = api.client.get(url, params={"format": "csv", "query_token": chosen}).text
    from_csv = list(csv.DictReader(io.StringIO(as_csv)))
    assert {int(r["query_token"]) for r in from_csv} == {chosen}
    assert {
        (r["query_id"], r["direction"], int(r["rank"]), r["train_id"], r["query_token_text"]) for r in from_csv
    } == (expected)
    lines = api.client.get(url, params={"format": "ndjson", "query_token": chosen}).text.splitlines()
    from_ndjson = [json.loads(line) for line in lines]
    assert sorted(from_ndjson, key=json.dumps) == sorted(wanted, key=json.dumps)
    table = pq.read_table(io.BytesIO(api.client.get(url, params={"format": "parquet", "query_token": chosen}).content))
    assert sorted(table.to_pylist(), key=json.dumps) == sorted(wanted, key=json.dumps)
    assert len(list(csv.DictReader(io.StringIO(api.client.get(url).text)))) == len(everything)


def test_per_token_is_refused_off_causal_lm_pairwise(setup: Setup, tmp_path: Path) -> None:
    api = setup.api
    bert = post_parts(api, saved(MODELS["bert"][0](), tmp_path / "bert"), MODELS["bert"][1]).json()
    cases = [
        ({"model_id": bert["id"]}, "causal language model"),
        ({"mode": "aggregate"}, "pairwise"),
        ({"mode": "self", "query_dataset_id": None}, "pairwise"),
        ({"per_token": "yes"}, None),
    ]
    for overrides, words in cases:
        response = setup.submit(**overrides)
        assert response.status_code == 422, response.text
        body = response.json()
        assert response.headers["content-type"].startswith("application/problem+json")
        if words is not None:
            assert words in body["detail"] and body["errors"][0]["field"] == "body.per_token", body


def test_text_examples_are_token_ids_and_decoded_text(setup: Setup) -> None:
    api = setup.api
    url = f"/v1/datasets/{setup.query['id']}/examples"
    body = api.client.get(url, params={"ids": ["q1", "q0"]}).json()
    assert body["tokenizer_model_id"] == setup.uploaded["id"]
    assert [e["id"] for e in body["examples"]] == ["q1", "q0"]
    for example, (prompt, completion) in zip(
        body["examples"], [(PROMPTS[1], COMPLETIONS[1]), (PROMPTS[0], COMPLETIONS[0])], strict=True
    ):
        encoded = setup.tokenizer.encode(f"{prompt} {completion}").ids
        start = len(setup.tokenizer.encode(prompt).ids)
        assert example["input"] == encoded  # padding left out
        assert example["target"] == [IGNORE_INDEX] * start + encoded[start:]
        assert example["text"] == setup.tokenizer.decode(encoded)
        assert example["tokens"] == [setup.tokenizer.decode([t]) for t in encoded]
    ids_only = post_dataset(
        api, parquet_bytes({"input_ids": [[2, 3, 4], [5, 6]]}), "ids.parquet"
    ).json()  # token ids: no tokenizer known unless model_id names one
    plain = api.client.get(f"/v1/datasets/{ids_only['id']}/examples", params={"ids": ["1"]}).json()
    assert plain["examples"][0] == {
        "id": 1,
        "input": [5, 6],
        "target": [5, 6],
        "task": None,
        "split": None,
        "text": None,
        "tokens": None,
    }
    decoded = api.client.get(
        f"/v1/datasets/{ids_only['id']}/examples", params={"ids": ["1"], "model_id": setup.uploaded["id"]}
    ).json()
    assert decoded["examples"][0]["tokens"] == [setup.tokenizer.decode([5]), setup.tokenizer.decode([6])]
    numbers = api.upload_npz(inputs=np.zeros((2, 3), np.float32), targets=np.zeros(2, np.int64)).json()
    refused = api.client.get(
        f"/v1/datasets/{numbers['id']}/examples", params={"ids": ["0"], "model_id": setup.uploaded["id"]}
    )
    assert refused.status_code == 422


def per_token_influence_rows(folder: Path, shard_examples: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    folder.mkdir()
    apis = build_api(folder, None, shard_examples=shard_examples)
    api = next(apis)
    try:
        setup = Setup(api, folder / "gpt2")
        attribution = setup.run(method="influence", options={"strategy": "ekfac", "batch_size": 2})
        rows = setup.rows(attribution["id"]) + setup.rows(attribution["id"], "negative")
        return rows, api.client.get(f"/v1/attributions/{attribution['id']}").json()["diagnostics"]
    finally:
        apis.close()


def test_sharded_per_token_jobs_write_the_same_rows(tmp_path: Path) -> None:
    reference, _ = per_token_influence_rows(tmp_path / "plain", 0)
    rows, diagnostics = per_token_influence_rows(tmp_path / "sharded", 2)
    assert diagnostics["shards"] == 2
    assert [{k: r[k] for k in r if k != "score"} for r in rows] == [
        {k: r[k] for k in r if k != "score"} for r in reference
    ]
    for row, before in zip(rows, reference, strict=True):
        assert row["score"] == pytest.approx(before["score"], rel=REL, abs=ABS)


# --- pages filtered by query_token read a partial index range, with no sort, at any depth ---------------------------


QUERY_INDEXES = ["ix_queries_query_id", "ix_queries_query_token"]


def test_query_token_pages_are_index_range_scans_without_a_sort(api: Api) -> None:
    """A per-token attribution's rows (2 queries x 4 scored tokens, 2,000 rows each way per token) beside an
    ordinary attribution's: pages filtered by query_token (and query_id) at several depths."""
    url = api.settings.resolved_database_url
    # rows name their attribution without a foreign key: no attribution (nor a queued job) is needed to page them
    attribution_id, neighbour = f"attr_{uuid.uuid4().hex}", f"attr_{uuid.uuid4().hex}"
    tokens = QueryTokenLabels(
        query=np.repeat(np.arange(2), 4), position=np.tile(np.arange(1, 5), 2), text=[f"w{i}" for i in range(8)]
    )
    scores = pairwise_scores(8, 2000, 2000)
    with session_scope(url) as session:
        write_results(
            session, attribution_id, result_columns(scores, "influence", 2000, range(2000), ["a", "b"], tokens)
        )
        write_results(session, neighbour, result_columns(scores, "influence", 2000, range(2000), list(range(8))))
        add_other_query_rows(session)
    with session_scope(url) as session:
        session.execute(text("ANALYZE"))
    for after in (None, RankCursor(1, 3), RankCursor(6, 500)):
        with session_scope(url) as session:
            sqlite = session.get_bind().dialect.name == "sqlite"
            start = after.query_pos if after is not None else 0
            plans = [  # the matching query rows (query_token; query_id and query_token), then each one's rows
                (["ix_queries_query_token"], query_positions(attribution_id, None, 3, start, 102)),
                (QUERY_INDEXES, query_positions(attribution_id, "b", 3, start, 102)),  # either is one range
                (["pk_result_chunks"], chunk_query(CHUNK_COLUMNS, attribution_id, "positive", after, 101, 6)),
            ]
            for indexes, statement in plans:
                plan = page_plan(session, statement)
                if sqlite:
                    names = [sqlite_index(index, "result_chunks") for index in indexes]
                    assert any(f"USING {name} (" in plan or f"USING COVERING {name} (" in plan for name in names), plan
                    assert "TEMP B-TREE" not in plan and "SCAN" not in plan, plan
                else:
                    assert any(f"Scan using {index} on " in plan for index in indexes), plan
                    assert "Sort" not in plan and "Seq Scan" not in plan, plan
            assert session.scalars(plans[0][1]).all() == [pos for pos in (2, 6) if pos >= start]
            assert session.scalars(plans[1][1]).all() == [pos for pos in (6,) if pos >= start]
            rows, _ = page_of_results(session, attribution_id, "positive", None, after, 5, query_token=3)
            keys = [(row.query_pos, row.rank) for row in rows]
            assert keys == sorted(keys) and len(keys) == 5 and {row.query_token for row in rows} == {3}
            assert after is None or keys[0] > tuple(after)
            assert {row.query_token_text for row in rows} <= {"w2", "w6"}
            page, _ = page_of_results(session, attribution_id, "positive", "b", after, 5, query_token=3)
            assert [(row.query_id, row.query_token, row.query_pos) for row in page] == [("b", 3, 6)] * 5
            ranks = [row.rank for row in page]
            assert ranks == list(range(ranks[0], ranks[0] + 5)) and ranks[0] == (
                after.rank + 1 if after and after.query_pos == 6 else 1
            )


# --- methods that read the training trajectory (checkpoints): TracInCP and SOURCE -----------------------------------


@pytest.mark.parametrize("method", ["tracin", "source"])
def test_per_token_with_checkpoint_methods(setup: Setup, method: str) -> None:
    """TracInCP and SOURCE on two uploaded checkpoints of the GPT-2: per-token rows equal the engine's on
    `per_token_queries` (with the same trajectory), carry `query_token`, filter by it, and a query's token scores
    sum to the score of the same request without per_token."""
    api, model_id = setup.api, setup.uploaded["id"]
    trajectory = []
    for step in (1, 2):
        checkpoint = copy.deepcopy(setup.model)
        with torch.no_grad():
            for parameter in checkpoint.parameters():
                parameter.mul_(1.0 - 0.1 * step)
        state = {k: v.contiguous() for k, v in checkpoint.state_dict().items() if k != "lm_head.weight"}  # tied
        response = api.client.post(
            f"/v1/models/{model_id}/checkpoints",
            data={"metadata": json.dumps({"step": step, "learning_rate": 0.1})},
            files={"weights": ("w.safetensors", save_safetensors(state))},
        )
        assert response.status_code == 201, response.text
        trajectory.append(TrajectoryCheckpoint(checkpoint.eval(), step, 0.1))
    options = {"segments": 2} if method == "source" else {}
    attribution = setup.run(method=method, options=options)
    assert attribution["per_token"] is True
    rows = setup.rows(attribution["id"])

    model, train = stored_rows(api, model_id, setup.train["id"])
    _, queries = stored_rows(api, model_id, setup.query["id"])
    tokens = per_token_queries(queries)
    top_k = len(TRAIN_TEXT)
    if method == "tracin":
        engine = attribute_tracin(trajectory, train, tokens.examples, loss="causal_lm", mode="pairwise", top_k=top_k)
    else:
        engine = attribute_source(
            model,
            trajectory,
            {0: train},
            train,
            tokens.examples,
            loss="causal_lm",
            mode="pairwise",
            top_k=top_k,
            options=source_options(SourceOptions(segments=2)),
        )
    assert engine.topk is not None
    expected: dict[tuple[Any, ...], float] = {}
    for r, (q, position) in enumerate(zip(tokens.query.tolist(), tokens.position.tolist(), strict=True)):
        for index, score in zip(
            engine.topk.positive_indices[r].tolist(), engine.topk.positive_scores[r].tolist(), strict=True
        ):
            expected[(f"q{q}", position, f"t{index}")] = score
    assert set(by_key(rows)) == set(expected)
    for key, score in by_key(rows).items():
        assert score == pytest.approx(expected[key], rel=REL, abs=ABS), key
    assert all(isinstance(r["query_token_text"], str) for r in rows)

    chosen = sorted({r["query_token"] for r in rows})[1]
    filtered = setup.rows(attribution["id"], query_token=chosen)
    assert filtered == [r for r in rows if r["query_token"] == chosen] and filtered

    whole = setup.rows(setup.run(method=method, options=options, per_token=False)["id"])
    summed: dict[tuple[str, str], float] = {}
    for (query_id, _, train_id), score in by_key(rows).items():
        summed[(query_id, train_id)] = summed.get((query_id, train_id), 0.0) + score
    assert len(whole) == len(summed)
    for row in whole:
        assert summed[(row["query_id"], row["train_id"])] == pytest.approx(row["score"], rel=REL, abs=ABS)
