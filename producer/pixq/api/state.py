"""``ApiState``: what every route and the fast path share, built once by ``app.create_app``.

Its own module so that the routes (``routes.py``, ``events.py``, ``fast.py``) and the factory that
assembles them (``app.py``) all import it from below: the factory imports the routes, never the
other way round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from limits import parse as parse_limit
from limits.strategies import MovingWindowRateLimiter
from prometheus_client import CollectorRegistry, Counter, Gauge

from pixq.api.config import ApiSettings
from pixq.api.keys import ApiKey, KeyStore
from pixq.api.middleware import RequestMetrics
from pixq.client import Client
from pixq.settings import Settings


@dataclass
class ApiState:
    settings: Settings
    api: ApiSettings
    client: Client
    keys: KeyStore
    aconn: aioredis.Redis  # event streams (they block on XREAD: no socket timeout)
    rconn: aioredis.Redis  # the fast path's requests (fast.py): a stuck Redis answers 503 after 5 s, as the sync path
    limiter: MovingWindowRateLimiter
    registry: CollectorRegistry
    requests: RequestMetrics  # every response by route and code (pixq.api.middleware), refusals of the server too
    public_url: str
    webhook_outcomes: Counter
    outbox_entries: Gauge
    deliveries_due: Gauge

    def rate_limited(self, key: ApiKey) -> int:
        """0 if the key may submit now (the hit is counted), else seconds until it may."""
        if not key.rate:
            return 0
        item = parse_limit(key.rate)
        if self.limiter.hit(item, "pixq-key", key.id):
            return 0
        stats = self.limiter.get_window_stats(item, "pixq-key", key.id)
        return max(1, int(stats.reset_time - time.time() + 0.999))
