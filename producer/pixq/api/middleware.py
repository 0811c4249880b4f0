"""ASGI middleware: a body size limit and time limit, and request metrics.

The size limit is checked on ``Content-Length`` before anything is read and again on the bytes as
they arrive (chunked bodies), so a 10 MB body is refused after at most ``limit`` bytes. Each piece
of a body must arrive within ``timeout_s`` of the last (a client that announces 60,000 bytes and
sends 10 is answered 408 and the connection closed). Starlette has neither limit of its own; this is
the usual ~30-line wrapper. The request's head has its limits in the server (``pixq.api.server``).

Every response is counted by code, those of the code above and a 500 from an exception that escaped
a route (Starlette's outermost middleware answers that one, outside this one).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


def _refusal(status: int, error: str, message: str) -> tuple[dict[str, Any], dict[str, Any]]:
    body = json.dumps({"error": error, "message": message, "fields": []}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}
    return start, {"type": "http.response.body", "body": body}


async def _within(awaitable: Awaitable[Message], timeout_s: float) -> Message:
    """``awaitable``'s message, or ``BodyTimeout`` after ``timeout_s`` (``asyncio.timeout`` arms a timer;
    ``wait_for`` before 3.12 wraps each call in a task, a cost on every POST's body)."""
    try:
        if sys.version_info >= (3, 11):
            async with asyncio.timeout(timeout_s):
                return await awaitable
        return await asyncio.wait_for(awaitable, timeout_s)
    except asyncio.TimeoutError:
        raise BodyTimeout() from None


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is None and b"transfer-encoding" not in headers:  # no body (RFC 9112 6.3): nothing to limit
            await self.app(scope, receive, send)
            return
        message = f"request body over {self.max_bytes} bytes (PIXQ_API_MAX_BODY_BYTES)"
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            for part in _refusal(413, "body_too_large", message):
                await send(part)
            return
        received = 0
        complete = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: what follows is a wait for the disconnect (a stream's)
                return await receive()
            msg = await _within(receive(), self.timeout_s)
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
                complete = not msg.get("more_body", False)
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                for part in _refusal(413, "body_too_large", message):
                    await send(part)
        except BodyTimeout:
            if not started:
                late = f"request body not received: nothing came for {self.timeout_s:g} s (PIXQ_API_REQUEST_TIMEOUT_S)"
                for part in _refusal(408, "request_timeout", late):
                    await send(part)


class RequestMetrics:
    """Requests by route and status code, and their latency, in the app's own registry."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("pixq_api_requests", "API requests by route and status code",
                                ["method", "route", "code"], registry=registry)
        self.latency = Histogram("pixq_api_request_seconds", "API request latency (until the response starts)",
                                 ["method", "route"], registry=registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def series(self, method: str, path: str, code: int) -> tuple[Any, Any]:
        """The (latency, count) series of one method, route and code (prometheus' labels() is a
        locked lookup each time: kept here after the first)."""
        series = self._children.get((method, path, code))
        if series is None:
            series = self._children[method, path, code] = (self.latency.labels(method, path),
                                                           self.requests.labels(method, path, str(code)))
        return series

    def refused(self, code: int) -> None:
        """A request the server refused before it was parsed (its head too large or too slow)."""
        self.series("-", "unparsed", code)[1].inc()


class Metrics:
    """Counts every response (``RequestMetrics``), also the 500 of an exception no handler answered."""

    def __init__(self, app: ASGIApp, metrics: RequestMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        responded = False

        def count(code: int) -> None:
            path = getattr(scope.get("route"), "path", "unmatched")
            latency, counter = self.metrics.series(scope["method"], path, code)
            latency.observe(time.perf_counter() - started)
            counter.inc()

        async def timed_send(msg: Message) -> None:
            nonlocal responded
            if msg["type"] == "http.response.start":
                responded = True
                count(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            if not responded:
                count(500)  # Starlette's ServerErrorMiddleware, outside this one, answers it
            raise
