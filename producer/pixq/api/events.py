"""Server-Sent Events for one job, read from its event stream (``records.EVENTS_PREFIX``).

The worker's scripts append ``queued``, ``running`` (at claim and after every step) and the
terminal state to that stream in the same call that changes the record, so nothing is missed
between polls. Each SSE event's id is the stream entry's id: ``Last-Event-ID`` resumes after it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from pixq.records import EVENTS_PREFIX, JobRecord, JobState, RecordStore, decode_record
from pixq.wire import queue_lists

if TYPE_CHECKING:
    from pixq.api.app import ApiState

KEEPALIVE_S = 15.0
QUEUED_POLL_S = 2.0  # how often a queued job's position is recomputed
_ENTRY_ID_CHARS = set("0123456789-")


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
                 render: Callable[[JobRecord], dict[str, Any]]) -> AsyncIterator[bytes]:
    """The job's events until it ends (or, resumed, from after ``last_event_id``)."""
    conn: Any = state.aconn  # redis.asyncio's reply types are unions mypy cannot narrow
    key, stream = RecordStore.key(record.id), EVENTS_PREFIX + record.id
    total = record.total_steps

    async def terminal(event_id: str | None) -> bytes:
        raw = await conn.hgetall(key)
        final = decode_record(raw) if raw else record
        return sse(final.state.value, render(final), event_id)

    async def queued(event_id: str | None) -> bytes:
        return sse("queued", {"state": "queued", "position": await queue_position(state, record)}, event_id)

    if last_event_id and set(last_event_id) <= _ENTRY_ID_CHARS:
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
    while True:
        reply = await conn.xread({stream: cursor}, count=200,
                                 block=int(1000 * (QUEUED_POLL_S if is_queued else KEEPALIVE_S)))
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
