"""Server-Sent Events for one job, read from its event stream (``records.EVENTS_PREFIX``).

The worker's scripts append ``queued``, ``running`` (at claim and after every step) and the
terminal state to that stream in the same call that changes the record, so nothing is missed
between polls. Each SSE event's id is the stream entry's id: ``Last-Event-ID`` resumes after it.

A stream can outlive a single request's authentication by hours: its key is read again every
``KEY_RECHECK_S`` and the stream ends (after a last ``: key revoked`` comment) once the key is revoked
or deleted.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from pixq.api.keys import KEY_PREFIX
from pixq.api.state import ApiState
from pixq.records import EVENTS_PREFIX, JobRecord, JobState, RecordStore, decode_record
from pixq.wire import queue_lists

KEEPALIVE_S = 15.0
QUEUED_POLL_S = 2.0  # how often a queued job's position is recomputed
KEY_RECHECK_S = 5.0  # an open stream ends at most this long (plus one Redis read) after its key is revoked
_ENTRY_ID = re.compile(r"^(\d{1,20})(?:-(\d{1,20}))?$")
_U64 = 2**64


def is_event_id(text: str) -> bool:
    """Whether ``text`` is a Redis stream entry id (``ms-seq`` or ``ms``, each below 2**64): what
    ``Last-Event-ID`` may carry. Anything else Redis refuses mid-stream ("Invalid stream ID")."""
    match = _ENTRY_ID.match(text)
    return match is not None and all(int(part) < _U64 for part in match.groups("0"))


async def key_is_live(state: ApiState, key_id: str) -> bool:
    """The key still exists and is not revoked (its scopes never change)."""
    raw: Any = await state.aconn.hmget(KEY_PREFIX + key_id, ["id", "revoked_at"])
    return bool(raw[0]) and not raw[1]


def sse(event: str, data: Any, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def queue_position(state: ApiState, record: JobRecord) -> int | None:
    """Jobs ahead of this one on its model's queue (0: next), ``None`` if its message is not waiting."""
    ahead = 0
    needle = record.id.encode()
    for name in queue_lists(record.request.model_name):
        messages: Any = await state.aconn.lrange(name, 0, -1)  # type: ignore[misc]
        for i, raw in enumerate(messages):
            if needle in raw:
                return ahead + len(messages) - 1 - i  # kombu pushes on the left and pops from the right
        ahead += len(messages)
    return None


async def follow(state: ApiState, record: JobRecord, last_event_id: str | None,
                 render: Callable[[JobRecord], dict[str, Any]], key_id: str | None = None) -> AsyncIterator[bytes]:
    """The job's events until it ends (or, resumed, from after ``last_event_id``, which ``is_event_id``);
    with ``key_id``, until that key is revoked."""
    conn: Any = state.aconn  # redis.asyncio's reply types are unions mypy cannot narrow
    key, stream = RecordStore.key(record.id), EVENTS_PREFIX + record.id
    total = record.total_steps

    async def terminal(event_id: str | None) -> bytes:
        raw = await conn.hgetall(key)
        final = decode_record(raw) if raw else record
        return sse(final.state.value, render(final), event_id)

    async def queued(event_id: str | None) -> bytes:
        return sse("queued", {"state": "queued", "position": await queue_position(state, record)}, event_id)

    if last_event_id:
        cursor = last_event_id
    else:
        pipe = conn.pipeline(transaction=True)
        pipe.hgetall(key)
        pipe.xrevrange(stream, count=1)
        raw, last = await pipe.execute()
        cursor = last[0][0].decode() if last else "0-0"
        now = decode_record(raw) if raw else record
        if now.state.is_terminal:
            yield await terminal(cursor)
            return
        if now.state is JobState.queued:
            yield await queued(cursor)
        else:
            yield sse("running", {"state": "running", "step": now.step, "total_steps": total}, cursor)
    is_queued = record.state is JobState.queued
    recheck_at = time.monotonic() + KEY_RECHECK_S
    while True:
        if key_id is not None and time.monotonic() >= recheck_at:
            if not await key_is_live(state, key_id):
                yield b": key revoked\n\n"
                return
            recheck_at = time.monotonic() + KEY_RECHECK_S
        wait_s = min(QUEUED_POLL_S if is_queued else KEEPALIVE_S, KEY_RECHECK_S if key_id is not None else KEEPALIVE_S)
        reply = await conn.xread({stream: cursor}, count=200, block=int(1000 * wait_s))
        if not reply:
            now_state = await conn.hget(key, "state")
            if now_state is None:
                return  # the record expired: nothing more will happen
            if JobState(now_state.decode()).is_terminal:  # resumed after the terminal event
                yield await terminal(None)
                return
            yield (await queued(None)) if is_queued else b": keep-alive\n\n"
            continue
        for entry_id, fields in reply[0][1]:
            cursor = entry_id.decode()
            kind = fields.get(b"type", b"").decode()
            if kind in ("succeeded", "failed", "canceled"):
                yield await terminal(cursor)
                return
            is_queued = kind == "queued"
            if is_queued:
                yield await queued(cursor)
            else:
                yield sse("running", {"state": "running", "step": int(fields.get(b"step", b"0")),
                                      "total_steps": total}, cursor)
