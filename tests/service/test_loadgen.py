"""The open-loop load generator that the results-latency benchmark relies on: it sends what it is asked to, at
the rate asked, reads both kinds of HTTP/1.1 framing, and counts what goes wrong instead of hiding it."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

from tests.loadgen import run_rate_async


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn answers
    seen: ClassVar[Counter[str]] = Counter()  # path -> requests
    keys: ClassVar[Counter[str]] = Counter()  # Authorization header -> requests

    def do_GET(self) -> None:
        Handler.seen[self.path] += 1
        Handler.keys[self.headers.get("authorization", "")] += 1
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b'{"results": ', b"[1, 2, 3]", b"}"):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/gone":
            self.send_response(404)
            self.send_header("Content-Length", "2")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"no")
            self.close_connection = True
        else:
            body = b'{"results": []}' * 100
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def local_server() -> Iterator[str]:
    Handler.seen.clear()
    Handler.keys.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_open_loop_sends_every_request_in_turn_and_reads_both_framings() -> None:
    paths = ["/page?a=1", "/chunked", "/gone"]
    with local_server() as base_url:
        report = asyncio.run(run_rate_async(base_url, paths, {"Authorization": "Bearer k"}, rate=150, seconds=1))
    assert report.requests == 150
    assert report.statuses == Counter({200: 100, 404: 50})
    assert not report.transport_errors
    assert len(report.latencies) == 100 and all(0 < latency < 5 for latency in report.latencies)
    assert Handler.seen == Counter({"/page?a=1": 50, "/chunked": 50, "/gone": 50})
    assert Handler.keys == Counter({"Bearer k": 150})


def test_a_server_that_is_not_there_is_counted_as_transport_errors() -> None:
    with local_server() as base_url:
        pass  # shut down: nothing listens on its port any more
    report = asyncio.run(run_rate_async(base_url, ["/"], {}, rate=20, seconds=0.5))
    assert report.requests == 10
    assert sum(report.transport_errors.values()) == 10 and not report.statuses
