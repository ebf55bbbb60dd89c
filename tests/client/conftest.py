"""A real `attrib serve` (SQLite, local files, its own worker) per test module, and the SDK pointed at it."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.loadgen import api_server


@dataclass(frozen=True)
class Served:
    url: str
    data_dir: Path
    key: str
    log_path: Path

    def log_tail(self, characters: int = 4000) -> str:
        """The end of the server's output (its worker's included), for a failing test's message."""
        return self.log_path.read_text(errors="replace")[-characters:]

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a client process: no ATTRIB_* from outside, this server's URL and data dir."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATTRIB_")}
        return env | {"ATTRIB_URL": self.url, "ATTRIB_DATA_DIR": str(self.data_dir)} | extra


@pytest.fixture(scope="session")
def stopping_servers() -> Iterator[list[threading.Thread]]:
    """The threads stopping the modules' servers: the session waits for them at its end."""
    threads: list[threading.Thread] = []
    yield threads
    for thread in threads:
        thread.join()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, stopping_servers: list[threading.Thread]) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("served")
    data_dir = base / "data"
    server = ExitStack()
    url = server.enter_context(
        api_server({"ATTRIB_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}, base / "server.log")
    )
    try:
        key = (data_dir / "api-key").read_text().strip()
        yield Served(url=url, data_dir=data_dir, key=key, log_path=base / "server.log")
    finally:
        # `attrib serve` takes seconds to stop, mostly its Celery worker's warm shutdown waiting out poll
        # intervals: it stops while the next tests run (its own data directory, its own port)
        stopper = threading.Thread(target=server.close, name=f"stop {url}")
        stopper.start()
        stopping_servers.append(stopper)


@pytest.fixture
def client_env(served: Served, monkeypatch: pytest.MonkeyPatch) -> Served:
    """The SDK's configuration from the environment, as a user would have it."""
    for name in [n for n in os.environ if n.startswith("ATTRIB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ATTRIB_URL", served.url)
    monkeypatch.setenv("ATTRIB_DATA_DIR", str(served.data_dir))
    return served
