"""Admission control: at most ``max_in_flight`` requests inside the app, a bounded wait for the rest, then 503.

The API's routes are synchronous: each admitted request runs on one of ``api_threads`` worker threads and holds at
most one database connection at a time, and the connection pool is sized above the number of admitted requests
(see ``Settings.resolved_db_pool_size``). Admitting no more requests than there are threads and connections means
a request never waits for a connection while holding a thread (the lock-up that an unbounded server reaches under
load); excess load waits here, in the event loop, where waiting costs nothing, and is refused with
``503 Service Unavailable`` + ``Retry-After`` once the wait queue is full or the wait too long.

``/healthz`` bypasses admission and is answered by the event loop, so liveness probes answer under any load.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from starlette.types import ASGIApp, Receive, Scope, Send

from service.problems import problem_response

BYPASS_PATHS = frozenset({"/healthz"})


class Overloaded(Exception):
    """No slot became free in time, or too many requests are already waiting."""


class AdmissionGate:
    """A FIFO semaphore with a bounded number of waiters and a bounded wait (one per event loop)."""

    def __init__(self, slots: int, max_waiting: int, timeout_seconds: float) -> None:
        self.free = slots
        self.max_waiting = max_waiting
        self.timeout_seconds = timeout_seconds
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return
        if len(self.waiters) >= self.max_waiting:
            raise Overloaded()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.timeout_seconds)
        except BaseException as exc:  # a timeout, or the request's task was cancelled
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot arrived just as the wait ended: pass it on
            else:
                waiter.cancel()
                self.waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise Overloaded() from None
            raise

    def release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the oldest waiter
                return
        self.free += 1


class AdmissionControl:
    def __init__(self, app: ASGIApp, max_in_flight: int, max_waiting: int, wait_seconds: float) -> None:
        self.app = app
        self.gate = AdmissionGate(max_in_flight, max_waiting, wait_seconds)
        self.retry_after = str(max(1, math.ceil(wait_seconds)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in BYPASS_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            await self.gate.acquire()
        except Overloaded:
            response = problem_response(
                503,
                "the service is at capacity; retry after the time in Retry-After",
                kind="overloaded",
                title="Service Unavailable",
                instance=scope.get("path"),
                headers={"Retry-After": self.retry_after},
            )
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.release()
