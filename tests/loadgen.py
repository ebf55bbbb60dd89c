"""A bounded load generator and an `attrib serve` process, shared by the load test and the latency benchmark.

Load only ever goes to 127.0.0.1, for a fixed time with a fixed number of requests in flight, and stops by itself.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import uvloop


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def api_server(env_overrides: dict[str, str], log_path: Path, *serve_args: str) -> Iterator[str]:
    """`attrib serve` in a subprocess with the given ATTRIB_* settings (and options); yields its base URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTRIB_")}
    env.update(env_overrides)
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port), *serve_args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(base_url, server, log_path)
            yield base_url
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def wait_until_healthy(base_url: str, server: subprocess.Popen[bytes], log_path: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not become healthy")
        time.sleep(0.2)


@dataclass
class LoadReport:
    in_flight: int
    seconds: float
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # of 200 answers, seconds
    healthz_latencies: list[float] = field(default_factory=list)
    healthz_failures: int = 0
    quantiles: dict[int, float] = field(default_factory=dict)  # from wrk: seconds
    client_cpu_seconds: float = float("nan")  # the open-loop generator's own CPU time, its process's

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + sum(self.transport_errors.values())

    def failed(self, allowed: frozenset[int] = frozenset({200, 429, 503})) -> int:
        """Requests that got neither an allowed status nor any answer at all."""
        return sum(n for status, n in self.statuses.items() if status not in allowed) + sum(
            self.transport_errors.values()
        )

    def percentile(self, q: int) -> float:
        if q in self.quantiles:
            return self.quantiles[q]
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def summary(self) -> str:
        healthz = max(self.healthz_latencies, default=float("nan"))
        return (
            f"{self.in_flight} in flight, {self.seconds:.0f} s: {self.requests} requests "
            f"({self.requests / self.seconds:.0f}/s), statuses {dict(self.statuses)}, "
            f"transport errors {dict(self.transport_errors)}, p50 {1000 * self.percentile(50):.0f} ms, "
            f"p99 {1000 * self.percentile(99):.0f} ms; /healthz max {1000 * healthz:.0f} ms, "
            f"{self.healthz_failures} failed; client CPU {1e6 * self.client_cpu_seconds / max(self.requests, 1):.0f} µs "
            "a request"
        )


async def _reader(client: httpx.AsyncClient, paths: list[str], stop_at: float, report: LoadReport, seed: int) -> None:
    index = seed
    while time.monotonic() < stop_at:
        path = paths[index % len(paths)]
        index += 1
        started = time.perf_counter()
        try:
            response = await client.get(path)
        except httpx.TransportError as exc:
            report.transport_errors[type(exc).__name__] += 1
            continue
        report.statuses[response.status_code] += 1
        if response.status_code == 200:
            report.latencies.append(time.perf_counter() - started)
        elif response.status_code in (429, 503):
            await asyncio.sleep(min(float(response.headers.get("retry-after", "1")), 1.0))


def _probe(base_url: str, seconds: float, interval: float, results: Any) -> None:
    """/healthz every ``interval`` seconds for ``seconds``, from its own process and connection: neither queued
    behind the load nor waiting for the load generator's GIL, so what it measures is the server's answer time.
    Puts "ready" on ``results`` once started, then (latencies, failures)."""
    latencies: list[float] = []
    failures = 0
    results.put("ready")  # started and imported: from now on this process costs the machine only its probes
    stop_at = time.monotonic() + seconds
    with httpx.Client(base_url=base_url, timeout=5) as client:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                ok = client.get("/healthz").status_code == 200
            except httpx.TransportError:
                ok = False
            latencies.append(time.perf_counter() - started)
            failures += not ok
            time.sleep(interval)
    results.put((latencies, failures))


@contextmanager
def healthz_probe(base_url: str, seconds: float, report: LoadReport, interval: float = 0.1) -> Iterator[None]:
    """Probe /healthz from a separate process while the body runs; its figures land in ``report``."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    prober = context.Process(target=_probe, args=(base_url, seconds, interval, results), daemon=True)
    prober.start()
    try:
        if results.get(timeout=60) != "ready":  # the load starts once the probe's own start-up is over
            raise RuntimeError("the /healthz probe did not start")
        yield
        latencies, failures = results.get(timeout=seconds + 60)
        report.healthz_latencies.extend(latencies)
        report.healthz_failures += failures
    finally:
        prober.join(timeout=10)
        if prober.is_alive():
            prober.kill()


async def run_load_async(
    base_url: str,
    paths: list[str],
    headers: dict[str, str],
    in_flight: int,
    seconds: float,
) -> LoadReport:
    report = LoadReport(in_flight=in_flight, seconds=seconds)
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=60) as client:
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(_reader(client, paths, stop_at, report, seed) for seed in range(in_flight)))
    return report


def run_load(base_url: str, paths: list[str], headers: dict[str, str], in_flight: int, seconds: float) -> LoadReport:
    report = LoadReport(in_flight=in_flight, seconds=seconds)
    with healthz_probe(base_url, seconds, report):
        loaded = asyncio.run(run_load_async(base_url, paths, headers, in_flight, seconds))
    loaded.healthz_latencies, loaded.healthz_failures = report.healthz_latencies, report.healthz_failures
    return loaded


class HttpConnection:
    """One keep-alive HTTP/1.1 connection of the open-loop generator: a pre-encoded GET out, the status and body
    in. Hand-written so that a request costs the generator about 0.3 ms of its core, event loop included (measured:
    `LoadReport.client_cpu_seconds`); with httpx the generator itself saturated at 200 requests/s on two cores
    shared with the server. The generator must not be what saturates at the rate it offers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def get(self, request: bytes) -> tuple[int, bool]:
        """Send ``request`` and read its answer: (status, whether the connection can carry another)."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        fields = dict(line.split(":", 1) for line in header_lines if ":" in line)
        fields = {name.strip().lower(): value.strip().lower() for name, value in fields.items()}
        if "content-length" in fields:
            await self.reader.readexactly(int(fields["content-length"]))
        elif fields.get("transfer-encoding") == "chunked":
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await self.reader.readexactly(size + 2)
            await self.reader.readuntil(b"\r\n")  # no trailers: the empty line after the last chunk
        else:
            raise ValueError("an answer with neither Content-Length nor chunked framing")
        return status, fields.get("connection") != "close"

    def close(self) -> None:
        self.writer.close()


def get_requests(base_url: str, paths: list[str], headers: dict[str, str]) -> tuple[str, int, list[bytes]]:
    """(host, port, one encoded GET per path) for ``base_url`` (plain http)."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or parts.hostname is None or parts.port is None:
        raise ValueError(f"the open-loop generator needs http://host:port, not {base_url!r}")
    lines = "".join(f"{name}: {value}\r\n" for name, value in {"Host": parts.netloc, **headers}.items())
    return parts.hostname, parts.port, [f"GET {path} HTTP/1.1\r\n{lines}\r\n".encode() for path in paths]


async def run_rate_async(
    base_url: str,
    paths: list[str],
    headers: dict[str, str],
    rate: float,
    seconds: float,
    max_outstanding: int = 256,
    timeout: float = 60,
) -> LoadReport:
    """An open-loop load: a request every 1/``rate`` seconds whatever the answers (at most ``max_outstanding``
    unanswered, each on a keep-alive connection of its own while it waits), each request's latency counted from
    when it was due, so a stalled server is charged for the requests it delayed (no coordinated omission).
    ``in_flight`` in the report holds the outstanding bound."""
    report = LoadReport(in_flight=max_outstanding, seconds=seconds)
    host, port, requests = get_requests(base_url, paths, headers)
    outstanding = asyncio.Semaphore(max_outstanding)
    idle: list[HttpConnection] = []

    async def one(request: bytes, due: float) -> None:
        async with outstanding:
            connection: HttpConnection | None = None
            try:
                async with asyncio.timeout(timeout):
                    connection = idle.pop() if idle else await HttpConnection.open(host, port)
                    status, reusable = await connection.get(request)
            except (OSError, EOFError, ValueError, TimeoutError) as exc:
                report.transport_errors[type(exc).__name__] += 1
                if connection is not None:
                    connection.close()
                return
            if reusable:
                idle.append(connection)
            else:
                connection.close()
            report.statuses[status] += 1
            if status == 200:
                report.latencies.append(time.perf_counter() - due)

    start, sent = time.perf_counter(), []
    for index in range(int(rate * seconds)):
        due = start + index / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        sent.append(asyncio.create_task(one(requests[index % len(requests)], due)))
    await asyncio.gather(*sent)
    for connection in idle:
        connection.close()
    return report


def run_rate(base_url: str, paths: list[str], headers: dict[str, str], rate: float, seconds: float) -> LoadReport:
    probed = LoadReport(in_flight=0, seconds=seconds)
    with healthz_probe(base_url, seconds, probed), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        started = time.process_time()
        report = runner.run(run_rate_async(base_url, paths, headers, rate, seconds))
        report.client_cpu_seconds = time.process_time() - started
    report.healthz_latencies, report.healthz_failures = probed.healthz_latencies, probed.healthz_failures
    return report


WRK_SCRIPT = """
paths = {}
counter = 0
function init(args) for i, p in ipairs(args) do paths[i] = p end end
function request()
  counter = counter + 1
  return wrk.format("GET", paths[(counter % #paths) + 1])
end
done = function(summary, latency, requests)
  io.write(string.format("WRK %d %d %d %d %d %d %d\\n", summary.requests, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def run_wrk(base_url: str, paths: list[str], headers: dict[str, str], in_flight: int, seconds: float) -> LoadReport:
    """The same bounded load from `wrk` (a C load generator: the client's cost stays small beside the server's),
    with /healthz probed from another process meanwhile. Non-2xx answers are counted together under status 0."""
    import subprocess
    import tempfile

    report = LoadReport(in_flight=in_flight, seconds=seconds)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    command = [
        "wrk",
        f"-t{min(2, in_flight)}",
        f"-c{in_flight}",
        f"-d{int(seconds)}s",
        "--timeout",
        "30s",
        "-s",
        script.name,
        *(arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")),
        base_url,
        "--",
        *paths,
    ]
    with healthz_probe(base_url, seconds, report):
        output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    os.unlink(script.name)
    line = next(line for line in output.splitlines() if line.startswith("WRK "))
    requests, non_2xx, socket_errors, timeouts, p50, p99, _ = (int(v) for v in line.split()[1:])
    report.statuses[200] = requests - non_2xx
    report.statuses[0] = non_2xx
    report.transport_errors["socket"] = socket_errors
    report.transport_errors["timeout"] = timeouts
    report.quantiles = {50: p50 / 1e6, 99: p99 / 1e6}
    return report
