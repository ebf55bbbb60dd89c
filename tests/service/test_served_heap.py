"""`attrib serve` freezes the objects its start-up allocated (`service.app.freeze_startup_heap`): while the app
serves they are out of the garbage collector's view, so no full collection walks them with the event loop
stopped; a test's or an embedding application's app leaves the collector as it is."""

from __future__ import annotations

import gc
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import InlineQueue, make_settings, migrate


def test_a_served_app_freezes_its_start_up_heap_while_it_serves_and_only_then(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, None)
    migrate(settings)
    assert gc.get_freeze_count() == 0
    with TestClient(create_app(settings, queue=InlineQueue(settings))) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() == 0  # the default: nothing frozen
    with TestClient(create_app(settings, queue=InlineQueue(settings), freeze_heap=True)) as client:
        assert client.get("/healthz").status_code == 200
        frozen = gc.get_freeze_count()
        assert frozen > 100_000  # the libraries' objects, torch's among them
        gc.collect()  # a full collection no longer walks them
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0  # handed back when the app stops
