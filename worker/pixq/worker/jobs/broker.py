"""The worker's Redis transport: kombu's, made to survive a broker reconnect.

When the broker connection drops, Celery closes the channel. kombu's Redis channel then
(1) tries to put unacknowledged messages back after its connection is gone, and (2) later
acknowledges the messages of jobs that finished meanwhile on that dead channel. Both raise
``AttributeError`` (its ``connection`` is ``None``) and Celery stops the worker ("Unrecoverable
error") — the "worker stops after a Redis restart" family of reports (celery#8030). Seen here
with Celery 5.7 / kombu 5.7 (tests/test_reliability.py::test_redis_restarted_mid_job).

Here neither happens on a closed channel: those messages stay in Redis's unacked set and are
swept back after the visibility timeout, and a redelivered job that already ended is dropped
by its record (``records.claim``). Running jobs do not wait for the sweep: their leases lapse
and the reaper re-queues them (``reaper.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


class ReconnectSafe:
    """The two overrides, for kombu's plain and Sentinel channels alike."""

    do_restore = False
    connection: Any

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        if self.connection is None:
            log.warning("not acknowledging message %s: its broker connection was lost "
                        "(the job record already has the outcome)", delivery_tag)
            return
        super().basic_ack(delivery_tag, multiple=multiple)  # type: ignore[misc]

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if self.connection is None:
            log.warning("not rejecting message %s: its broker connection was lost", delivery_tag)
            return
        super().basic_reject(delivery_tag, requeue=requeue)  # type: ignore[misc]


class Channel(ReconnectSafe, kombu_redis.Channel):
    pass


class SentinelChannel(ReconnectSafe, kombu_redis.SentinelChannel):
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


TRANSPORT = "pixq.worker.jobs.broker:Transport"
SENTINEL_TRANSPORT = "pixq.worker.jobs.broker:SentinelTransport"
# A unix socket's broker URL names its transport itself (``redis+socket://``: kombu takes the part before ``+`` and
# ignores ``broker_transport``), so the worker registers this alias for ``Transport`` and names it in the URL instead.
UNIX_ALIAS = "pixq-redis"


def unix_broker_url(url: str) -> str:
    """``redis+socket://…`` (redisconn's form for Celery) served by ``Transport``; registers the alias."""
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES.setdefault(UNIX_ALIAS, TRANSPORT)
    return UNIX_ALIAS + url.removeprefix("redis")
