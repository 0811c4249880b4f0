"""The FastAPI application factory: ``create_app(settings, api_settings)``.

Everything the routes need (the ``Client``, the key store, the rate limiter, the metrics registry)
is built here once and kept on ``app.state``; nothing is read from the environment.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from prometheus_client import CollectorRegistry, Counter, Gauge

from pixq.api import errors, routes
from pixq.api.config import ApiSettings
from pixq.api.fast import FastPath
from pixq.api.keys import KeyStore
from pixq.api.middleware import BodyLimit, Metrics, RequestMetrics
from pixq.api.state import ApiState
from pixq.client import CLIENT_RETRIES, Client
from pixq.settings import Settings

API_VERSION = "1"


def create_app(settings: Settings, api: ApiSettings, public_url: str = "http://127.0.0.1:8000",
               relay: Any = None) -> FastAPI:
    """The API over one Redis; ``relay`` (a ``pixq.api.relay.Relay``) runs beside it when given."""
    endpoint = settings.redis_endpoint()  # plain or Sentinel, retries and reconnects (pixq/redisconn.py)
    if endpoint.is_sentinel:
        conn = endpoint.client(retries=CLIENT_RETRIES, socket_timeout_s=5, connect_timeout_s=2)
    else:
        conn = redis.Redis.from_url(endpoint.url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=10)
    registry = CollectorRegistry()
    state = ApiState(
        settings=settings, api=api, client=Client(settings, conn=conn), keys=KeyStore(conn, api.require_pepper()),
        aconn=endpoint.async_client(), rconn=endpoint.async_client(socket_timeout_s=5),
        limiter=MovingWindowRateLimiter(storage_from_string(endpoint.limits_url(), **endpoint.limits_options())),
        registry=registry, requests=RequestMetrics(registry), public_url=(api.public_url or public_url).rstrip("/"),
        webhook_outcomes=Counter("pixq_webhook_deliveries", "Webhook delivery attempts by outcome", ["outcome"],
                                 registry=registry),
        outbox_entries=Gauge("pixq_webhook_outbox_entries", "Webhook events in the outbox stream not yet taken "
                             "by a relay", registry=registry),
        deliveries_due=Gauge("pixq_webhook_deliveries_due", "Webhook deliveries due now (the relays' backlog)",
                             registry=registry),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # What start-up built lives as long as the process: out of the collector's sight, so that a full
        # collection walks only what requests made (it walked all of FastAPI, pydantic and Celery: the
        # POST latency's p99 tail).
        gc.collect()
        gc.freeze()
        if relay is not None:
            relay.start(outcomes=state.webhook_outcomes)
        try:
            yield
        finally:
            if relay is not None:
                relay.stop()
            await state.aconn.aclose()
            await state.rconn.aclose()
            state.client.close()

    app = FastAPI(
        title="pixart-queue API", version=API_VERSION, lifespan=lifespan, separate_input_output_schemas=False,
        description="PixArt-Σ text-to-image jobs: submit, follow (SSE), fetch images, signed webhooks. "
        "Every route but /healthz, /readyz and /metrics needs `Authorization: Bearer <key>`.",
    )
    app.state.pixq = state
    errors.install(app)
    app.include_router(routes.router)  # the routes read app.state.pixq
    hot = {(m, getattr(r, "path", "")): r for r in routes.router.routes for m in getattr(r, "methods", ())}
    app.add_middleware(FastPath, state=state, get_route=hot["GET", "/v1/jobs/{job_id}"],
                       post_route=hot["POST", "/v1/jobs"])  # inside the body limit and the metrics
    app.add_middleware(BodyLimit, max_bytes=api.max_body_bytes, timeout_s=api.request_timeout_s)
    app.add_middleware(Metrics, metrics=state.requests)
    return app
