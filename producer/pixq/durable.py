"""Durable acknowledgements: a write that tells a caller "done" is on enough replicas first.

Redis replicates asynchronously, so a primary that fails over can take its last acknowledged
writes with it. Each such write (a submit, a claim, a job's end, a cancel) runs in a pipeline
followed by ``WAIT n timeout`` on the same connection (``WAIT`` counts the replicas that have
this connection's last write, and everything before it); fewer than ``n`` raises ``NotDurable``.

``n`` is ``PIXQ_REDIS_MIN_REPLICAS``; unset, it is 1 while the primary reports a connected
replica (``INFO replication``, re-read every ``refresh_s``) and 0 otherwise, so a lone Redis, or
a new primary whose replica has not rejoined yet, keeps serving. Only an explicit setting
refuses writes on a primary cut off from its replicas (see docs/reliability.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import redis
from redis.client import Pipeline

from pixq.errors import NotDurable


class Durability:
    def __init__(self, conn: redis.Redis, min_replicas: int | None = None, timeout_ms: int = 1000,
                 refresh_s: float = 10.0):
        self.conn = conn
        self.min_replicas = min_replicas
        self.timeout_ms = timeout_ms
        self.refresh_s = refresh_s
        self._auto = 0
        self._checked_at: float | None = None

    def required(self) -> int:
        """Replicas a write must reach before it is reported done."""
        if self.min_replicas is not None:
            return self.min_replicas
        now = time.monotonic()
        if self._checked_at is None or now - self._checked_at >= self.refresh_s:
            try:
                info = cast(dict[str, Any], self.conn.info("replication"))
                self._auto = 1 if int(info.get("connected_slaves", 0)) > 0 else 0
                self._checked_at = now
            except redis.RedisError:
                pass  # keep the last answer; the write itself will meet the error
        return self._auto

    async def required_async(self, aconn: Any) -> int:
        """``required`` over an asyncio connection (the API's event loop must not block on Redis)."""
        if self.min_replicas is not None:
            return self.min_replicas
        now = time.monotonic()
        if self._checked_at is None or now - self._checked_at >= self.refresh_s:
            try:
                info = await aconn.info("replication")
                self._auto = 1 if int(info.get("connected_slaves", 0)) > 0 else 0
                self._checked_at = now
            except redis.RedisError:
                pass
        return self._auto

    def check(self, what: str, needed: int, confirmed: int) -> None:
        if confirmed < needed:
            raise NotDurable(f"Redis did not confirm {what} on {needed} replica(s) within {self.timeout_ms} ms "
                             f"({confirmed} did); not reported done")

    def run(self, what: str, build: Callable[[Pipeline], Any]) -> list[Any]:
        """Queue commands with ``build(pipe)``, run them, then ``WAIT``; returns their results."""
        needed = self.required()
        pipe = self.conn.pipeline(transaction=False)
        build(pipe)
        if needed:
            pipe.execute_command("WAIT", needed, self.timeout_ms)
        results = list(pipe.execute())
        if needed:
            self.check(what, needed, int(results.pop()))
        return results


def no_wait(conn: redis.Redis) -> Durability:
    """Writes reported done as soon as the primary has them (tests, tools)."""
    return Durability(conn, min_replicas=0)
