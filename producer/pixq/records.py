"""The job record: the truth about a job, kept in a Redis hash that other services poll.

Celery's result backend is not the record: an unknown id here reads as unknown, never as
``PENDING``. State changes go through one Lua script, so a change happens only from the
states it is allowed from (a canceled job never turns ``running``, a finished one never
changes again).
"""

from __future__ import annotations

import enum
import json
import time
import uuid
from typing import Any

import redis
from pydantic import BaseModel

from pixq.durable import Durability
from pixq.errors import JobNotFound, PixqError, QuotaExceeded
from pixq.recordscripts import CLAIM, CREATE, KEY_OK, PROGRESS, REAP, RELEASE, RENEW, RETRY, TRANSITION
from pixq.schema import JobRequest, RenderMode, Scheduler

KEY_PREFIX = "pixq:job:"


class KeyRefused(PixqError):
    """The create script found the submitting API key unknown, changed or revoked (nothing written)."""


class JobState(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.canceled)


class ImageRecord(BaseModel):
    index: int
    bucket: str
    key: str
    width: int
    height: int
    seed: int
    content_type: str
    size_bytes: int
    sha256: str


class RenderInfo(BaseModel):
    """How the worker rendered a succeeded job."""

    mode: RenderMode
    scheduler: Scheduler = Scheduler.dpm_solver  # the sampler that ran (records from before samplers: the default)
    width: int  # the size the model rendered at: with resolution binning, the trained size nearest
    height: int
    resized: bool  # the images were resized from width x height to the requested size
    vae_tiled: bool
    transformer_rows_per_image: int  # 2 per step with guidance in exact mode; fewer in fast mode
    render_s: float
    difference_from_exact: str | None = None  # fast mode: its measured difference (docs/performance.md)
    batch_images: int = 1  # images in the pipeline call that rendered this job (its own and its partners')
    batch_jobs: int = 1  # jobs that shared that call
    batch_id: str | None = None  # the id of the call's first job: the jobs that rendered together share it


class JobError(BaseModel):
    type: str
    message: str


class JobRecord(BaseModel):
    id: str
    state: JobState
    request: JobRequest
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    worker: str | None = None
    step: int = 0
    total_steps: int = 0
    images: list[ImageRecord] = []
    render: RenderInfo | None = None
    error: JobError | None = None
    cancel_requested: bool = False
    owner: str | None = None  # the API key (its id) that submitted the job; None for direct Python clients
    batch: int = 0  # while running: images in the pipeline call it renders in (0: not rendering yet)

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


RUNNING_KEY = "pixq:running"  # ZSET job id -> claim time: jobs some worker holds a lease on
# ZSET job id -> time it was (re)queued: every job that may be waiting for a message. A superset
# (entries whose record moved on are dropped by the reaper's reconciliation, worker/.../reaper.py).
QUEUED_KEY = "pixq:queued"
DEAD_KEY = "pixq:dead"  # ZSET job id -> time: jobs that ran out of attempts
LEASE_PREFIX = "pixq:lease:"
# Written by the scripts below together with the state change they describe:
OUTBOX_KEY = "pixq:outbox"  # STREAM: webhook events (event + the whole record), read by the relays
EVENTS_PREFIX = "pixq:events:"  # STREAM per job: queued / running (every step) / terminal, for SSE
OWNER_INDEX_PREFIX = "pixq:owner-jobs:"  # ZSET per owner ("-": none): job id -> created_at
INFLIGHT_PREFIX = "pixq:owner-inflight:"  # ZSET per owner with a max-in-flight quota: its unfinished jobs
NO_OWNER = "-"


CREATE_LUA = CREATE  # for the API's asyncio connection (pixq/api/fast.py), with ``RecordStore.create_call``
KEY_OK_LUA = KEY_OK


def _encode(fields: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        if isinstance(value, BaseModel):
            value = value.model_dump_json()
        elif isinstance(value, list):
            value = json.dumps([v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value])
        elif isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, bool):
            value = "1" if value else "0"
        elif value is None:
            value = ""
        flat += [name, str(value)]
    return flat


def queued_fields(record: JobRecord) -> list[str]:
    """A new (queued) record's hash fields: what ``_encode`` makes of its non-empty fields, written out
    (the submit paths' hottest step; ``tests/test_messages.py`` checks the two agree)."""
    flat = ["id", record.id, "state", record.state.value, "created_at", str(record.created_at),
            "attempts", str(record.attempts), "step", str(record.step), "total_steps", str(record.total_steps),
            "cancel_requested", "1" if record.cancel_requested else "0"]
    if record.owner is not None:
        flat += ["owner", record.owner]
    return flat + ["batch", str(record.batch), "request", record.request.model_dump_json()]


def encoded_fields(record: JobRecord) -> list[str]:
    """Any record's non-empty fields as hash fields, the general way (``queued_fields`` is its fast twin)."""
    fields = record.model_dump(exclude={"images", "error", "render", "request"}, exclude_none=True)
    fields["request"] = record.request
    return _encode(fields)


def _decode(raw: dict[bytes, bytes]) -> JobRecord:
    f = {k.decode(): v.decode() for k, v in raw.items()}

    def opt_float(name: str) -> float | None:
        return float(f[name]) if f.get(name) else None

    return JobRecord(
        id=f["id"],
        state=JobState(f["state"]),
        request=JobRequest.model_validate_json(f["request"]),
        created_at=float(f["created_at"]),
        started_at=opt_float("started_at"),
        finished_at=opt_float("finished_at"),
        attempts=int(f.get("attempts") or 0),
        worker=f.get("worker") or None,
        step=int(f.get("step") or 0),
        total_steps=int(f.get("total_steps") or 0),
        images=[ImageRecord.model_validate(i) for i in json.loads(f.get("images") or "[]")],
        render=RenderInfo.model_validate_json(f["render"]) if f.get("render") else None,
        error=JobError.model_validate_json(f["error"]) if f.get("error") else None,
        cancel_requested=f.get("cancel_requested") == "1",
        owner=f.get("owner") or None,
        batch=int(f.get("batch") or 0),
    )


decode_record = _decode  # the record from a raw HGETALL (listing and event streams read hashes in pipelines)


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
        self._claim = conn.register_script(CLAIM)
        self._reap = conn.register_script(REAP)
        self._renew = conn.register_script(RENEW)
        self._progress = conn.register_script(PROGRESS)
        self._release = conn.register_script(RELEASE)
        self._retry = conn.register_script(RETRY)

    @staticmethod
    def key(job_id: str) -> str:
        return KEY_PREFIX + job_id

    @staticmethod
    def lease_key(job_id: str) -> str:
        return LEASE_PREFIX + job_id

    # -- producer side ----------------------------------------------------------------------

    def create_call(self, job_id: str, request: JobRequest, owner: str | None = None, max_in_flight: int = 0,
                    message: tuple[str, Any] | None = None,
                    api_key: tuple[str, str] | None = None) -> tuple[list[str], list[Any], JobRecord]:
        """The create script's keys and arguments, and the record it writes (``create`` runs it;
        the API's async path runs the same script on its own connection). ``api_key`` (the key's
        Redis hash, its HMAC): the script writes nothing (answers -2) unless that key is live."""
        record = JobRecord(
            id=job_id,
            state=JobState.queued,
            request=request,
            created_at=time.time(),
            total_steps=request.num_inference_steps,
            owner=owner,
        )
        tenant = owner or NO_OWNER
        keys = [self.key(job_id), QUEUED_KEY, OWNER_INDEX_PREFIX + tenant, INFLIGHT_PREFIX + tenant,
                message[0] if message else "", api_key[0] if api_key else ""]
        args = [self.retention_s, job_id, repr(record.created_at), max_in_flight, message[1] if message else "",
                api_key[1] if api_key else "", *queued_fields(record)]
        return keys, args, record

    @staticmethod
    def check_created(created: Any, job_id: str, max_in_flight: int) -> None:
        """Raise for the create script's refusals (nothing was written)."""
        if created == -1:
            raise QuotaExceeded(f"key already has {max_in_flight} unfinished jobs (its max-in-flight quota)")
        if created == -2:
            raise KeyRefused("unknown, wrong or revoked API key")
        if not created:
            raise ValueError(f"job {job_id} already exists")

    def create(self, job_id: str, request: JobRequest, owner: str | None = None, max_in_flight: int = 0,
               pipe: Any = None, message: tuple[str, Any] | None = None) -> JobRecord:
        """Write the queued record (and its owner's index entry). Raises ``QuotaExceeded`` when
        ``owner`` already has ``max_in_flight`` unfinished jobs (then nothing is written).
        ``message`` (queue list, body) is pushed in the same script, so there is never a record
        without its message or the reverse. With ``pipe`` (a Redis pipeline) the write is only
        queued on it: its reply says 1 if created."""
        keys, args, record = self.create_call(job_id, request, owner, max_in_flight, message)
        created = self._create(keys=keys, args=args, client=pipe)
        if pipe is None:
            self.check_created(created, job_id, max_in_flight)
        return record

    def get(self, job_id: str) -> JobRecord:
        raw = self.conn.hgetall(self.key(job_id))
        if not raw:
            raise JobNotFound(f"no job {job_id!r} (never submitted, or expired)")
        return _decode(raw)  # type: ignore[arg-type]

    def transition(
        self, job_id: str, allowed: tuple[JobState, ...] | None, **fields: Any
    ) -> tuple[bool, JobState | None]:
        """Set ``fields`` if the job's state is in ``allowed`` (``None``: any state).

        Returns whether it was set and the state the job was in.
        """
        allowed_arg = "*" if allowed is None else ",".join(s.value for s in allowed)
        terminal = fields.get("state") in (JobState.succeeded, JobState.failed, JobState.canceled)
        if not terminal:
            done, state = self._transition(keys=[self.key(job_id)], args=[allowed_arg, *_encode(fields)])
            return bool(done), JobState(state.decode()) if state else None

        def build(pipe: Any) -> None:
            self._transition(keys=[self.key(job_id)], args=[allowed_arg, *_encode(fields)], client=pipe)

        [(done, state)] = self.durability.run(f"job {job_id}'s change to {fields['state'].value}", build)
        if done:
            self.conn.expire(self.key(job_id), self.retention_s)  # retention counts from the end
        return bool(done), JobState(state.decode()) if state else None

    def retry(self, job_id: str) -> bool:
        """Put a failed or canceled job back to queued with fresh attempts (caller re-sends)."""
        done, _ = self._retry(keys=[self.key(job_id), DEAD_KEY, QUEUED_KEY],
                              args=[job_id, self.retention_s, time.time()])
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
                state.value if isinstance(state, JobState) else "", time.time(), *_encode(fields)]
        if not (isinstance(state, JobState) and state.is_terminal):
            done, _ = self._release(keys=keys, args=args)  # a give-back: nobody is told "done"
            return bool(done)
        [(done, _)] = self.durability.run(f"job {job_id}'s end ({state.value})",
                                          lambda pipe: self._release(keys=keys, args=args, client=pipe))
        return bool(done)
