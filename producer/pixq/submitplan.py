"""Planning a submit: everything a new job is, decided before anything is written.

The submit paths only *execute* a plan: ``Client.submit`` (sync), the API's fast path
(``pixq.api.fast``, asyncio) and ``Client.submit_many`` (one script for the batch). A plan is made
without Redis: the seed drawn, the job id, the idempotency key's name, the record's hash fields
(``jobrecord.CODEC``), the Celery message (from its template, ``pixq.messages``) and the create
script's keys and arguments (``recordscripts.CREATE`` / ``CREATE_MANY``). What each path adds is its
I/O: the queue depth read, the idempotency key's claim, the script call, the durable WAIT, the undo.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pixq.errors import PixqError, QueueFull, QuotaExceeded
from pixq.jobrecord import (
    CODEC,
    IDEMPOTENCY_PREFIX,
    INFLIGHT_PREFIX,
    NO_OWNER,
    OWNER_INDEX_PREFIX,
    QUEUED_KEY,
    JobRecord,
    job_key,
    new_record_values,
)
from pixq.schema import JobRequest

if TYPE_CHECKING:
    from pixq.messages import MessageTemplates


class KeyRefused(PixqError):
    """The create script found the submitting API key unknown, changed or revoked (nothing written)."""


def check_depth(model_name: str, waiting: int, limit: int, adding: int = 1) -> None:
    """``QueueFull`` when ``adding`` jobs to ``waiting`` would pass ``limit`` (0: no limit)."""
    if not limit or waiting + adding <= limit:
        return
    if adding == 1:
        raise QueueFull(f"queue for {model_name} holds {limit} jobs or more (PIXQ_MAX_QUEUE_DEPTH)")
    raise QueueFull(f"queue for {model_name} would pass {limit} jobs (PIXQ_MAX_QUEUE_DEPTH)")


def idempotency_key(request: JobRequest, owner: str | None) -> str | None:
    """The Redis key that names the job of the request's idempotency key (an API key's own)."""
    if request.idempotency_key is None:
        return None
    return IDEMPOTENCY_PREFIX + (f"{owner}/" if owner else "") + request.idempotency_key


@dataclass(frozen=True, slots=True)
class SubmitPlan:
    """One new job, planned: run ``keys``/``args`` through ``recordscripts.CREATE``."""

    job_id: str
    request: JobRequest  # with its seed
    created_at: float
    owner: str | None
    max_in_flight: int
    idem_key: str | None  # claim it (SET NX) before the create; see ``earlier_job``
    keys: list[str]
    args: list[Any]

    @property
    def job_key(self) -> str:
        return job_key(self.job_id)

    @property
    def undo_keys(self) -> list[str]:
        """What a failed submit may have written: delete these (nothing half-written)."""
        return [self.job_key, *([self.idem_key] if self.idem_key else [])]

    def record(self) -> JobRecord:
        """The record the create script writes."""
        return JobRecord(**new_record_values(self.job_id, self.request, self.created_at, self.owner))

    def earlier_job(self, existing: bytes | str | None) -> str | None:
        """After a refused claim of ``idem_key``: the job it names when that is another job (answer that
        one, nothing is written); ``None`` when it is ours (a SET retried after a lost reply) or expired
        (``existing`` None: claim it again, then create)."""
        if existing is None:
            return None
        found = existing.decode() if isinstance(existing, bytes) else existing
        return None if found == self.job_id else found

    def check_created(self, created: Any) -> None:
        """Raise for the create script's refusals (then nothing was written)."""
        if created == -1:
            raise QuotaExceeded(f"key already has {self.max_in_flight} unfinished jobs (its max-in-flight quota)")
        if created == -2:
            raise KeyRefused("unknown, wrong or revoked API key")
        if not created:
            raise ValueError(f"job {self.job_id} already exists")


def plan_submit(request: JobRequest, *, retention_s: int, templates: MessageTemplates | None = None,
                owner: str | None = None, max_in_flight: int = 0, api_key: tuple[str, str] | None = None,
                job_id: str | None = None, now: float | None = None) -> SubmitPlan:
    """Plan one validated request's job. ``templates``: its Celery message, pushed by the same script
    (``None``: no message); ``owner`` (an API key's id) scopes its idempotency key and listing;
    ``max_in_flight`` > 0 refuses an owner with that many unfinished jobs; ``api_key`` (the key's Redis
    hash, its HMAC): the script writes nothing unless that key is live."""
    request = request.with_seed()
    job_id = job_id or uuid.uuid4().hex
    created_at = time.time() if now is None else now
    queue, message = templates.messages([(job_id, request)])[0] if templates is not None else ("", "")
    tenant = owner or NO_OWNER
    keys = [job_key(job_id), QUEUED_KEY, OWNER_INDEX_PREFIX + tenant, INFLIGHT_PREFIX + tenant, queue,
            api_key[0] if api_key else ""]
    args = [retention_s, job_id, repr(created_at), max_in_flight, message, api_key[1] if api_key else "",
            *CODEC.new_fields(job_id, request, created_at, owner)]
    return SubmitPlan(job_id, request, created_at, owner, max_in_flight, idempotency_key(request, owner),
                      keys, args)


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """Many new jobs without owner, quota or API key: run ``keys``/``args`` through
    ``recordscripts.CREATE_MANY`` (all or none)."""

    job_ids: list[str]
    keys: list[str]
    args: list[Any]


def plan_batch(requests: list[JobRequest], *, retention_s: int, templates: MessageTemplates) -> BatchPlan:
    """Plan validated requests (their seeds drawn) as one batch; no idempotency keys (``submit``'s). The
    script's arguments: the fields' names and defaults once (``CODEC.new_layout``), then each job's
    message and values."""
    jobs = [(uuid.uuid4().hex, request.with_seed()) for request in requests]
    keys = [QUEUED_KEY, OWNER_INDEX_PREFIX + NO_OWNER, *(job_key(job_id) for job_id, _ in jobs)]
    names, fixed = CODEC.new_layout()
    args: list[Any] = [retention_s, len(names), *names, len(fixed), *fixed]
    new_values = CODEC.new_values
    for (job_id, request), (queue, message) in zip(jobs, templates.messages(jobs), strict=True):
        keys.append(queue)
        args.append(message)
        args += new_values(names, job_id, request, time.time())
    return BatchPlan([job_id for job_id, _ in jobs], keys, args)
