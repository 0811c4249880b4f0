"""Durable acknowledgements: a write that tells a caller "done" is on enough replicas first.

Redis replicates asynchronously, so a primary that fails over can take its last acknowledged
writes with it. Each such write (a submit, a claim, a job's end, a cancel) runs in a pipeline
followed by ``WAIT n timeout`` on the same connection (``WAIT`` counts the replicas that have
this connection's last write, and everything before it); fewer than ``n`` raises ``NotDurable``.

``n`` is ``PIXQ_REDIS_MIN_REPLICAS``; unset, it is 1 while the primary has a replica that can
confirm a write and 0 otherwise, so a lone Redis, or a new primary whose replica has not rejoined
yet, keeps serving. Only an explicit setting refuses writes on a primary cut off from its
replicas (see docs/reliability.md).

A replica can confirm a write when ``INFO replication`` lists it ``state=online`` with a ``lag``
(seconds since its last acknowledgement) of at most ``MAX_LAG_S``. ``connected_slaves`` is not
that count: it includes a replica waiting for or loading its first full sync (Redis delays a
diskless sync ``repl-diskless-sync-delay`` seconds, 5 by default; a large dataset takes minutes),
which acknowledges nothing until it is done, so a ``WAIT 1`` could only time out. How the count
stays current:

- it is re-read every ``refresh_s`` (2 s) while every connected replica is online (or none is
  connected), so a new replica is seen within 2 s, and every ``settling_s`` (0.5 s) while one is
  still syncing, so writes start waiting for it within half a second of its sync ending (an
  ``INFO replication`` a process every 2 s costs Redis nothing it would notice);
- a ``WAIT`` that confirms fewer than the count asked for re-reads at once (the replica may have
  dropped out: a failover, an old primary rejoining and resyncing, a replica restarted); the write
  is reported done when the fresh count asks for no more than ``WAIT`` confirmed, else
  ``NotDurable``.

A connection error while reading the count is raised (the write would meet it too); a refusal
(an ACL user without ``INFO``) keeps the last count (0 at first).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline

from pixq.errors import NotDurable

MAX_LAG_S = 5  # a replica silent for longer (stopped, cut off) would only make WAIT time out
REFRESH_S = 2.0
SETTLING_S = 0.5


@dataclass(frozen=True)
class Replicas:
    """What ``INFO replication`` says about a primary's replicas."""

    connected: int
    confirming: int  # online, with a lag of at most MAX_LAG_S

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> Replicas:
        # redis-py parses each ``slaveN:ip=..,port=..,state=online,offset=..,lag=..`` line into a dict.
        replicas = [v for k, v in info.items() if k.startswith("slave") and k[5:].isdigit() and isinstance(v, dict)]
        confirming = sum(1 for r in replicas if r.get("state") == "online" and int(r.get("lag", 0)) <= MAX_LAG_S)
        return cls(connected=int(info.get("connected_slaves", len(replicas))), confirming=confirming)

    @property
    def settled(self) -> bool:
        """No replica is connected that is still syncing (or silent)."""
        return self.confirming >= self.connected


class Durability:
    def __init__(self, conn: redis.Redis, min_replicas: int | None = None, timeout_ms: int = 1000,
                 refresh_s: float = REFRESH_S, settling_s: float = SETTLING_S):
        self.conn = conn
        self.min_replicas = min_replicas
        self.timeout_ms = timeout_ms
        self.refresh_s = refresh_s
        self.settling_s = settling_s
        self._auto = 0
        self._next_read: float | None = None  # monotonic time of the next INFO; None: read now

    def _due(self) -> bool:
        return self._next_read is None or time.monotonic() >= self._next_read

    def _learn(self, info: dict[str, Any]) -> None:
        replicas = Replicas.from_info(info)
        self._auto = 1 if replicas.confirming > 0 else 0
        self._next_read = time.monotonic() + (self.refresh_s if replicas.settled else self.settling_s)

    def _refused(self) -> None:
        # INFO refused (e.g. an ACL user without it): keep the last count, ask again later.
        self._next_read = time.monotonic() + self.refresh_s

    def required(self) -> int:
        """Replicas a write must reach before it is reported done."""
        if self.min_replicas is not None:
            return self.min_replicas
        if self._due():
            try:
                self._learn(self.conn.info("replication"))
            except (redis.ConnectionError, redis.TimeoutError):
                raise
            except redis.RedisError:
                self._refused()
        return self._auto

    async def required_async(self, aconn: Any) -> int:
        """``required`` over an asyncio connection (the API's event loop must not block on Redis)."""
        if self.min_replicas is not None:
            return self.min_replicas
        if self._due():
            try:
                self._learn(await aconn.info("replication"))
            except (redis.ConnectionError, redis.TimeoutError):
                raise
            except redis.RedisError:
                self._refused()
        return self._auto

    def check(self, what: str, needed: int, confirmed: int) -> None:
        if confirmed < needed:
            raise NotDurable(f"Redis did not confirm {what} on {needed} replica(s) within {self.timeout_ms} ms "
                             f"({confirmed} did); not reported done")

    def confirm(self, what: str, needed: int, confirmed: int) -> None:
        """``check``, after a fresh read of the count when ``WAIT`` fell short under the automatic rule."""
        if confirmed < needed and self.min_replicas is None:
            self._next_read = None
            with contextlib.suppress(redis.RedisError):  # unread: the shortfall stands
                needed = min(needed, self.required())
        self.check(what, needed, confirmed)

    async def confirm_async(self, aconn: Any, what: str, needed: int, confirmed: int) -> None:
        """``confirm`` over an asyncio connection."""
        if confirmed < needed and self.min_replicas is None:
            self._next_read = None
            with contextlib.suppress(redis.RedisError):
                needed = min(needed, await self.required_async(aconn))
        self.check(what, needed, confirmed)

    def run(self, what: str, build: Callable[[Pipeline], Any]) -> list[Any]:
        """Queue commands with ``build(pipe)``, run them, then ``WAIT``; returns their results."""
        needed = self.required()
        pipe = self.conn.pipeline(transaction=False)
        build(pipe)
        if needed:
            pipe.execute_command("WAIT", needed, self.timeout_ms)
        results = list(pipe.execute())
        if needed:
            self.confirm(what, needed, int(results.pop()))
        return results
