"""A real `attrib serve` (SQLite, local files, its own worker) per test module, and the SDK pointed at it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.service.test_embedded_serve import free_port


@dataclass(frozen=True)
class Served:
    url: str
    data_dir: Path
    key: str

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a client process: no ATTRIB_* from outside, this server's URL and data dir."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATTRIB_")}
        return env | {"ATTRIB_URL": self.url, "ATTRIB_DATA_DIR": str(self.data_dir)} | extra


def wait_until_up(server: subprocess.Popen[bytes], url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, server.stdout.read().decode()  # type: ignore[union-attr]
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "attrib serve did not start"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data_dir = tmp_path_factory.mktemp("served") / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTRIB_")}
    env |= {"ATTRIB_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, url)
        yield Served(url=url, data_dir=data_dir, key=(data_dir / "api-key").read_text().strip())
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def client_env(served: Served, monkeypatch: pytest.MonkeyPatch) -> Served:
    """The SDK's configuration from the environment, as a user would have it."""
    for name in [n for n in os.environ if n.startswith("ATTRIB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ATTRIB_URL", served.url)
    monkeypatch.setenv("ATTRIB_DATA_DIR", str(served.data_dir))
    return served
