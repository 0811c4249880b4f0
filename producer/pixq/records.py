"""The job record's store: reads and changes job records, kept in Redis hashes that other services poll.

Celery's result backend is not the record: an unknown id here reads as unknown, never as
``PENDING``. State changes go through one Lua script each (``recordscripts``), so a change happens
only from the states it is allowed from (a canceled job never turns ``running``, a finished one never
changes again). The record's layout (model, keys, hash fields) is ``pixq.jobrecord``'s, re-exported
here for the store's callers; a new job's record is planned by ``pixq.submitplan``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis

from pixq.durable import Durability
from pixq.errors import JobNotFound
from pixq.jobrecord import (
    CODEC,
    DEAD_KEY,
    EVENTS_PREFIX,
    INFLIGHT_PREFIX,
    KEY_PREFIX,
    LEASE_PREFIX,
    NO_OWNER,
    OUTBOX_KEY,
    OWNER_INDEX_PREFIX,
    QUEUED_KEY,
    RUNNING_KEY,
    ImageRecord,
    JobError,
    JobRecord,
    JobState,
    RenderInfo,
    decode_record,
    encode_fields,
    job_key,
    lease_key,
)
from pixq.recordscripts import CLAIM, CREATE, CREATE_MANY, PROGRESS, REAP, RELEASE, RENEW, RETRY, TRANSITION
from pixq.schema import JobRequest
from pixq.submitplan import BatchPlan, SubmitPlan, plan_submit

__all__ = [
    "DEAD_KEY", "EVENTS_PREFIX", "INFLIGHT_PREFIX", "KEY_PREFIX", "LEASE_PREFIX", "NO_OWNER", "OUTBOX_KEY",
    "OWNER_INDEX_PREFIX", "QUEUED_KEY", "RUNNING_KEY", "ImageRecord", "JobError", "JobRecord", "JobState",
    "RecordStore", "RenderInfo", "decode_record",
]

_REQUEUE_FIELDS = CODEC.requeue_fields()


def _strings(members: Any) -> list[str]:
    return [m.decode() if isinstance(m, bytes) else str(m) for m in members]


class RecordStore:
    """Reads and changes job records. Takes an explicit Redis connection."""

    def __init__(self, conn: redis.Redis, retention_s: int, durability: Durability | None = None):
        self.conn = conn
        self.retention_s = retention_s
        # Claims, ends and cancels are confirmed on replicas before they count (durable.py).
        self.durability = durability or Durability(conn, min_replicas=0)
        self._transition = conn.register_script(TRANSITION)
        self._create = conn.register_script(CREATE)
        self._create_many = conn.register_script(CREATE_MANY)
        self._claim = conn.register_script(CLAIM)
        self._reap = conn.register_script(REAP)
        self._renew = conn.register_script(RENEW)
        self._progress = conn.register_script(PROGRESS)
        self._release = conn.register_script(RELEASE)
        self._retry = conn.register_script(RETRY)

    key = staticmethod(job_key)
    lease_key = staticmethod(lease_key)

    # -- producer side ----------------------------------------------------------------------

    def write(self, plan: SubmitPlan, pipe: Any = None) -> None:
        """Run a planned submit's create script: the record, its indexes, its message and its
        ``queued`` event in one step. Raises for its refusals (then nothing is written: ``QuotaExceeded``,
        ``KeyRefused``); with ``pipe`` (a Redis pipeline) the write is only queued on it."""
        created = self._create(keys=plan.keys, args=plan.args, client=pipe)
        if pipe is None:
            plan.check_created(created)

    def write_many(self, plan: BatchPlan) -> None:
        """Run a planned batch (all or none); ``RuntimeError`` when a job's id is taken (then nothing is
        written: never in practice, the ids are uuid4s)."""
        taken = self._create_many(keys=plan.keys, args=plan.args)
        if taken:
            raise RuntimeError(f"submit_many: job {plan.job_ids[int(taken) - 1]} existed already; nothing written")

    def create(self, job_id: str, request: JobRequest, owner: str | None = None, max_in_flight: int = 0,
               pipe: Any = None) -> JobRecord:
        """Write a queued record without a message (``Client.submit`` plans one with it)."""
        plan = plan_submit(request, retention_s=self.retention_s, owner=owner, max_in_flight=max_in_flight,
                           job_id=job_id)
        self.write(plan, pipe)
        return plan.record()

    def get(self, job_id: str) -> JobRecord:
        raw = self.conn.hgetall(self.key(job_id))
        if not raw:
            raise JobNotFound(f"no job {job_id!r} (never submitted, or expired)")
        return decode_record(raw)  # type: ignore[arg-type]

    def transition(
        self, job_id: str, allowed: tuple[JobState, ...] | None, **fields: Any
    ) -> tuple[bool, JobState | None]:
        """Set ``fields`` if the job's state is in ``allowed`` (``None``: any state).

        Returns whether it was set and the state the job was in.
        """
        allowed_arg = "*" if allowed is None else ",".join(s.value for s in allowed)
        terminal = isinstance(fields.get("state"), JobState) and fields["state"].is_terminal
        if not terminal:
            done, state = self._transition(keys=[self.key(job_id)], args=[allowed_arg, *encode_fields(fields)])
            return bool(done), JobState(state.decode()) if state else None

        def build(pipe: Any) -> None:
            self._transition(keys=[self.key(job_id)], args=[allowed_arg, *encode_fields(fields)], client=pipe)

        [(done, state)] = self.durability.run(f"job {job_id}'s change to {fields['state'].value}", build)
        if done:
            self.conn.expire(self.key(job_id), self.retention_s)  # retention counts from the end
        return bool(done), JobState(state.decode()) if state else None

    def retry(self, job_id: str) -> bool:
        """Put a failed or canceled job back to queued with fresh attempts (caller re-sends)."""
        done, _ = self._retry(keys=[self.key(job_id), DEAD_KEY, QUEUED_KEY],
                              args=[job_id, self.retention_s, time.time(), *_REQUEUE_FIELDS])
        return bool(done)

    def dead_ids(self) -> list[str]:
        return _strings(self.conn.zrange(DEAD_KEY, 0, -1))

    def running_ids(self) -> list[str]:
        return _strings(self.conn.zrange(RUNNING_KEY, 0, -1))

    def queued_before(self, cutoff: float) -> list[str]:
        """Jobs in the queued index since before ``cutoff`` (some may have moved on since)."""
        return _strings(self.conn.zrangebyscore(QUEUED_KEY, "-inf", cutoff))

    def mark_queued(self, job_id: str, at: float | None = None) -> None:
        """(Re)start the job's time in the queued index: a message for it was just sent."""
        self.conn.zadd(QUEUED_KEY, {job_id: time.time() if at is None else at})

    def unindex_queued(self, job_id: str) -> None:
        self.conn.zrem(QUEUED_KEY, job_id)

    def delete(self, job_id: str) -> None:
        self.conn.delete(self.key(job_id))

    # -- worker side ------------------------------------------------------------------------

    def _job_keys(self, job_id: str) -> list[str]:
        return [self.key(job_id), self.lease_key(job_id), RUNNING_KEY, DEAD_KEY, QUEUED_KEY]

    def claim(self, job_id: str, worker: str, lease_ttl_s: float, max_attempts: int) -> tuple[str, str]:
        """Take the job: ``('claimed', attempts)``, or why not: ``missing``, ``busy`` (another
        worker holds its lease), ``settled`` (already ended), ``dead`` (out of attempts)."""
        args: list[str | int | float] = [job_id, time.time(), max_attempts, self.retention_s, worker,
                                         int(lease_ttl_s * 1000), uuid.uuid4().hex]
        [(outcome, detail)] = self.durability.run(
            f"the claim of job {job_id}", lambda pipe: self._claim(keys=self._job_keys(job_id), args=args, client=pipe))
        return outcome.decode(), detail.decode() if isinstance(detail, bytes) else str(detail)

    def reap(self, job_id: str, max_attempts: int) -> tuple[str, str]:
        """Re-queue a running job whose lease lapsed: ``requeued``, ``dead``, ``alive``, ..."""
        outcome, detail = self._reap(
            keys=self._job_keys(job_id), args=[job_id, time.time(), max_attempts, self.retention_s]
        )
        return outcome.decode(), detail.decode() if isinstance(detail, bytes) else str(detail)

    def renew_lease(self, job_id: str, worker: str, lease_ttl_s: float) -> bool:
        return bool(self._renew(keys=[self.lease_key(job_id)], args=[worker, int(lease_ttl_s * 1000)]))

    def progress(self, job_id: str, worker: str, step: int, batch: int | None = None) -> str:
        """Record a finished step (and the images of the batch it renders in): ``ok``, ``cancel``
        (asked to stop) or ``lost`` (not ours)."""
        args: list[Any] = [worker, step] + ([batch] if batch is not None else [])
        answer = self._progress(keys=[self.key(job_id), self.lease_key(job_id)], args=args)
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def release(self, job_id: str, holder: str, attempts_delta: int = 0, **fields: Any) -> bool:
        """End (or give back) a job ``holder`` holds; ``False`` if it is no longer theirs."""
        state = fields.get("state")
        keys = [self.key(job_id), self.lease_key(job_id), RUNNING_KEY, QUEUED_KEY]
        args = [holder, job_id, self.retention_s, attempts_delta,
                state.value if isinstance(state, JobState) else "", time.time(), *encode_fields(fields)]
        if not (isinstance(state, JobState) and state.is_terminal):
            done, _ = self._release(keys=keys, args=args)  # a give-back: nobody is told "done"
            return bool(done)
        [(done, _)] = self.durability.run(f"job {job_id}'s end ({state.value})",
                                          lambda pipe: self._release(keys=keys, args=args, client=pipe))
        return bool(done)
