"""End to end: `attrib serve` as a subprocess (SQLite, local files, its own worker), driven over HTTP."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.torch import save as save_safetensors

from tests.loadgen import free_port, wait_until_healthy
from tests.service.conftest import MLP_ARCHITECTURE, tiny_classifier, tiny_dataset


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@contextmanager
def serving(tmp_path: Path) -> Iterator[tuple[httpx.Client, subprocess.Popen[bytes], Path]]:
    """`attrib serve` on a free port (its output in a log file); yields an authorised client, the process, the log."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTRIB_")}
    env["ATTRIB_DATA_DIR"] = str(tmp_path / "data")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env, stdout=log, stderr=log
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until_healthy(base_url, server, log_path, timeout=60)
        with httpx.Client(base_url=base_url, timeout=30) as client:
            key = (tmp_path / "data" / "api-key").read_text().strip()
            client.headers["Authorization"] = f"Bearer {key}"
            yield client, server, log_path
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise


def run_tiny_job(client: httpx.Client) -> tuple[dict[str, Any], dict[str, Any]]:
    """Upload a tiny model and data, attribute, wait; returns the attribution and its finished job."""
    metadata = {"name": "m", "format": "spec", "architecture": MLP_ARCHITECTURE, "task": {"loss": "cross_entropy"}}
    weights = save_safetensors({k: v.contiguous() for k, v in tiny_classifier().state_dict().items()})
    model = client.post(
        "/v1/models", data={"metadata": json.dumps(metadata)}, files={"weights": ("w.safetensors", weights)}
    ).json()
    train = client.post(
        "/v1/datasets",
        data={"metadata": json.dumps({"name": "t"})},
        files={"data": ("t.npz", npz(**tiny_dataset(40, seed=1)))},
    ).json()
    query = client.post(
        "/v1/datasets",
        data={"metadata": json.dumps({"name": "q"})},
        files={"data": ("q.npz", npz(**tiny_dataset(3, seed=2)))},
    ).json()
    attribution = client.post(
        "/v1/attributions",
        json={
            "model_id": model["id"],
            "train_dataset_id": train["id"],
            "query_dataset_id": query["id"],
            "method": "influence",
            "top_k": 4,
        },
    ).json()
    assert "job_id" in attribution, attribution
    deadline = time.monotonic() + 120
    while (job := client.get(f"/v1/jobs/{attribution['job_id']}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return attribution, job


def children(pid: int, command_part: bytes = b"") -> list[int]:
    """The pids of ``pid``'s live children whose command line contains ``command_part``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and command_part in command:
            found.append(int(stat.parent.name))
    return found


def embedded_worker_pids(server_pid: int) -> list[int]:
    """The pids of `attrib serve`'s worker processes (its children running the embedded worker)."""
    return children(server_pid, b"service.embedded_worker")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.e2e
def test_serve_runs_a_job_to_ranked_results(tmp_path: Path) -> None:
    with serving(tmp_path) as (client, server, _):
        assert "/v1/attributions" in client.get("/openapi.json").json()["paths"]
        attribution, job = run_tiny_job(client)
        assert job["status"] == "succeeded", job
        rows = client.get(f"/v1/attributions/{attribution['id']}/results", params={"page_size": 100}).json()
        assert len(rows["results"]) == 3 * 4
        assert rows["results"][0]["rank"] == 1
        assert client.get("/readyz").status_code == 200
        assert client.get("/metrics").status_code == 404  # off: no operator token was set
        workers = embedded_worker_pids(server.pid) if sys.platform == "linux" else []
        worker_processes = workers + [child for pid in workers for child in children(pid)]
    # stopped (SIGINT) while idle: the worker and its pool process are gone with it
    assert not [pid for pid in worker_processes if alive(pid)]


@pytest.mark.skipif(sys.platform != "linux", reason="finds the worker process through /proc")
@pytest.mark.e2e
def test_serve_starts_another_worker_when_its_worker_is_killed(tmp_path: Path) -> None:
    """A worker that dies (here SIGKILL, as from the OOM killer) must not leave every later job queued forever."""
    with serving(tmp_path) as (client, server, log_path):
        deadline = time.monotonic() + 60
        while not (workers := embedded_worker_pids(server.pid)):
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        os.kill(workers[0], signal.SIGKILL)
        _, job = run_tiny_job(client)
        assert job["status"] == "succeeded", (job, log_path.read_text())
        assert f"the worker (pid {workers[0]}) exited with code -9" in log_path.read_text()
        assert embedded_worker_pids(server.pid) not in ([], workers)
