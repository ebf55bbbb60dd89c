"""Schemathesis over every operation of /openapi.json, as a tenant that has data.

0 server errors, 0 responses that break their schema, 0 status codes or content types the spec doesn't declare.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks
from schemathesis.core.failures import FailureGroup

from service.app import create_app
from service.auth import create_api_key
from service.db.migrate import upgrade_to_head
from service.db.session import session_scope
from tests.service.conftest import Api, InlineQueue, make_settings
from tests.service.test_attributions import setup_job, submit

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]
EXAMPLES_PER_OPERATION = 40  # per generation mode (valid and invalid requests)


class World:
    """An app, a tenant with a model, datasets and a finished attribution, and ids to aim cases at."""

    def __init__(self, client: TestClient, headers: dict[str, str], ids: dict[str, str]) -> None:
        self.client = client
        self.headers = headers
        self.ids = ids


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp: Path = tmp_path_factory.mktemp("schemathesis")
    app_settings = make_settings(tmp, None, rate_limit_per_second=100_000, rate_limit_burst=100_000)
    upgrade_to_head(app_settings.resolved_database_url)
    queue = InlineQueue(app_settings)
    app = create_app(app_settings, queue=queue)
    with TestClient(app, raise_server_exceptions=False) as client:
        with session_scope(app_settings.resolved_database_url) as session:
            headers = {"Authorization": f"Bearer {create_api_key(session, f'st-{uuid.uuid4().hex[:6]}')}"}
        client.headers.update(headers)
        api = Api(client, app_settings, queue)
        setup = setup_job(api)
        attribution = submit(api, setup)
        queue.paused = True  # jobs the cases submit stay queued
        ids = {
            "model_id": setup["model_id"],
            "dataset_id": setup["train_dataset_id"],
            "attribution_id": attribution["id"],
            "job_id": attribution["job_id"],
        }
        yield World(client, headers, ids)


def aim(case: Any, ids: dict[str, str]) -> None:
    """Half the cases address the tenant's real resources instead of random ids."""
    rng = random.Random(repr(case.path_parameters))
    for name in list(case.path_parameters or {}):
        if name in ids and rng.random() < 0.5:
            case.path_parameters[name] = ids[name]


def run_operation(operation: Any, mode: GenerationMode, world: World, failures: list[str]) -> int:
    """Hypothesis-generated cases of one operation; returns how many ran."""
    count = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        nonlocal count
        count += 1
        aim(case, world.ids)
        response = case.call(headers=world.headers)
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as exc:  # collected, reported together below
            failures.append(f"{operation.label} ({mode.value}): {str(exc)[:1500]}")

    try:
        run()
    except Unsatisfiable:  # an operation without parameters has no invalid form
        assert mode is GenerationMode.NEGATIVE, operation.label
    return count


def test_every_operation_conforms_to_its_schema(world: World) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", world.client.app)
    failures: list[str] = []
    total = 0
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            total += run_operation(result.ok(), mode, world, failures)
    print(f"schemathesis: {total} cases")
    assert total >= 1000, total
    assert not failures, "\n\n".join(failures[:40]) + f"\n\n{len(failures)} failures in {total} cases"
