"""Listing jobs, newest first, a page at a time: one owner's, or every owner's (an operator's view).

``records.create`` writes each job into its owner's index (``OWNER_INDEX_PREFIX``: job id ->
created_at) in the same script as the record. A page is read newest first from there (from every
owner's index at once, merged, for the operator's view); ids whose records expired are dropped from
their index as they are met. The cursor is the last job's (created_at, id), the same order in every
index, so jobs submitted meanwhile never shift a page.
"""

from __future__ import annotations

import base64
import heapq
import math
from collections.abc import Iterator
from typing import Any

import redis

from pixq.records import NO_OWNER, OWNER_INDEX_PREFIX, JobRecord, JobState, RecordStore, decode_record

BATCH = 200
MAX_SCANNED = 5000  # per page, with a state filter that matches little


def encode_cursor(created_at: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at!r}|{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Raises ``ValueError`` for anything ``encode_cursor`` did not make (a NaN or infinite time too:
    Redis would refuse it as a score range, and it is no job's creation time)."""
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    score, _, job_id = raw.partition("|")
    if not job_id:
        raise ValueError("not a cursor")
    created_at = float(score)
    if not math.isfinite(created_at):
        raise ValueError("not a cursor")
    return created_at, job_id


def owner_indexes(conn: redis.Redis) -> list[str]:
    """Every owner's index (API keys' and ``NO_OWNER``'s, jobs submitted without a key)."""
    found = conn.scan_iter(match=OWNER_INDEX_PREFIX + "*", count=1000, _type="zset")
    return sorted(k.decode() if isinstance(k, bytes) else str(k) for k in found)


def list_jobs(
    records: RecordStore, owner: str | None, state: JobState | None = None, limit: int = 20,
    after: tuple[float, str] | None = None,
) -> tuple[list[JobRecord], str | None]:
    """Up to ``limit`` of ``owner``'s jobs older than ``after``; and the cursor of the next page."""
    return list_indexed(records, [OWNER_INDEX_PREFIX + (owner or NO_OWNER)], state, limit, after)


def list_every_owners_jobs(
    records: RecordStore, state: JobState | None = None, limit: int = 20, after: tuple[float, str] | None = None,
) -> tuple[list[JobRecord], str | None]:
    """``list_jobs`` over every owner's jobs, merged newest first."""
    return list_indexed(records, owner_indexes(records.conn), state, limit, after)


def list_indexed(
    records: RecordStore, indexes: list[str], state: JobState | None, limit: int, after: tuple[float, str] | None,
) -> tuple[list[JobRecord], str | None]:
    """The page of the jobs in ``indexes`` (merged newest first) older than ``after``."""
    conn = records.conn
    merged = heapq.merge(*(_newest_first(conn, index, after) for index in indexes), reverse=True)
    found: list[JobRecord] = []
    scanned = 0
    while len(found) < limit and scanned < MAX_SCANNED:
        chunk = [entry for _, entry in zip(range(BATCH), merged, strict=False)]
        if not chunk:
            return found, None
        pipe = conn.pipeline(transaction=False)
        for _, job_id, _ in chunk:
            pipe.hgetall(RecordStore.key(job_id))
        gone: dict[str, list[str]] = {}
        for (score, job_id, index), raw in zip(chunk, pipe.execute(), strict=True):
            scanned += 1
            if not raw:
                gone.setdefault(index, []).append(job_id)
                continue
            record = decode_record(raw)
            if state is None or record.state is state:
                found.append(record)
                if len(found) == limit:
                    _forget(conn, gone)
                    return found, encode_cursor(score, job_id)
        _forget(conn, gone)
    return found, (encode_cursor(found[-1].created_at, found[-1].id) if found else None)


def _forget(conn: redis.Redis, gone: dict[str, list[str]]) -> None:
    for index, ids in gone.items():
        conn.zrem(index, *ids)


def _newest_first(conn: redis.Redis, index: str, after: tuple[float, str] | None) -> Iterator[tuple[float, str, str]]:
    """(created_at, job id, index) of the index's jobs older than ``after``, newest first (ties: the
    greater id first, as ZREVRANGEBYSCORE orders them), read a batch at a time."""
    top: float | str = "+inf" if after is None else after[0]
    offset = 0  # members at score ``top`` already read (more than a batch may share one creation time)
    while True:
        batch: Any = conn.zrevrangebyscore(index, top, "-inf", start=offset, num=BATCH, withscores=True)
        members = [(float(s), m.decode()) for m, s in batch]
        for score, job_id in members:
            if after is not None and score == after[0] and job_id >= after[1]:
                continue  # at the cursor's time, those sorted at or above its id were shown
            yield score, job_id, index
        if len(batch) < BATCH:
            return
        last = members[-1][0]
        same = sum(1 for score, _ in members if score == last)
        offset = offset + same if top == last else same
        top = last
