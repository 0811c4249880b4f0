"""Listing an owner's jobs, newest first, a page at a time.

``records.create`` writes each job into its owner's index (``OWNER_INDEX_PREFIX``: job id ->
created_at) in the same script as the record. A page is read newest first from there; ids whose
records expired are dropped from the index as they are met. The cursor is the last job's
(created_at, id), so jobs submitted meanwhile never shift a page.
"""

from __future__ import annotations

import base64
from typing import Any

from pixq.records import NO_OWNER, OWNER_INDEX_PREFIX, JobRecord, JobState, RecordStore, decode_record

BATCH = 200
MAX_SCANNED = 5000  # per page, with a state filter that matches little


def encode_cursor(created_at: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at!r}|{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Raises ``ValueError`` for anything ``encode_cursor`` did not make."""
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    score, _, job_id = raw.partition("|")
    if not job_id:
        raise ValueError("not a cursor")
    return float(score), job_id


def list_jobs(
    records: RecordStore, owner: str | None, state: JobState | None = None, limit: int = 20,
    after: tuple[float, str] | None = None,
) -> tuple[list[JobRecord], str | None]:
    """Up to ``limit`` of ``owner``'s jobs older than ``after``; and the cursor of the next page."""
    index = OWNER_INDEX_PREFIX + (owner or NO_OWNER)
    conn = records.conn
    found: list[JobRecord] = []
    top: float | str = "+inf" if after is None else after[0]
    skip_from = after  # among jobs created at exactly after[0], those sorted at or above its id were shown
    scanned = 0
    while len(found) < limit and scanned < MAX_SCANNED:
        batch: Any = conn.zrevrangebyscore(index, top, "-inf", start=0, num=BATCH, withscores=True)
        if not batch:
            return found, None
        members = [(m.decode(), float(s)) for m, s in batch]  # type: ignore[union-attr, str-unpack]
        if skip_from is not None:
            members = [(m, s) for m, s in members if not (s == skip_from[0] and m >= skip_from[1])]
        pipe = conn.pipeline(transaction=False)
        for job_id, _ in members:
            pipe.hgetall(RecordStore.key(job_id))
        gone = []
        for (job_id, score), raw in zip(members, pipe.execute(), strict=True):
            scanned += 1
            if not raw:
                gone.append(job_id)
                continue
            record = decode_record(raw)
            if state is None or record.state is state:
                found.append(record)
                if len(found) == limit:
                    if gone:
                        conn.zrem(index, *gone)
                    return found, encode_cursor(score, job_id)
        if gone:
            conn.zrem(index, *gone)
        last_id, last_score = batch[-1][0].decode(), float(batch[-1][1])  # type: ignore[union-attr]
        if len(batch) < BATCH:
            return found, None
        top, skip_from = last_score, (last_score, last_id)
    return found, (encode_cursor(found[-1].created_at, found[-1].id) if found else None)
