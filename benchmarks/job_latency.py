"""Job time of a full ranking against the same job at top_k 100, submit-to-running latency, and results-page
latency at shallow and deep page tokens, through a real `attrib serve` (and `attrib worker`) on both topologies.

    python -m benchmarks.job_latency [--jobs 20] [--pages 30] [--topologies embedded postgres]
    python -m benchmarks.job_latency --full-ranking [--repeats 3] [--topologies embedded postgres]

Topologies: ``embedded`` is `attrib serve` alone (SQLite database, SQLite broker polled by its local worker);
``postgres`` is `attrib serve` + one `attrib worker` on a private PostgreSQL schema and a redis-server of its own.

(a) MLP 64-256-256-10, 5,000 training examples, 100 queries, influence with EK-FAC (fitted in the job), pairwise:
    one job at top_k 100 and one at top_k 5,000 (a full ranking: 1,000,000 rows); job time = from submission
    until the client sees it succeeded (its rows committed), polling every 50 ms.
(b) ``--jobs`` small jobs (a tiny model, gradient similarity, top_k 5), one at a time on an idle worker:
    submit-to-running = started_at (the worker's claim) - created_at (the API's insert), p50/p99.
(c) results pages of the full ranking (page_size 100, positive direction), sequential requests: the first page,
    a token in the middle and a token at the last page, with and without query_id; p50/p99 client-side.
Writes benchmarks/results/job_latency.md. ``--full-ranking`` runs (a) alone, ``--repeats`` pairs of jobs (top_k 100,
then top_k 5,000) on each topology, and writes the medians and the median of the pairs' ratios to
benchmarks/results/full_ranking.md.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from benchmarks.common import mlp, teacher_data, write_keeping_earlier_runs
from service.pagination import RankCursor, encode_token
from tests.conftest import private_postgres_schema
from tests.loadgen import api_server, free_port

RESULTS = Path(__file__).parent / "results" / "job_latency.md"
FULL_RANKING_RESULTS = Path(__file__).parent / "results" / "full_ranking.md"
SIZES = [64, 256, 256, 10]
TINY = [4, 8, 3]
FULL_TOP_K = 5000


def architecture(sizes: list[int]) -> dict[str, Any]:
    layers: list[dict[str, Any]] = []
    for index, (inputs, outputs) in enumerate(itertools.pairwise(sizes)):
        layers.append({"type": "linear", "in_features": inputs, "out_features": outputs})
        if index < len(sizes) - 2:
            layers.append({"type": "relu"})
    return {"type": "sequential", "layers": layers}


class Client:
    def __init__(self, base_url: str, key: str) -> None:
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def model(self, sizes: list[int], seed: int) -> str:
        torch.manual_seed(seed)
        weights = save_safetensors({k: v.contiguous() for k, v in mlp(sizes).state_dict().items()})
        metadata = {
            "name": "bench",
            "format": "spec",
            "architecture": architecture(sizes),
            "task": {"loss": "cross_entropy"},
        }
        response = self.http.post(
            "/v1/models", data={"metadata": json.dumps(metadata)}, files={"weights": ("w.safetensors", weights)}
        )
        response.raise_for_status()
        return str(response.json()["id"])

    def dataset(self, inputs: np.ndarray, targets: np.ndarray) -> str:
        buffer = io.BytesIO()
        np.savez(buffer, inputs=inputs.astype(np.float32), targets=targets)
        response = self.http.post(
            "/v1/datasets",
            data={"metadata": json.dumps({"name": "bench"})},
            files={"data": ("d.npz", buffer.getvalue())},
        )
        response.raise_for_status()
        return str(response.json()["id"])

    def run(self, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], float]:
        """Submit and wait: the attribution, its finished job, and the seconds from submission until the client
        saw it succeeded (polling every 50 ms)."""
        started = time.perf_counter()
        response = self.http.post("/v1/attributions", json=body)
        response.raise_for_status()
        attribution = response.json()
        while (job := self.http.get(f"/v1/jobs/{attribution['job_id']}").json())["status"] in ("queued", "running"):
            time.sleep(0.05)
        assert job["status"] == "succeeded", job
        return attribution, job, time.perf_counter() - started


def seconds_between(job: dict[str, Any], start: str, end: str) -> float:
    return (datetime.fromisoformat(job[end]) - datetime.fromisoformat(job[start])).total_seconds()


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"{1000 * statistics.median(ordered):.0f} ms / {1000 * p99:.0f} ms"


def full_ranking_body(client: Client) -> dict[str, Any]:
    train, query = teacher_data(5000, 100)
    model = client.model(SIZES, 0)
    train_id = client.dataset(train.inputs.numpy(), train.targets.numpy())
    query_id = client.dataset(query.inputs.numpy(), query.targets.numpy())
    return {
        "model_id": model,
        "train_dataset_id": train_id,
        "query_dataset_id": query_id,
        "method": "influence",
        "mode": "pairwise",
        "options": {"strategy": "ekfac"},
    }


def timed_pair(client: Client, body: dict[str, Any]) -> tuple[float, float, str]:
    """One top_k 100 job, then the full ranking: both job times and the full ranking's attribution."""
    times = []
    full_attribution = ""
    for top_k in (100, FULL_TOP_K):
        attribution, job, seconds = client.run({**body, "top_k": top_k})
        times.append(seconds)
        full_attribution = attribution["id"]
        print(
            f"top_k {top_k}: submitted to succeeded {seconds:.2f} s (job's own started-finished "
            f"{seconds_between(job, 'started_at', 'finished_at'):.2f} s, without the commit of its rows)",
            flush=True,
        )
    return times[0], times[1], full_attribution


def full_ranking_vs_top_100(client: Client) -> tuple[list[str], str]:
    top_100, full, full_attribution = timed_pair(client, full_ranking_body(client))
    return [f"{top_100:.2f} s", f"{full:.2f} s", f"{full / top_100:.1f}×"], full_attribution


def full_ranking_repeats(client: Client, repeats: int) -> list[str]:
    """``repeats`` pairs (after a warm-up job): medians of each job time, the median ratio and the ratios."""
    body = full_ranking_body(client)
    client.run({**body, "top_k": 100})  # warm-up: imports and first-use costs out of the timed jobs
    pairs = [timed_pair(client, body)[:2] for _ in range(repeats)]
    ratios = [full / top_100 for top_100, full in pairs]
    return [
        f"{statistics.median(top_100 for top_100, _ in pairs):.2f} s",
        f"{statistics.median(full for _, full in pairs):.2f} s",
        f"{statistics.median(ratios):.2f}×",
        ", ".join(f"{ratio:.2f}" for ratio in ratios),
    ]


def submit_to_running(client: Client, jobs: int) -> str:
    rng = np.random.default_rng(0)
    model = client.model(TINY, 1)
    train = client.dataset(rng.normal(size=(30, 4)), rng.integers(0, 3, size=30))
    query = client.dataset(rng.normal(size=(4, 4)), rng.integers(0, 3, size=4))
    body = {
        "model_id": model,
        "train_dataset_id": train,
        "query_dataset_id": query,
        "method": "gradient_similarity",
        "mode": "pairwise",
        "top_k": 5,
    }
    client.run(body)  # warm-up: the worker's first job imports the rest of its code
    delays = []
    for _ in range(jobs):
        _, job, _ = client.run(body)
        delays.append(seconds_between(job, "created_at", "started_at"))
    print(f"submit-to-running: {delays}", flush=True)
    return percentiles(delays)


def page_latency(client: Client, attribution_id: str, pages: int) -> list[str]:
    cells = []
    for query_id in (None, "50"):
        for after in (None, RankCursor(50, 2500), RankCursor(99, 4800)):
            params: dict[str, Any] = {"direction": "positive", "page_size": 100}
            if query_id is not None:
                params["query_id"] = query_id
                if after is not None and after.query_pos != 50:
                    after = RankCursor(50, after.rank)
            if after is not None:
                params["page_token"] = encode_token(after)
            latencies = []
            for _ in range(pages):
                started = time.perf_counter()
                response = client.http.get(f"/v1/attributions/{attribution_id}/results", params=params)
                latencies.append(time.perf_counter() - started)
                assert response.status_code == 200 and len(response.json()["results"]) == 100, response.text
            cells.append(percentiles(latencies))
    return cells


@contextmanager
def embedded(workdir: Path) -> Iterator[tuple[str, str]]:
    env = {
        "ATTRIB_DATA_DIR": str(workdir / "data"),
        "ATTRIB_RATE_LIMIT_PER_SECOND": "1000000",
        "ATTRIB_RATE_LIMIT_BURST": "1000000",
    }
    with api_server(env, workdir / "server.log") as base_url:
        yield base_url, (workdir / "data" / "api-key").read_text().strip()


@contextmanager
def postgres_and_redis(workdir: Path) -> Iterator[tuple[str, str]]:
    from service.auth import create_api_key
    from service.db.migrate import upgrade_to_head
    from service.db.session import session_scope

    port = free_port()
    redis = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    schemas = ExitStack()
    url = schemas.enter_context(private_postgres_schema("attrib_bench"))
    env = {
        "ATTRIB_DATA_DIR": str(workdir / "data"),
        "ATTRIB_DATABASE_URL": url,
        "ATTRIB_BROKER_URL": f"redis://127.0.0.1:{port}/0",
        "ATTRIB_RATE_LIMIT_PER_SECOND": "1000000",
        "ATTRIB_RATE_LIMIT_BURST": "1000000",
    }
    worker = None
    try:
        upgrade_to_head(url)
        with session_scope(url) as session:
            key = create_api_key(session, f"bench-{uuid.uuid4().hex[:6]}")
        with open(workdir / "worker.log", "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "worker", "--loglevel=WARNING"],
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        with api_server(env, workdir / "server.log") as base_url:
            yield base_url, key
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        redis.kill()
        redis.wait()
        schemas.close()


TOPOLOGIES = {
    "embedded": ("SQLite", "SQLite broker (embedded default)", embedded),
    "postgres": ("PostgreSQL", "Redis", postgres_and_redis),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--pages", type=int, default=30)
    parser.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES), choices=list(TOPOLOGIES))
    parser.add_argument("--full-ranking", action="store_true", help="only the full ranking against top_k 100")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of jobs per topology with --full-ranking")
    args = parser.parse_args()
    if args.full_ranking:
        full_ranking_only(args.topologies, args.repeats)
        return
    jobs_table = [
        "| database | top_k 100 job, submitted to succeeded | full ranking (top_k 5,000: 1,000,000 rows) | ratio |",
        "| --- | --- | --- | --- |",
    ]
    queue_table = ["| broker | submit-to-running p50 / p99 |", "| --- | --- |"]
    pages_table = [
        "| database | query_id | first page | token at rank 2,500 of query 50 | token at the last page |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in args.topologies:
        database, broker, topology = TOPOLOGIES[name]
        with tempfile.TemporaryDirectory() as directory, ExitStack() as stack:
            base_url, key = stack.enter_context(topology(Path(directory)))
            client = Client(base_url, key)
            queue_table.append(f"| {broker} | {submit_to_running(client, args.jobs)} |")
            job_cells, attribution_id = full_ranking_vs_top_100(client)
            jobs_table.append(f"| {database} | {' | '.join(job_cells)} |")
            cells = page_latency(client, attribution_id, args.pages)
            pages_table.append(f"| {database} | none | {' | '.join(cells[:3])} |")
            pages_table.append(f'| {database} | "50" | {" | ".join(cells[3:])} |')
    body = "\n\n".join(["\n".join(table) for table in (jobs_table, queue_table, pages_table)])
    print(body)
    write_keeping_earlier_runs(
        RESULTS,
        f"# Job time, queue latency and results-page latency\n\n`python -m benchmarks.job_latency "
        f"{' '.join(sys.argv[1:])}`".rstrip()
        + f" on {platform.machine()} ({platform.python_version()}, "
        f"{os.cpu_count()} CPUs shared with other work, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
        f"), {time.strftime('%Y-%m-%d')}, one `attrib serve` and one worker process.\n\n{body}\n",
    )


def full_ranking_only(topologies: list[str], repeats: int) -> None:
    table = [
        "| database | top_k 100 job (median) | full ranking, top_k 5,000: 1,000,000 rows (median) | ratio (median) "
        "| ratios of the pairs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in topologies:
        database, _, topology = TOPOLOGIES[name]
        with tempfile.TemporaryDirectory() as directory, ExitStack() as stack:
            base_url, key = stack.enter_context(topology(Path(directory)))
            table.append(f"| {database} | {' | '.join(full_ranking_repeats(Client(base_url, key), repeats))} |")
    body = "\n".join(table)
    print(body)
    write_keeping_earlier_runs(
        FULL_RANKING_RESULTS,
        f"# Full ranking against top_k 100\n\n`python -m benchmarks.job_latency {' '.join(sys.argv[1:])}` on "
        f"{platform.machine()} ({platform.python_version()}, {os.cpu_count()} CPUs shared with other work, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), {time.strftime('%Y-%m-%d %H:%M')}, one "
        f"`attrib serve` and one worker process; job time = submission until the client sees it succeeded.\n\n{body}\n",
    )


if __name__ == "__main__":
    main()
