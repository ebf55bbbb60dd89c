"""Request limits checked before any work: body size (while the body streams in) and JSON nesting depth."""

from __future__ import annotations

import contextlib
import re

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.problems import FieldError, ProblemError, problem_response

MAX_JSON_DEPTH = 32
_STRING_LITERAL = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPENERS = np.frombuffer(b"[{", dtype=np.uint8)
_CLOSERS = np.frombuffer(b"]}", dtype=np.uint8)


def json_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text (0 for a scalar), without parsing it."""
    structural = np.frombuffer(_STRING_LITERAL.sub(b"", raw), dtype=np.uint8)
    steps = np.isin(structural, _OPENERS).astype(np.int64) - np.isin(structural, _CLOSERS).astype(np.int64)
    return int(np.cumsum(steps).max(initial=0))


def check_json_depth(raw: bytes | str, field: str) -> None:
    depth = json_depth(raw.encode() if isinstance(raw, str) else raw)
    if depth > MAX_JSON_DEPTH:
        raise ProblemError(
            422,
            f"{field} nests arrays and objects {depth} deep; at most {MAX_JSON_DEPTH} levels are accepted",
            kind="invalid-input",
            title="Invalid input",
            errors=[FieldError(field=field, message="nested too deeply")],
        )


class BodySizeLimit:
    """413 for bodies over ``max_bytes`` (``max_json_bytes`` for JSON), declared or streamed (chunked) alike.

    JSON bodies are buffered here (they are small by that limit) and their nesting depth is checked before any
    parser sees them, so a hostile document cannot exhaust the parser's recursion.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_json_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_json_bytes = max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if b"transfer-encoding" not in headers and headers.get(b"content-length", b"0") == b"0":
            await self.app(scope, receive, send)  # HTTP/1.1: a request with neither header has no body
            return
        is_json = _is_json(headers.get(b"content-type", b""))
        limit = self.max_json_bytes if is_json else self.max_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(scope, receive, send, limit, int(declared))
            return
        if is_json:
            await self._json(scope, receive, send, limit)
        else:
            await self._streamed(scope, receive, send, limit)

    async def _json(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(scope, receive, send, limit, None)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            check_json_depth(body, "body")
        except ProblemError as exc:
            response = problem_response(
                exc.status, exc.detail, kind=exc.kind, title=exc.title, instance=scope.get("path"), errors=exc.errors
            )
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _streamed(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # whatever the app makes of the aborted body (a parse error), the answer is 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, limited_receive, guarded_send)
        if exceeded and not started:
            await _too_large(scope, receive, send, limit, None)


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than the limit of {limit} bytes")
        self.limit = limit


def _is_json(content_type: bytes) -> bool:
    kind = content_type.split(b";")[0].strip().lower()
    return kind == b"application/json" or kind.endswith(b"+json")


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int, declared: int | None) -> None:
    size = f" ({declared} bytes)" if declared is not None else ""
    response = problem_response(
        413,
        f"the request body{size} is larger than the limit of {limit} bytes for this content type",
        kind="payload-too-large",
        title="Content Too Large",
        instance=scope.get("path"),
    )
    await response(scope, receive, send)
