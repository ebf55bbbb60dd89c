"""A method added through the registry alone: a seeded random baseline, declared in this module, registered by
a fixture, run end to end through the API and the real job runner. Also: the registry's OpenAPI contract."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import pytest
import torch
from pydantic import Field

from service.schemas.common import Seed, StrictModel
from service.schemas.diagnostics import Diagnostics
from tests.service.conftest import Api
from tests.service.test_attributions import all_rows, setup_job, submit
from worker.attribution import AttributionScores, TopK
from worker.methods.base import Method, RunInputs, RunOutput
from worker.methods.registry import all_methods, get_method, register, unregister


class RandomOptions(StrictModel):
    """Options of the toy method `random`."""

    seed: Seed = Field(0, description="Seed of the scores.")


def random_scores(seed: int, num_queries: int, num_train: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_queries, num_train, generator=generator)


def run_random(inputs: RunInputs) -> RunOutput:
    assert isinstance(inputs.options, RandomOptions)
    num_queries = 1 if inputs.query is None or inputs.mode != "pairwise" else len(inputs.query)
    scores = random_scores(inputs.options.seed, num_queries, len(inputs.train))
    if inputs.mode != "pairwise":
        return RunOutput(AttributionScores(mode=inputs.mode, scores=scores[0], diagnostics={"baseline": "random"}))
    k = min(inputs.top_k, len(inputs.train))
    positive = torch.topk(scores, k, dim=1)
    negative = torch.topk(scores, k, dim=1, largest=False)
    topk = TopK(positive.indices, positive.values, negative.indices, negative.values)
    return RunOutput(AttributionScores(mode="pairwise", topk=topk, diagnostics={"baseline": "random"}))


class RandomDiagnostics(Diagnostics):
    """What a random-baseline job reports (the worker refuses keys it does not declare)."""

    method: Literal["random"] = "random"
    baseline: str


RANDOM = Method(
    name="random",
    summary="Seeded random scores: a baseline.",
    options=RandomOptions,
    diagnostics=RandomDiagnostics,
    run=run_random,
)


@pytest.fixture
def random_method() -> Iterator[Method]:
    register(RANDOM)
    try:
        yield RANDOM
    finally:
        unregister(RANDOM.name)


def test_a_registered_method_runs_end_to_end(random_method: Method, api: Api) -> None:
    setup = setup_job(api, n_train=12, n_query=3)
    attribution = submit(api, setup, method="random", top_k=4, options={"seed": 7})
    job = api.client.get(f"/v1/jobs/{attribution['job_id']}").json()
    assert job["status"] == "succeeded", job
    details = api.client.get(f"/v1/attributions/{attribution['id']}").json()
    assert details["method"] == "random" and details["options"] == {"seed": 7}
    # A method from outside the package: its diagnostics come back as an open object.
    assert details["diagnostics"] == {"method": "random", "baseline": "random"} and details["num_results"] == 3 * 4 * 2
    rows = all_rows(api, attribution["id"])
    expected = random_scores(7, 3, 12)
    for query_pos, query_id in enumerate(setup["query"]["ids"].tolist()):
        mine = [row for row in rows if row["query_id"] == query_id]
        assert [row["rank"] for row in mine] == [1, 2, 3, 4]
        best = torch.topk(expected[query_pos], 4)
        assert [row["train_id"] for row in mine] == best.indices.tolist()
        assert [row["score"] for row in mine] == pytest.approx(best.values.tolist())


def test_a_registered_method_has_strict_documented_options(random_method: Method, sqlite_api: Api) -> None:
    setup = setup_job(sqlite_api, n_train=6, n_query=2)
    response = sqlite_api.client.post(
        "/v1/attributions",
        json={
            "model_id": setup["model_id"],
            "train_dataset_id": setup["train_dataset_id"],
            "query_dataset_id": setup["query_dataset_id"],
            "method": "random",
            "options": {"sede": 1},
        },
    )
    assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json"
    assert [error["field"] for error in response.json()["errors"]] == ["body.options.sede"]
    schemas = sqlite_api.client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["RandomOptions"]["properties"]["seed"]["description"] == "Seed of the scores."
    assert schemas["AttributionIn"]["discriminator"]["mapping"]["random"] == "#/components/schemas/RandomAttributionIn"


def test_unregistering_leaves_the_built_in_methods() -> None:
    register(RANDOM)
    unregister(RANDOM.name)
    assert "random" not in [method.name for method in all_methods()]
    with pytest.raises(ValueError):
        unregister("influence")
    with pytest.raises(ValueError):
        register(get_method("influence"))


def test_openapi_documents_each_method_as_a_variant(sqlite_api: Api) -> None:
    spec = sqlite_api.client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    body = spec["paths"]["/v1/attributions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/AttributionIn"}
    union = schemas["AttributionIn"]
    assert union["discriminator"]["propertyName"] == "method"
    names = {
        "influence": "InfluenceOptions",
        "datainf": "DataInfOptions",
        "gradient_similarity": "GradientSimilarityOptions",
        "tracin": "TracInOptions",
        "source": "SourceOptions",
        "meta_task_influence": "MetaTaskInfluenceOptions",
        "meta_instance_influence": "MetaInstanceInfluenceOptions",
    }
    assert set(union["discriminator"]["mapping"]) == set(names)
    for method, options in names.items():
        variant = schemas[union["discriminator"]["mapping"][method].rsplit("/", 1)[1]]
        assert variant["properties"]["method"]["const"] == method
        assert variant["properties"]["options"]["$ref"] == f"#/components/schemas/{options}"
        assert {"required": ["model_id"]} in variant["oneOf"] and {"required": ["model_ids"]} in variant["oneOf"]
        assert schemas[options].get("examples"), options
    influence = schemas["InfluenceOptions"]["properties"]
    assert influence["batch_size"]["default"] == 256 and influence["batch_size"]["maximum"] == 65536
    assert "description" in influence["damping"]


def test_every_option_reaches_the_engine() -> None:
    """The one mapping module names every field of each options model (none is dropped on the way)."""
    import dataclasses

    from worker.methods import engine_options
    from worker.methods.influence import InfluenceOptions

    engine = engine_options.influence_options(InfluenceOptions(strategy="cg", damping=0.5, max_iter=7, seed=3))
    assert (engine.strategy, engine.damping, engine.max_iter, engine.seed) == ("cg", 0.5, 7, 3)
    mappings: dict[str, Callable[[Any], Any]] = {
        "influence": engine_options.influence_options,
        "datainf": engine_options.datainf_options,
        "gradient_similarity": engine_options.gradient_similarity_options,
        "tracin": engine_options.tracin_options,
        "source": engine_options.source_options,
        "meta_task_influence": engine_options.meta_options,
        "meta_instance_influence": engine_options.meta_options,
    }
    for method in all_methods():
        engine_fields = {field.name for field in dataclasses.fields(mappings[method.name](method.options()))}
        model_fields = set(method.options.model_fields) - {"stages", "stage_datasets"}
        assert model_fields <= engine_fields, (method.name, model_fields - engine_fields)


def test_a_stored_option_the_model_no_longer_knows_fails_the_job(sqlite_api: Api) -> None:
    """The worker re-reads stored options through the method's model: nothing is dropped silently."""
    from service.db.session import session_scope
    from service.db.tables import Attribution
    from worker.runner import run_job

    setup = setup_job(sqlite_api, n_train=8, n_query=2)
    sqlite_api.queue.paused = True
    attribution = submit(sqlite_api, setup, method="gradient_similarity", options={"normalize": True})
    with session_scope(sqlite_api.settings.resolved_database_url) as session:
        stored = session.get(Attribution, attribution["id"])
        assert stored is not None and stored.options["normalize"] is True
        stored.options = {**stored.options, "retired_option": 3}
    run_job(attribution["job_id"], sqlite_api.settings)
    job = sqlite_api.client.get(f"/v1/jobs/{attribution['job_id']}").json()
    assert job["status"] == "failed" and job["error"]["status"] == 422
    assert "retired_option" in job["error"]["detail"] and "GradientSimilarityOptions" in job["error"]["detail"]
