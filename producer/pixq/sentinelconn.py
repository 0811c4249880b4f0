"""Sentinel-managed connections that ask the sentinels for the primary on every reconnect.

redis-py's ``SentinelManagedConnection`` looks the primary up only in ``connect()``. A command
whose connection breaks (the primary was killed under it) is retried by the client's ``Retry``,
and that retry reconnects through ``connect_check_health()`` → ``_connect()``, i.e. to the
address it had: the dead primary's, again and again for the whole retry budget (about a minute
for the workers' clients, ``redisconn.RedisEndpoint.client``), and then the command fails although
the sentinels promoted a replica seconds after the kill (redis/redis-py#3874, open as of 8.1).

Seen in tests/test_failover.py: a worker's consumer thread was recording a reservation
(``worker/pixq/worker/jobs/reservations.py``) when the primary died; it sat in that loop for a
minute, so the worker took no new job after the failover, and a lease renewal caught the same way
let a running job's lease lapse. Here a reconnect inside a retry goes through ``connect()``,
which asks the sentinels each attempt, as a first connect does.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.connection import SSLConnection as AsyncSSLConnection
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncSentinelManagedConnection
from redis.connection import SSLConnection
from redis.sentinel import SentinelManagedConnection


class PrimaryFollowingConnection(SentinelManagedConnection):
    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        # ``retry_socket_connect=False`` is the call from ``connect_to`` (an address just looked up).
        if self._sock is None and retry_socket_connect:
            self.connect()
            return
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class PrimaryFollowingSSLConnection(PrimaryFollowingConnection, SSLConnection):
    pass


class AsyncPrimaryFollowingConnection(AsyncSentinelManagedConnection):
    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if not self.is_connected and retry_socket_connect:
            await self.connect()
            return
        await super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class AsyncPrimaryFollowingSSLConnection(AsyncPrimaryFollowingConnection, AsyncSSLConnection):
    pass


def connection_class(tls: bool, asynchronous: bool = False) -> Any:
    """The class to give ``Sentinel.master_for(connection_class=...)``."""
    if asynchronous:
        return AsyncPrimaryFollowingSSLConnection if tls else AsyncPrimaryFollowingConnection
    return PrimaryFollowingSSLConnection if tls else PrimaryFollowingConnection
