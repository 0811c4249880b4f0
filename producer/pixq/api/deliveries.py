"""Webhook deliveries: taken from the outbox stream, scheduled, finished — each step one Lua script.

A job's events go out one at a time, in order: each delivery joins its job's line
(``LINE_PREFIX``), and only the head of a line is on the due set (``DUE_KEY``, delivery id ->
when). A relay *takes* due deliveries by pushing their time a lease into the future, so a relay
killed mid-delivery leaves them to another one when the lease ends. A finished delivery
(delivered, exhausted, or stopped by ``410 Gone``) leaves the line and puts the next one on the
due set. Exhausted deliveries stay listed (``FAILED_KEY``) until re-sent.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from pixq.records import OUTBOX_KEY

GROUP = "pixq-relays"
DELIVERY_PREFIX = "pixq:wh:delivery:"  # HASH per delivery id "{job_id}:{event}"
LINE_PREFIX = "pixq:wh:line:"  # LIST per job: its deliveries in event order
DUE_KEY = "pixq:wh:due"  # ZSET delivery id -> when to attempt it
FAILED_KEY = "pixq:wh:failed"  # ZSET delivery id -> when it was exhausted
GONE_KEY = "pixq:wh:gone"  # SET of URLs that answered 410 Gone: nothing more is sent there
DELIVERY_TTL_S = 14 * 24 * 3600

# KEYS: stream, delivery, line, due. ARGV: group, entry id, now, ttl, field/value pairs.
_INGEST = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 5))
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  local n = redis.call('RPUSH', KEYS[3], KEYS[2])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  if n == 1 then redis.call('ZADD', KEYS[4], ARGV[3], KEYS[2]) end
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""

# KEYS: due. ARGV: now, lease until, max. Take due deliveries: their time moves to the lease's end.
_TAKE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""

# KEYS: delivery, line, due, failed, gone. ARGV: outcome (delivered|failed|gone|retry), now, next
# attempt time, field/value pairs. A delivery that leaves its line hands the due set the next one.
_FINISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('ZREM', KEYS[3], KEYS[1]) return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[1] == 'retry' then
  redis.call('ZADD', KEYS[3], ARGV[3], KEYS[1])
  return 1
end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
redis.call('ZREM', KEYS[3], KEYS[1])
if ARGV[1] == 'failed' then redis.call('ZADD', KEYS[4], ARGV[2], KEYS[1]) end
if ARGV[1] == 'gone' then redis.call('SADD', KEYS[5], redis.call('HGET', KEYS[1], 'url')) end
redis.call('LREM', KEYS[2], 1, KEYS[1])
local nxt = redis.call('LINDEX', KEYS[2], 0)
if nxt then redis.call('ZADD', KEYS[3], ARGV[2], nxt) end
return 1
"""

# KEYS: delivery, line, due, failed, gone. ARGV: now. Send an exhausted or stopped delivery again.
_REDELIVER = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'failed' and state ~= 'gone' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'pending', 'attempts', '0', 'next_at', ARGV[1])
redis.call('ZREM', KEYS[4], KEYS[1])
redis.call('SREM', KEYS[5], redis.call('HGET', KEYS[1], 'url'))
local n = redis.call('RPUSH', KEYS[2], KEYS[1])
if n == 1 then redis.call('ZADD', KEYS[3], ARGV[1], KEYS[1]) end
return 1
"""


@dataclass(frozen=True)
class Delivery:
    id: str  # the webhook-id: "{job_id}:{event}", the same on every attempt
    job_id: str
    event: str
    url: str
    owner: str
    payload: str  # the Standard Webhooks body, fixed when the event was taken from the outbox
    state: str  # pending, delivered, failed (exhausted), gone (410)
    attempts: int
    created_at: float
    last_status: int | None = None
    last_error: str | None = None
    last_attempt_at: float | None = None
    delivered_at: float | None = None

    def public(self) -> dict[str, Any]:
        return {"webhook_id": self.id, "event": self.event, "url": self.url, "state": self.state,
                "attempts": self.attempts, "created_at": self.created_at, "last_status": self.last_status,
                "last_error": self.last_error, "last_attempt_at": self.last_attempt_at,
                "delivered_at": self.delivered_at}


def delivery_key(delivery_id: str) -> str:
    return DELIVERY_PREFIX + delivery_id


def _decode(raw: dict[bytes, bytes]) -> Delivery:
    f = {k.decode(): v.decode() for k, v in raw.items()}

    def opt(name: str) -> str | None:
        return f.get(name) or None

    return Delivery(
        id=f["id"], job_id=f["job_id"], event=f["event"], url=f["url"], owner=f.get("owner", ""),
        payload=f["payload"], state=f.get("state", "pending"), attempts=int(f.get("attempts") or 0),
        created_at=float(f.get("created_at") or 0), last_status=int(s) if (s := opt("last_status")) else None,
        last_error=opt("last_error"), last_attempt_at=float(t) if (t := opt("last_attempt_at")) else None,
        delivered_at=float(t) if (t := opt("delivered_at")) else None,
    )


class DeliveryStore:
    def __init__(self, conn: redis.Redis):
        self.conn = conn
        self._ingest = conn.register_script(_INGEST)
        self._take = conn.register_script(_TAKE)
        self._finish = conn.register_script(_FINISH)
        self._redeliver = conn.register_script(_REDELIVER)

    def ingest(self, entry_id: str, job_id: str, event: str, url: str, owner: str, payload: str) -> None:
        """Make the delivery for one outbox entry (once, however often the entry is read) and ack it."""
        delivery_id = f"{job_id}:{event}"
        now = time.time()
        fields = {"id": delivery_id, "job_id": job_id, "event": event, "url": url, "owner": owner,
                  "payload": payload, "state": "pending", "attempts": 0, "created_at": now}
        flat = [str(x) for kv in fields.items() for x in kv]
        self._ingest(keys=[OUTBOX_KEY, delivery_key(delivery_id), LINE_PREFIX + job_id, DUE_KEY],
                     args=[GROUP, entry_id, now, DELIVERY_TTL_S, *flat])

    def take(self, lease_s: float, limit: int) -> list[Delivery]:
        now = time.time()
        ids = self._take(keys=[DUE_KEY], args=[now, now + lease_s, limit])
        taken = []
        for key in ids:
            raw = self.conn.hgetall(key.decode())
            if raw:
                taken.append(_decode(raw))  # type: ignore[arg-type]
            else:
                self.conn.zrem(DUE_KEY, key)
        return taken

    def finish(self, delivery: Delivery, outcome: str, next_at: float = 0.0, **fields: Any) -> None:
        flat = [str("" if v is None else v) for kv in fields.items() for v in kv]
        self._finish(keys=[delivery_key(delivery.id), LINE_PREFIX + delivery.job_id, DUE_KEY, FAILED_KEY, GONE_KEY],
                     args=[outcome, time.time(), next_at, *flat])

    def is_gone(self, url: str) -> bool:
        return bool(self.conn.sismember(GONE_KEY, url))

    def get(self, delivery_id: str) -> Delivery | None:
        raw = self.conn.hgetall(delivery_key(delivery_id))
        return _decode(raw) if raw else None  # type: ignore[arg-type]

    def for_job(self, job_id: str) -> list[Delivery]:
        events = ("running", "succeeded", "failed", "canceled")
        pipe = self.conn.pipeline(transaction=False)
        for event in events:
            pipe.hgetall(delivery_key(f"{job_id}:{event}"))
        return sorted((_decode(raw) for raw in pipe.execute() if raw), key=lambda d: d.created_at)

    def failed(self, limit: int = 100) -> list[Delivery]:
        """Exhausted deliveries, most recent first."""
        found = []
        keys: Any = self.conn.zrevrange(FAILED_KEY, 0, limit - 1)
        for key in keys:
            delivery = self.get(key.decode().removeprefix(DELIVERY_PREFIX))  # type: ignore[union-attr]
            if delivery is None:
                self.conn.zrem(FAILED_KEY, key)
            else:
                found.append(delivery)
        return found

    def redeliver(self, job_id: str, event: str) -> Delivery | None:
        delivery_id = f"{job_id}:{event}"
        keys = [delivery_key(delivery_id), LINE_PREFIX + job_id, DUE_KEY, FAILED_KEY, GONE_KEY]
        if not self._redeliver(keys=keys, args=[time.time()]):
            return None
        return self.get(delivery_id)

    def backlog(self) -> tuple[int, int]:
        """(outbox entries not yet taken from the stream, deliveries due now)."""
        pipe = self.conn.pipeline(transaction=False)
        pipe.xlen(OUTBOX_KEY)
        pipe.zcount(DUE_KEY, "-inf", time.time())
        entries, due = pipe.execute()
        return int(entries), int(due)


def payload_json(event: str, record: dict[str, Any], at: float) -> str:
    """The Standard Webhooks body: ``type``, ``timestamp`` (RFC 3339), ``data`` (the job record)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"
    return json.dumps({"type": f"job.{event}", "timestamp": stamp, "data": record}, separators=(",", ":"))
