"""Results-page latency of a real `attrib serve` process at 64 and 256 requests in flight, SQLite and PostgreSQL.

    python -m benchmarks.results_latency [--seconds 20] [--in-flight 64 256] [--backends sqlite postgres]
    python -m benchmarks.results_latency --rate 200 --backends postgres --workers 2   # open loop, 200 requests/s

Each run: a tenant with a finished attribution (20 queries × top 100 each way), then a bounded load of results
pages (100 rows each, all 40 query/direction pages in turn) for a fixed time from `wrk` (Debian package `wrk`: a C
load generator, so that the client's own cost stays small beside the server's on the same 2 cores), while a
separate process probes /healthz every 100 ms. Rate limits are lifted so that the server, not the per-key budget, is what
is measured. Reports requests/s, non-2xx answers, socket errors, p50/p99 and the slowest /healthz. Writes
benchmarks/results/results_latency.md. With ``--rate``, an open-loop generator (tests/loadgen.py ``run_rate``:
keep-alive connections written to and read by hand on uvloop, about 0.3 ms of the client's core per request; with
httpx the client itself saturated these two cores at 200 requests/s, p50 3.5 s against 5 ms on the same host) sends
that many requests per second instead, each latency counted from when its request was due, and the table (``in
flight`` = the bound on unanswered requests) goes to benchmarks/results/results_latency_rate.md.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from contextlib import ExitStack
from pathlib import Path

from benchmarks.common import write_keeping_earlier_runs
from tests.conftest import REDIS_URL, private_postgres_schema
from tests.loadgen import LoadReport, api_server, run_load, run_rate, run_wrk
from tests.service.test_load import results_pages

RESULTS = Path(__file__).parent / "results" / "results_latency.md"


def measure(
    backend: str,
    in_flight: list[int],
    seconds: float,
    workdir: Path,
    processes: int,
    settings: dict[str, str],
    rate: float | None = None,
) -> list[tuple[str, LoadReport]]:
    with ExitStack() as stack:
        if backend == "postgres":
            url = stack.enter_context(private_postgres_schema("attrib_bench"))
        else:
            url = f"sqlite:///{workdir / 'bench.sqlite'}"
        paths, headers, env = results_pages(workdir / "data", url)
        env = {
            **env,
            "ATTRIB_BROKER_URL": REDIS_URL,
            "ATTRIB_RATE_LIMIT_PER_SECOND": "1000000",
            "ATTRIB_RATE_LIMIT_BURST": "1000000",
            **settings,
        }
        reports = []
        with api_server(env, workdir / "server.log", "--workers", str(processes)) as base_url:
            run_load(base_url, paths, headers, 8, 3)  # warm-up
            if rate is not None:  # open loop at a fixed rate
                report = run_rate(base_url, paths, headers, rate, seconds)
                print(f"{backend} at {rate:g} requests/s: {report.summary()}", flush=True)
                reports.append((backend, report))
            for count in in_flight if rate is None else []:
                report = run_wrk(base_url, paths, headers, count, seconds)
                print(f"{backend}: {report.summary()}", flush=True)
                reports.append((backend, report))
        return reports


def table(reports: list[tuple[str, LoadReport]]) -> str:
    lines = [
        "| database | in flight | requests/s | requests | non-2xx | socket errors | p50 | p99 | slowest /healthz |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for backend, r in reports:
        non_2xx = sum(n for status, n in r.statuses.items() if status != 200)
        lines.append(
            f"| {backend} | {r.in_flight} | {r.requests / r.seconds:.0f} | {r.requests} | {non_2xx} | "
            f"{sum(r.transport_errors.values())} | {1000 * r.percentile(50):.1f} ms | "
            f"{1000 * r.percentile(99):.1f} ms | {1000 * max(r.healthz_latencies):.0f} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    parser.add_argument("--workers", type=int, default=1, help="API processes (`attrib serve --workers`)")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="open loop: this many requests/s (latency from each request's due time) instead of wrk's closed loop",
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="ATTRIB_NAME=VALUE", help="server settings")
    args = parser.parse_args()
    reports = []
    for backend in args.backends:
        with tempfile.TemporaryDirectory() as workdir:
            reports += measure(
                backend,
                args.in_flight,
                args.seconds,
                Path(workdir),
                args.workers,
                dict(item.split("=", 1) for item in args.set),
                args.rate,
            )
    body = table(reports)
    print(body)
    mode = f" --rate {args.rate:g}" if args.rate is not None else ""
    target = RESULTS if args.rate is None else RESULTS.with_name("results_latency_rate.md")
    write_keeping_earlier_runs(
        target,
        f"# Results-page latency\n\n`python -m benchmarks.results_latency{mode} --seconds {args.seconds:g} --workers "
        f"{args.workers}{' --set ' + ' '.join(args.set) if args.set else ''}` on {platform.machine()} ({platform.python_version()}), `attrib serve --workers "
        f"{args.workers}` with {'these' if args.set else 'the default'} capacity settings, {'`wrk`' if args.rate is None else 'the open-loop generator'} on the same "
        f"machine.\n\n{body}\n",
    )


if __name__ == "__main__":
    main()
