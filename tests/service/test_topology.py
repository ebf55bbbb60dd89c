"""The production stack of docker-compose.yml, started natively: no Docker engine runs on the test machines, so
the test reads the compose file and runs its services' commands with their environment — `attrib migrate`,
`attrib serve`, `attrib worker` for worker-gpu and worker-cpu — as subprocesses against real PostgreSQL (a
private schema) and a redis-server of the test's own on a free port. Only what names the containers' network
and volumes is adapted: the database and broker URLs, the data directory and the API's address.

Then: a fit and an attribution run through that topology; and the outbox guarantee — an `attrib serve` that is
SIGKILLed after committing a job and before publishing it loses no job.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import yaml
from sqlalchemy import select

from service.db.session import session_scope
from service.db.tables import Job
from service.queue import CeleryQueue
from tests.conftest import private_postgres_schema, require_server
from tests.loadgen import free_port, wait_until_healthy
from tests.service.conftest import tiny_classifier, tiny_dataset
from tests.service.test_job_faults import LIVENESS_ENV, RedisServer

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = {
    "type": "sequential",
    "layers": [
        {"type": "linear", "in_features": 4, "out_features": 8},
        {"type": "tanh"},
        {"type": "linear", "in_features": 8, "out_features": 3},
    ],
}


def compose_services() -> dict[str, Any]:
    with (ROOT / "docker-compose.yml").open() as file:
        services: dict[str, Any] = yaml.safe_load(file)["services"]
    return services


def interpolate(value: str) -> str:
    """Compose's ``${NAME:-default}`` as compose resolves it with NAME unset (the test sets no such variable)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def attrib_executable() -> list[str]:
    attrib = Path(sys.executable).with_name("attrib")
    return [str(attrib)] if attrib.exists() else [sys.executable, "-m", "service.cli"]


class Topology:
    """The compose file's services as native processes, on the test's database schema, broker and directory."""

    def __init__(self, tmp_path: Path, database_url: str, redis_server: RedisServer, **extra_env: str) -> None:
        self.services = compose_services()
        self.tmp_path, self.database_url, self.redis_server = tmp_path, database_url, redis_server
        self.extra_env = extra_env
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def env(self, service: str, **overrides: str) -> dict[str, str]:
        """The service's environment from the compose file, with the containers' hostnames and volume replaced."""
        env = {name: interpolate(str(value)) for name, value in self.services[service]["environment"].items()}
        assert urlsplit(env["ATTRIB_DATABASE_URL"]).hostname == "postgres"
        assert urlsplit(env["ATTRIB_BROKER_URL"]).hostname == "redis"
        assert f"blobs:{env['ATTRIB_DATA_DIR']}" in self.services[service]["volumes"]  # shared blob storage
        env.update(
            ATTRIB_DATABASE_URL=self.database_url,
            ATTRIB_BROKER_URL=self.redis_server.url,
            ATTRIB_DATA_DIR=str(self.tmp_path / "data"),
        )
        inherited = {name: value for name, value in os.environ.items() if not name.startswith("ATTRIB_")}
        return {**inherited, "OMP_NUM_THREADS": "1", **env, **self.extra_env, **overrides}

    def command(self, service: str, port: int | None = None) -> list[str]:
        """The service's command; `attrib` is this environment's, the API listens on 127.0.0.1:``port``."""
        command = [str(part) for part in self.services[service]["command"]]
        assert command[0] == "attrib"
        command[0:1] = attrib_executable()
        if "--host" in command:
            command[command.index("--host") + 1] = "127.0.0.1"
        if "--port" in command:
            container_port = command[command.index("--port") + 1]
            assert any(mapping.endswith(f":{container_port}") for mapping in self.services[service]["ports"])
            command[command.index("--port") + 1] = str(port)
        return command

    def run_once(self, service: str, *extra_args: str) -> str:
        done = subprocess.run(
            [*self.command(service), *extra_args], env=self.env(service), capture_output=True, timeout=120
        )
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        return done.stdout.decode()

    def create_key(self, tenant: str) -> str:
        """`attrib keys create` as an operator runs it in the api container (compose file's comment)."""
        done = subprocess.run(
            [*attrib_executable(), "keys", "create", "--tenant", tenant],
            env=self.env("api"),
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        return done.stdout.decode().strip()

    def start(self, service: str, **overrides: str) -> subprocess.Popen[bytes]:
        log = (self.tmp_path / f"{service}-{len(self.processes)}.log").open("wb")
        port = free_port() if "ports" in self.services[service] else None
        process = subprocess.Popen(
            self.command(service, port),
            env=self.env(service, **overrides),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[f"{service}-{len(self.processes)}"] = process
        if port is not None:
            self.api_url = f"http://127.0.0.1:{port}"
            wait_until_healthy(self.api_url, process, Path(log.name), timeout=60)
        return process

    def log(self, name: str, waiting_for: str, seconds: float = 30) -> str:
        """The log of a process once it holds ``waiting_for`` (a regular expression)."""
        deadline = time.monotonic() + seconds
        while re.search(waiting_for, text := (self.tmp_path / f"{name}.log").read_text(errors="replace")) is None:
            assert time.monotonic() < deadline, f"{name} never logged {waiting_for!r}: {text[-3000:]}"
            time.sleep(0.2)
        return text

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


@contextmanager
def topology(tmp_path: Path, **extra_env: str) -> Iterator[Topology]:
    require_server("PostgreSQL", 5432)
    redis_server = RedisServer(tmp_path)
    with private_postgres_schema("attrib_topology") as database_url:
        redis_server.start()
        stack = Topology(tmp_path, database_url, redis_server, **extra_env)
        try:
            stack.run_once("migrate")
            yield stack
        finally:
            stack.stop()
            redis_server.kill()


def upload_inputs(client: httpx.Client) -> dict[str, str]:
    from safetensors.torch import save as save_safetensors

    weights = save_safetensors({k: v.contiguous() for k, v in tiny_classifier().state_dict().items()})
    metadata = {"name": "m", "format": "spec", "architecture": ARCHITECTURE, "task": {"loss": "cross_entropy"}}
    model = client.post(
        "/v1/models", data={"metadata": json.dumps(metadata)}, files={"weights": ("w.safetensors", weights)}
    )
    assert model.status_code == 201, model.text
    ids = {"model_id": model.json()["id"]}
    for name, arrays in (("train", tiny_dataset(30, seed=1)), ("query", tiny_dataset(4, seed=2))):
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        dataset = client.post(
            "/v1/datasets",
            data={"metadata": json.dumps({"name": name})},
            files={"data": (f"{name}.npz", buffer.getvalue())},
        )
        assert dataset.status_code == 201, dataset.text
        ids[f"{name}_dataset_id"] = dataset.json()["id"]
    return ids


def wait_job(client: httpx.Client, job_id: str, seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, f"job not finished after {seconds} s: {job}"
        time.sleep(0.2)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in the metrics"
    return float(match.group(1))


def test_the_compose_stack_runs_a_fit_and_an_attribution(tmp_path: Path) -> None:
    with topology(tmp_path) as stack:
        key = stack.create_key("topology")
        stack.start("api")
        client = stack.client(key)
        inputs = upload_inputs(client)
        fit = client.post(
            "/v1/fits",
            json={"model_id": inputs["model_id"], "dataset_id": inputs["train_dataset_id"], "strategy": "ekfac"},
        )
        assert fit.status_code == 202, fit.text

        # before any worker runs: the fit waits in the gpu queue, as /metrics (with the compose file's token) says
        token = stack.env("api")["ATTRIB_METRICS_TOKEN"]
        metrics = httpx.get(f"{stack.api_url}/metrics", headers={"Authorization": f"Bearer {token}"}).text
        assert metric(metrics, 'attrib_queue_messages{queue="gpu"}') == 1.0
        assert metric(metrics, 'attrib_queue_messages{queue="cpu"}') == 0.0

        gpu_worker, cpu_worker = stack.start("worker-gpu"), stack.start("worker-cpu")
        assert wait_job(client, fit.json()["job_id"], 60)["status"] == "succeeded"
        attribution = client.post(
            "/v1/attributions",
            json={
                "model_id": inputs["model_id"],
                "train_dataset_id": inputs["train_dataset_id"],
                "query_dataset_id": inputs["query_dataset_id"],
                "method": "influence",
                "fit_id": fit.json()["id"],
                "top_k": 3,
            },
        )
        assert attribution.status_code == 202, attribution.text
        assert wait_job(client, attribution.json()["job_id"], 60)["status"] == "succeeded"
        page = client.get(f"/v1/attributions/{attribution.json()['id']}/results", params={"page_size": 100})
        assert page.status_code == 200 and len(page.json()["results"]) == 4 * 3

        gpu_log = stack.log("worker-gpu-1", "attrib worker ready: queues gpu, concurrency 1")
        cpu_log = stack.log("worker-cpu-2", "attrib worker ready: queues cpu, concurrency 2")
        # each pool process chose its device (no GPU here: the CPU); none of them is the worker's parent
        pool_pids = {int(pid) for pid in re.findall(r"attrib pool process (\d+) \(index 0\) runs jobs on cpu", gpu_log)}
        assert pool_pids and gpu_worker.pid not in pool_pids
        # pool processes are told apart by Celery's index: GPU i mod count goes to pool process i
        indexes = re.findall(r"attrib pool process \d+ \(index (\d+)\) runs jobs on cpu", cpu_log)
        assert sorted(indexes) == ["0", "1"]
        assert cpu_worker.poll() is None and gpu_worker.poll() is None


def test_an_api_killed_between_commit_and_publish_loses_no_job(tmp_path: Path) -> None:
    with topology(tmp_path, **LIVENESS_ENV) as stack:
        key = stack.create_key("outbox")
        doomed = stack.start("api", ATTRIB_FAULT_KILL_BEFORE_PUBLISH="true")
        client = stack.client(key)
        inputs = upload_inputs(client)  # uploads publish nothing
        with pytest.raises(httpx.TransportError):  # the API dies while answering
            client.post("/v1/attributions", json={**inputs, "method": "gradient_similarity", "top_k": 3})
        assert doomed.wait(timeout=30) == -signal.SIGKILL
        with session_scope(stack.database_url) as session:
            jobs = list(session.scalars(select(Job)))
            assert [(job.kind, job.status) for job in jobs] == [("attribution", "queued")]  # committed ...
            job_id = jobs[0].id
        assert CeleryQueue(stack.redis_server.url).backlog() == 0  # ... and never published

        stack.start("api")  # a fresh API and a worker: their reapers publish the job, the worker runs it
        stack.start("worker-gpu")
        client = stack.client(key)
        assert wait_job(client, job_id, 60)["status"] == "succeeded"


def test_the_compose_file_and_dockerfile_describe_the_production_stack() -> None:
    services = compose_services()
    assert {"postgres", "redis", "migrate", "api", "worker-gpu", "worker-cpu"} <= set(services)
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["redis"]
    for name in ("api", "worker-gpu", "worker-cpu"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    gpu = services["worker-gpu"]
    assert gpu["command"][:4] == ["attrib", "worker", "--queues", "gpu"]
    assert services["worker-cpu"]["command"][:4] == ["attrib", "worker", "--queues", "cpu"]
    [reservation] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert reservation["driver"] == "nvidia" and reservation["capabilities"] == ["gpu"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)$", dockerfile, re.MULTILINE)
    assert stages == ["build", "runtime"]
    runtime = dockerfile.split("AS runtime", 1)[1]
    users = re.findall(r"^USER (\S+)$", runtime, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
