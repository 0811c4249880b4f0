"""The job record's layout, written down once: its model, its Redis keys and how each field sits in the
job's hash.

Everything that reads or writes a record takes its names from here: ``records.RecordStore`` (the
store), ``recordscripts`` (the Lua scripts, formatted from these constants), ``submitplan`` (a new
job's fields) and the readers (listing, events, the API). The hash's fields are ``JobRecord``'s
fields; ``CODEC`` encodes and decodes them from the model's own annotations, so a new field is one
line in ``JobRecord`` (with its default): every submit path writes it, ``decode`` reads it and a
retried job gets its default back (``tests/unit/test_jobrecord.py``).
"""

from __future__ import annotations

import enum
import json
import types
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from pixq.schema import JobRequest, RenderMode, Scheduler

# -- Redis keys ------------------------------------------------------------------------------
KEY_PREFIX = "pixq:job:"  # HASH per job: the record
RUNNING_KEY = "pixq:running"  # ZSET job id -> claim time: jobs some worker holds a lease on
# ZSET job id -> time it was (re)queued: every job that may be waiting for a message. A superset
# (entries whose record moved on are dropped by the reaper's reconciliation, worker/pixq/worker/jobs/reaper.py).
QUEUED_KEY = "pixq:queued"
DEAD_KEY = "pixq:dead"  # ZSET job id -> time: jobs that ran out of attempts
LEASE_PREFIX = "pixq:lease:"  # STRING per running job: its worker's name, expiring with the lease
OUTBOX_KEY = "pixq:outbox"  # STREAM: webhook events (event + the whole record), read by the relays
EVENTS_PREFIX = "pixq:events:"  # STREAM per job: queued / running (every step) / terminal, for SSE
OWNER_INDEX_PREFIX = "pixq:owner-jobs:"  # ZSET per owner ("-": none): job id -> created_at
INFLIGHT_PREFIX = "pixq:owner-inflight:"  # ZSET per owner with a max-in-flight quota: its unfinished jobs
IDEMPOTENCY_PREFIX = "pixq:idem:"  # STRING per idempotency key ("{owner}/{key}" for an API key's): the job id
NO_OWNER = "-"
EVENTS_KEPT = 1000  # a job's event stream is trimmed to about this many entries

# Hash fields kept beside the record's own, never part of the model: the claim's token (a claim
# re-run after a lost reply finds its own), who ended the job (an end re-run finds its own), and the
# write a durable submit WAITs behind (durable.py).
CLAIM_FIELD = "claim"
ENDED_BY_FIELD = "ended_by"
SENT_AT_FIELD = "sent_at"


def job_key(job_id: str) -> str:
    return KEY_PREFIX + job_id


def lease_key(job_id: str) -> str:
    return LEASE_PREFIX + job_id


# -- the model -------------------------------------------------------------------------------
class JobState(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.succeeded, JobState.failed, JobState.canceled})


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


def new_record_values(job_id: str, request: JobRequest, created_at: float, owner: str | None) -> dict[str, Any]:
    """What a new job's record holds beyond its fields' defaults: the one place that says so."""
    return {"id": job_id, "state": JobState.queued, "request": request, "created_at": created_at,
            "total_steps": request.num_inference_steps, "owner": owner}


# A retried job keeps these; every other field goes back to its default (``RecordCodec.requeue_fields``).
KEPT_ON_RETRY = frozenset({"id", "request", "created_at", "total_steps", "owner"})


# -- the hash's encoding ---------------------------------------------------------------------
def encode_value(value: Any) -> str:
    """One field's value as the hash holds it: models and lists as JSON, booleans ``1``/``0``, ``None`` empty."""
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    if isinstance(value, list):
        return json.dumps([v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value])
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if value is None:
        return ""
    return str(value)


def encode_fields(fields: dict[str, Any]) -> list[str]:
    """Field/value pairs, flat, for HSET (any fields, including the hash-only ones)."""
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, encode_value(value)]
    return flat


def _decoder(annotation: Any) -> Callable[[str], Any]:
    """How a field of this type is read back from its text."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return lambda text: [item.model_validate(i) for i in json.loads(text)]
        return json.loads
    if annotation is bool:
        return lambda text: text == "1"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.model_validate_json
    if annotation in (int, float, str) or (isinstance(annotation, type) and issubclass(annotation, enum.Enum)):
        return annotation  # type: ignore[no-any-return]
    raise TypeError(f"jobrecord: no hash encoding for a field of type {annotation!r}")


def _encoder(annotation: Any) -> Callable[[Any], str]:
    """``encode_value`` for a field of this type, chosen once (a new record's fields are the hot path)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return lambda value: value if isinstance(value, str) else value.model_dump_json()  # type: ignore[no-any-return]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return lambda value: str(value.value)
    if annotation in (int, float, str):
        return str
    return encode_value


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, list) and not value)


class RecordCodec:
    """A record model's hash fields, from its annotations: encode, decode, a new record's fields."""

    def __init__(self, model: type[JobRecord]):
        self.model = model
        fields = model.model_fields
        self.names = tuple(fields)
        self._decoders = {name: _decoder(field.annotation) for name, field in fields.items()}
        self._encoders = {name: _encoder(field.annotation) for name, field in fields.items()}
        self._required = frozenset(name for name, field in fields.items() if field.is_required())
        self._defaults = {name: field.get_default(call_default_factory=True) for name, field in fields.items()
                          if not field.is_required()}
        # A new record's fields in the model's order: (name, "", its encoder) where each job gives the
        # value, else (name, its default encoded, None); fields whose default is empty are not written.
        given = set(new_record_values("x", JobRequest.model_construct(), 0.0, None))
        self._new: list[tuple[str, str, Callable[[Any], str] | None]] = [
            (name, "", self._encoders[name]) if name in given else (name, encode_value(self._defaults[name]), None)
            for name in self.names if name in given or not _is_empty(self._defaults[name])]

    def decode(self, raw: dict[bytes, bytes]) -> JobRecord:
        """The record from its hash (an HGETALL); an empty or missing field reads as its default."""
        values: dict[str, Any] = {}
        for key, value in raw.items():
            name = key.decode()
            decode = self._decoders.get(name)
            if decode is not None and value:
                values[name] = decode(value.decode())
        missing = self._required - values.keys()
        if missing:
            raise KeyError(f"job record without {sorted(missing)}")
        return self.model(**values)

    def new_fields(self, job_id: str, request: JobRequest, created_at: float, owner: str | None = None,
                   request_json: str | None = None) -> list[str]:
        """A new (queued) job's hash fields, flat: its given values and the non-empty defaults. The
        submit paths' hottest step: the defaults are encoded once (``request_json``: the request's
        JSON when the caller has it)."""
        given = new_record_values(job_id, request, created_at, owner)
        if request_json is not None:
            given["request"] = request_json
        flat: list[str] = []
        for name, default, encode in self._new:
            if encode is None:
                flat += (name, default)
            elif (value := given[name]) is not None:
                flat += (name, encode(value))
        return flat

    def new_layout(self, owner: str | None = None) -> tuple[list[str], list[str]]:
        """For many new jobs of one owner (a batch's script): the names of the fields whose values differ
        from job to job (``new_values``) and the pairs every such job has (the non-empty defaults, and given
        values that depend on no job, as ``state``): ``new_fields`` in two parts, so a batch sends the
        names and the common pairs once."""
        one = new_record_values("x", JobRequest.model_construct(num_inference_steps=1), 0.0, owner)
        other = new_record_values("y", JobRequest.model_construct(num_inference_steps=2), 1.0, owner)
        names: list[str] = []
        fixed: list[str] = []
        for name, default, encode in self._new:
            if encode is None:
                fixed += (name, default)
            elif one[name] != other[name]:
                names.append(name)
            elif one[name] is not None:
                fixed += (name, encode(one[name]))
        return names, fixed

    def new_values(self, names: list[str], job_id: str, request: JobRequest, created_at: float,
                   owner: str | None = None) -> list[str]:
        """The values of ``names`` (``new_layout``'s) for one new job."""
        given = new_record_values(job_id, request, created_at, owner)
        encoders = self._encoders
        return [encoders[name](given[name]) for name in names]

    def encode(self, record: JobRecord) -> list[str]:
        """Any record's non-empty fields, flat (the general way; ``new_fields`` is a new record's)."""
        return encode_fields({name: value for name in self.names
                              if not _is_empty(value := getattr(record, name))})

    def requeue_fields(self) -> list[str]:
        """What a retried job is set to: ``queued`` and every field not ``KEPT_ON_RETRY`` at its default."""
        reset = {name: self._defaults[name] for name in self.names
                 if name not in KEPT_ON_RETRY and name in self._defaults}
        return encode_fields({"state": JobState.queued, **reset})


CODEC = RecordCodec(JobRecord)
decode_record = CODEC.decode  # the record from a raw HGETALL (listing and event streams read hashes in pipelines)
