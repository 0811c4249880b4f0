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
from typing import Any

import redis
from pydantic import BaseModel

from producer.errors import JobNotFound
from producer.schema import JobRequest

KEY_PREFIX = "pixq:job:"


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
    error: JobError | None = None
    cancel_requested: bool = False

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# KEYS[1]: the job hash. ARGV[1]: allowed current states, comma-joined ("*": any).
# ARGV[2..]: field, value pairs to set. Returns {1, old_state} if set, {0, state} if not
# (state false when the job does not exist).
_TRANSITION = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, false} end
if ARGV[1] ~= '*' then
  local allowed = false
  for s in string.gmatch(ARGV[1], '[^,]+') do
    if s == state then allowed = true end
  end
  if not allowed then return {0, state} end
end
if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
return {1, state}
"""

# KEYS[1]: the job hash. ARGV[1]: retention in seconds. ARGV[2..]: field, value pairs.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


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
        error=JobError.model_validate_json(f["error"]) if f.get("error") else None,
        cancel_requested=f.get("cancel_requested") == "1",
    )


class RecordStore:
    """Reads and changes job records. Takes an explicit Redis connection."""

    def __init__(self, conn: redis.Redis, retention_s: int):
        self.conn = conn
        self.retention_s = retention_s
        self._transition = conn.register_script(_TRANSITION)
        self._create = conn.register_script(_CREATE)

    @staticmethod
    def key(job_id: str) -> str:
        return KEY_PREFIX + job_id

    def create(self, job_id: str, request: JobRequest) -> JobRecord:
        record = JobRecord(
            id=job_id,
            state=JobState.queued,
            request=request,
            created_at=time.time(),
            total_steps=request.num_inference_steps,
        )
        fields = record.model_dump(exclude={"images", "error"}, exclude_none=True)
        fields["request"] = request
        created = self._create(keys=[self.key(job_id)], args=[self.retention_s, *_encode(fields)])
        if not created:
            raise ValueError(f"job {job_id} already exists")
        return record

    def get(self, job_id: str) -> JobRecord:
        raw = self.conn.hgetall(self.key(job_id))
        if not raw:
            raise JobNotFound(f"no job {job_id!r} (never submitted, or expired)")
        return _decode(raw)  # type: ignore[arg-type]

    def exists(self, job_id: str) -> bool:
        return bool(self.conn.exists(self.key(job_id)))

    def transition(
        self, job_id: str, allowed: tuple[JobState, ...] | None, **fields: Any
    ) -> tuple[bool, JobState | None]:
        """Set ``fields`` if the job's state is in ``allowed`` (``None``: any state).

        Returns whether it was set and the state the job was in.
        """
        allowed_arg = "*" if allowed is None else ",".join(s.value for s in allowed)
        done, state = self._transition(keys=[self.key(job_id)], args=[allowed_arg, *_encode(fields)])
        if fields.get("state") in (JobState.succeeded, JobState.failed, JobState.canceled) and done:
            self.conn.expire(self.key(job_id), self.retention_s)  # retention counts from the end
        return bool(done), JobState(state.decode()) if state else None

    def set_progress(self, job_id: str, step: int) -> bool:
        done, _ = self.transition(job_id, (JobState.running,), step=step)
        return done

    def cancel_requested(self, job_id: str) -> bool:
        return self.conn.hget(self.key(job_id), "cancel_requested") == b"1"

    def delete(self, job_id: str) -> None:
        self.conn.delete(self.key(job_id))
