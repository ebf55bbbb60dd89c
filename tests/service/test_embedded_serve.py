"""End to end: `attrib serve` as a subprocess (SQLite, local files, its own worker), driven over HTTP."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.torch import save as save_safetensors

from tests.service.conftest import MLP_ARCHITECTURE, tiny_classifier, tiny_dataset


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.e2e
def test_serve_runs_a_job_to_ranked_results(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTRIB_")}
    env["ATTRIB_DATA_DIR"] = str(tmp_path / "data")
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                assert server.poll() is None, server.communicate()[0].decode()
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "attrib serve did not start"
                time.sleep(0.2)
            key = (tmp_path / "data" / "api-key").read_text().strip()
            client.headers["Authorization"] = f"Bearer {key}"
            assert "/v1/attributions" in client.get("/openapi.json").json()["paths"]
            metadata = {
                "name": "m",
                "format": "spec",
                "architecture": MLP_ARCHITECTURE,
                "task": {"loss": "cross_entropy"},
            }
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
            assert job["status"] == "succeeded", job
            rows = client.get(f"/v1/attributions/{attribution['id']}/results", params={"page_size": 100}).json()
            assert len(rows["results"]) == 3 * 4
            assert rows["results"][0]["rank"] == 1
            assert client.get("/readyz").status_code == 200
            assert client.get("/metrics").status_code == 404  # off: no operator token was set
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
