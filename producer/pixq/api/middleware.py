"""ASGI middleware: a body size limit and request metrics.

The limit is checked on ``Content-Length`` before anything is read and again on the bytes as they
arrive (chunked bodies), so a 10 MB body is refused after at most ``limit`` bytes. Starlette has no
such limit of its own; this is the usual ~30-line wrapper.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    pass


def _refusal(status: int, error: str, message: str) -> tuple[dict[str, Any], dict[str, Any]]:
    body = json.dumps({"error": error, "message": message, "fields": []}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}
    return start, {"type": "http.response.body", "body": body}


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

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
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
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


class Metrics:
    """Requests by route and status code, and their latency, into the app's own registry."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry):
        self.app = app
        self.requests = Counter("pixq_api_requests", "API requests by route and status code",
                                ["method", "route", "code"], registry=registry)
        self.latency = Histogram("pixq_api_request_seconds", "API request latency (until the response starts)",
                                 ["method", "route"], registry=registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def _series(self, method: str, path: str, code: int) -> tuple[Any, Any]:
        """The (latency, count) series of one method, route and code (prometheus' labels() is a
        locked lookup each time: kept here after the first)."""
        series = self._children.get((method, path, code))
        if series is None:
            series = self._children[method, path, code] = (self.latency.labels(method, path),
                                                           self.requests.labels(method, path, str(code)))
        return series

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                path = getattr(scope.get("route"), "path", "unmatched")
                latency, count = self._series(scope["method"], path, msg["status"])
                latency.observe(time.perf_counter() - started)
                count.inc()
            await send(msg)

        await self.app(scope, receive, timed_send)
