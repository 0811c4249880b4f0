"""The client: submit a job, read its record, wait for it, cancel it, hand out image URLs.

Every public method raises only ``PixqError`` subclasses for what a service does: Redis, kombu and
botocore exceptions are mapped in one place, ``pixq.errors.service_errors``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Any

import redis

from pixq.batch import parse_many
from pixq.durable import Durability
from pixq.egress import EgressRefused, Network, check_destination
from pixq.errors import (
    InvalidRequest,
    JobFailed,
    JobNotFound,
    JobTimeout,
    NoWorkerWarning,
    OutcomeUnknown,
    service_errors,
)
from pixq.jobrecord import SENT_AT_FIELD, job_key
from pixq.listing import decode_cursor, list_jobs
from pixq.messages import MessageTemplates
from pixq.queues import QueueReport, inspect_queues, live_workers, queue_depth
from pixq.records import JobRecord, JobState, RecordStore
from pixq.s3 import make_s3_client
from pixq.schema import JobRequest, parse_request
from pixq.settings import Settings
from pixq.submitplan import SubmitPlan, check_depth, plan_batch, plan_submit
from pixq.wire import WORKER_KEY_TTL_S, make_celery, send_job

if TYPE_CHECKING:
    from celery import Celery

    from pixq.records import ImageRecord

MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600
DEFAULT_PRESIGN_EXPIRY_S = 3600
# Backoff steps (0.2 s doubling, 3 s cap, jittered): a Redis that does not answer is reported
# (``BrokerUnavailable``) after at most 5.8 s of backoff, about 3 s on average, plus each attempt's connect.
CLIENT_RETRIES = 4
# A one-shot read (``pixq status``, ``pixq queue``) answers within about a second: one retry, a short
# connect timeout. A Redis that is down is said at once; a failover in progress is a re-run away.
READ_RETRIES = 1
CLI_WRITE_RETRIES = 3  # a command-line write: ~1.4 s at most; the same command with its idempotency key re-runs safely


def check_webhook(url: str, allow: tuple[Network, ...]) -> None:
    """``InvalidRequest`` naming ``webhook.url`` unless the destination may be reached."""
    try:
        check_destination(url, allow)
    except EgressRefused as exc:
        raise InvalidRequest([("webhook.url", str(exc))]) from None


def outcome_unknown(exc: BaseException, job_id: str, idem_key: str | None) -> OutcomeUnknown:
    """A submit sent, its reply lost, and Redis away for the undo too: the job may be queued."""
    return OutcomeUnknown(
        f"Redis unreachable: {' '.join(str(exc).split()) or type(exc).__name__}; the submit's outcome "
        f"is unknown: job {job_id} may be queued (pixq status {job_id}"
        + (", or repeat the submit with the same idempotency key: it cannot make a second job)"
           if idem_key else "; an idempotency key makes a repeated submit safe)"))


class Job:
    """A thin handle on one job: its id and the client that submitted it."""

    def __init__(self, client: Client, job_id: str, created: bool = True, warning: str | None = None):
        self.client = client
        self.id = job_id
        self.created = created  # False when an idempotency key matched an earlier job
        self.warning = warning  # e.g. no live worker serves the job's model (also issued as NoWorkerWarning)

    def status(self) -> JobRecord:
        return self.client.status(self.id)

    def wait(self, timeout_s: float | None = None, **kwargs: Any) -> JobRecord:
        return self.client.wait(self.id, timeout_s=timeout_s, **kwargs)

    def cancel(self) -> JobRecord:
        return self.client.cancel(self.id)

    def __repr__(self) -> str:
        return f"Job({self.id!r})"


class Client:
    """Talks to Redis (records, queues) and, for URLs, to S3. Build one per process."""

    def __init__(self, settings: Settings, conn: redis.Redis | None = None, retries: int = CLIENT_RETRIES,
                 connect_timeout_s: float = 5):
        """``retries`` backoff steps and ``connect_timeout_s`` (each attempt's TCP/TLS connect) for the
        client built from ``settings``; both are ignored when ``conn`` is given."""
        self.settings = settings
        # A few seconds of retries: a Redis failover or restart is ridden out, a Redis that is down
        # is reported soon (redisconn.py). The CLI passes READ_RETRIES / CLI_WRITE_RETRIES and a
        # shorter connect timeout (console.client_from_env); 5 s is RedisEndpoint.client's default.
        self.conn = conn or settings.redis_endpoint().client(retries=retries, connect_timeout_s=connect_timeout_s)
        self.durability = Durability(self.conn, settings.redis_min_replicas, settings.redis_wait_timeout_ms)
        self.records = RecordStore(self.conn, settings.retention_s, self.durability)
        self._served_until: dict[str, float] = {}  # model -> until when a live worker was last seen
        self._s3: Any = None

    @cached_property
    def _celery(self) -> Celery:
        # Built on the first submit or retry: reading commands need no Celery app.
        return make_celery(self.settings, name="pixq-producer")

    @cached_property
    def messages(self) -> MessageTemplates:
        """Each job's Celery message, copied from one Celery builds per model and priority (messages.py)."""
        return MessageTemplates(self._celery)

    # -- submit -----------------------------------------------------------------------------

    def submit(self, prompt: str | None = None, /, *extra: Any, **fields: Any) -> Job:
        """Validate, record and enqueue one job. Raises ``InvalidRequest`` before anything is
        written, ``QueueFull`` past the configured depth, ``BrokerUnavailable`` if Redis is down or
        refuses us (nothing is left half-written).

        When no live worker serves the job's model, the job still waits in its queue; ``Job.warning``
        says so and a ``NoWorkerWarning`` is issued.
        """
        if extra:
            raise TypeError(f"submit() takes the prompt as its only positional argument, got {1 + len(extra)}; "
                            "pass the other fields by name, e.g. submit(prompt, negative_prompt=...)")
        data = dict(fields)
        if prompt is not None:
            if "prompt" in data:
                raise TypeError("submit() got the prompt twice, as the first argument and as prompt=")
            data["prompt"] = prompt
        data.setdefault("model_name", self.settings.model)
        request = parse_request(data)
        job = self.submit_request(request)
        if job.created and not self._served(request.model_name):
            job.warning = (f"no live worker serves {request.model_name} (none seen in the last "
                           f"{WORKER_KEY_TTL_S} s): job {job.id} waits in its queue until one starts")
            warnings.warn(job.warning, NoWorkerWarning, stacklevel=2)
        return job

    def submit_request(self, request: JobRequest, *, owner: str | None = None, max_in_flight: int = 0) -> Job:
        """Record and enqueue a validated request (the API's path: no worker warning). ``owner`` (an API
        key's id) scopes the job's idempotency key and listing; ``max_in_flight`` > 0 refuses
        (``QueueFull``) an owner who already has that many unfinished jobs, atomically with the record."""
        request = request.with_seed()
        if request.webhook is not None:
            check_webhook(request.webhook.url, self.settings.webhook_allow_networks())
        with service_errors("job not submitted"):
            return self._enqueue(request, owner, max_in_flight)

    def submit_many(self, requests: list[JobRequest | dict[str, Any]]) -> list[Job]:
        """Validate, record and enqueue many jobs in one round trip (one Lua script writes every job's
        record and Celery message: all or none; pixq/batch.py). Errors name the request's index
        (``3.prompt``). A batch may not use idempotency keys (use ``submit``)."""
        def check(req: JobRequest) -> None:
            if req.idempotency_key is not None:
                raise InvalidRequest([("idempotency_key", "not allowed in submit_many (use submit)")])
            if req.webhook is not None:
                check_webhook(req.webhook.url, self.settings.webhook_allow_networks())

        parsed = parse_many(requests, self.settings.model, check)
        with service_errors("jobs not submitted"):
            for model in {req.model_name for req in parsed}:
                check_depth(model, self.queue_depth(model), self.settings.max_queue_depth,
                            adding=sum(1 for req in parsed if req.model_name == model))
            if not parsed:
                return []
            self._prepare_messages(parsed)
            plan = plan_batch(parsed, retention_s=self.settings.retention_s, templates=self.messages)
            self.records.write_many(plan)
            if self.durability.required():  # a later write: WAIT then covers the batch (durable.py)
                last = job_key(plan.job_ids[-1])
                self.durability.run(f"the submit of {len(parsed)} jobs",
                                    lambda p: p.hset(last, SENT_AT_FIELD, repr(time.time())))
        return [Job(self, job_id) for job_id in plan.job_ids]

    def jobs(self, state: JobState | None = None, page_size: int = 100,
             owner: str | None = None) -> Iterator[JobRecord]:
        """Jobs newest first (those submitted by ``owner``, an API key's id; by default the ones
        submitted without a key), read a page at a time as the iterator advances."""
        after = None
        while True:
            with service_errors("jobs not listed"):
                page, cursor = list_jobs(self.records, owner, state=state, limit=page_size, after=after)
            yield from page
            if cursor is None:
                return
            after = decode_cursor(cursor)

    def _served(self, model_name: str) -> bool:
        """Whether a live worker serves ``model_name``; a yes is kept for a presence key's lifetime,
        so a stream of submits does not scan for workers each time. Unknown (Redis failed) counts as yes:
        the job is in, and this is only a warning."""
        now = time.monotonic()
        if self._served_until.get(model_name, 0.0) > now:
            return True
        try:
            served = any(w.model == model_name for w in live_workers(self.conn))
        except redis.RedisError:
            return True
        if served:
            self._served_until[model_name] = now + WORKER_KEY_TTL_S
        return served

    def _prepare_messages(self, requests: list[JobRequest]) -> None:
        """Make sure each request's message template is built (plans copy it)."""
        if not all(self.messages.has(request) for request in requests):
            # A first message per model and priority is built through kombu's channel, which rides out
            # ~9 s of its own reconnects against a Redis that is down: ask on our connection first.
            self.conn.ping()
            for request in requests:
                self.messages.prototype(request)

    def _enqueue(self, request: JobRequest, owner: str | None = None, max_in_flight: int = 0) -> Job:
        """Execute a submit's plan (``pixq.submitplan``) on this blocking connection."""
        self._check_depth(request.model_name)
        self._prepare_messages([request])
        plan = plan_submit(request, retention_s=self.settings.retention_s, templates=self.messages, owner=owner,
                           max_in_flight=max_in_flight)
        if plan.idem_key is not None:
            earlier = self._claim_idempotency(plan)
            if earlier is not None:
                return Job(self, earlier, created=False)
        sent = False
        try:
            durable = self.durability.required() > 0
            sent = True  # from here a lost reply leaves the outcome open until the undo succeeds
            # The record and its Celery message in one script (one round trip, nothing half-written).
            self.records.write(plan)
            if durable:  # one more write on our connection, after them: WAIT then covers both (durable.py)
                self.durability.run(f"the submit of job {plan.job_id}",
                                    lambda pipe: pipe.hset(plan.job_key, SENT_AT_FIELD, repr(time.time())))
        except redis.RedisError as exc:
            # Before ``sent`` only the idempotency key may be written: nothing else to undo (an undo
            # against a Redis that is down would spend a second retry budget for nothing).
            if (sent or plan.idem_key) and not self._undo(plan) and sent:
                raise outcome_unknown(exc, plan.job_id, plan.idem_key) from exc
            raise
        except BaseException:
            # Nothing half-written: no record without a message, no key without a job.
            if sent or plan.idem_key:
                self._undo(plan)
            raise
        return Job(self, plan.job_id)

    def _claim_idempotency(self, plan: SubmitPlan) -> str | None:
        """Claim the plan's idempotency key; the earlier job's id when it names another job."""
        assert plan.idem_key is not None
        if self.conn.set(plan.idem_key, plan.job_id, nx=True, ex=self.settings.retention_s):
            return None
        existing = self.conn.get(plan.idem_key)
        if existing is None:  # the key expired between the two calls: a new job
            self.conn.set(plan.idem_key, plan.job_id, ex=self.settings.retention_s)
        return plan.earlier_job(existing)  # type: ignore[arg-type]

    def _undo(self, plan: SubmitPlan) -> bool:
        """Remove what a failed submit may have written; ``False`` when Redis could not be asked."""
        try:
            self.conn.delete(*plan.undo_keys)
        except redis.RedisError:
            return False
        return True

    def _check_depth(self, model_name: str) -> None:
        if self.settings.max_queue_depth:
            check_depth(model_name, self.queue_depth(model_name), self.settings.max_queue_depth)

    def queue_depth(self, model_name: str) -> int:
        """Messages waiting on the model's queue (not counting the ones being rendered)."""
        with service_errors():
            return queue_depth(self.conn, model_name)

    def queues(self, models: list[str] | None = None) -> list[QueueReport]:
        """Per model: waiting jobs, the oldest one's age, running jobs with their step, live workers.

        Covers every model with a waiting message, a running job or a live worker, plus ``models``.
        """
        with service_errors():
            return inspect_queues(self.records, models)

    # -- read -------------------------------------------------------------------------------

    def status(self, job_id: str) -> JobRecord:
        """The job's record. Raises ``JobNotFound`` for an unknown or expired id."""
        with service_errors():
            return self.records.get(job_id)

    def wait(
        self,
        job_id: str,
        timeout_s: float | None = None,
        poll_s: float = 0.05,
        on_update: Callable[[JobRecord], None] | None = None,
        raise_on_failure: bool = False,
    ) -> JobRecord:
        """Poll until the job is terminal; returns its final record."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            record = self.status(job_id)
            if on_update is not None:
                on_update(record)
            if record.state.is_terminal:
                if raise_on_failure and record.state is not JobState.succeeded:
                    detail = record.error.message if record.error else record.state.value
                    raise JobFailed(record, f"job {job_id} {record.state.value}: {detail}")
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(f"job {job_id} still {record.state.value} after {timeout_s} s")
            time.sleep(poll_s)

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job: a queued one never starts; a running one stops at its next step."""
        self.status(job_id)  # JobNotFound for an unknown id
        with service_errors("nothing canceled"):
            done, _ = self.records.transition(
                job_id, (JobState.queued,), state=JobState.canceled, finished_at=time.time()
            )
            if not done:
                self.records.transition(job_id, (JobState.running,), cancel_requested=True)
        return self.status(job_id)

    def dead(self) -> list[JobRecord]:
        """Jobs that ran out of attempts (``failed``, reason in ``error``), oldest first."""
        records = []
        with service_errors():
            for job_id in self.records.dead_ids():
                try:
                    records.append(self.records.get(job_id))
                except JobNotFound:
                    continue  # expired after its retention
        return records

    def retry(self, job_id: str) -> JobRecord:
        """Queue a failed or canceled job again, with fresh attempts."""
        record = self.status(job_id)
        with service_errors("job not queued again"):
            if not self.records.retry(job_id):
                raise InvalidRequest([("job", f"job {job_id} is {record.state.value}; only failed or canceled "
                                              "jobs can be retried")])
        # The record says queued from here on; a message that did not go out is re-sent by a worker's reaper
        # (a queued job with no message, docs/reliability.md), so the error says so rather than "not queued".
        with service_errors(f"job {job_id} is queued again but its message was not sent; a worker's reaper "
                            "re-sends it, or run retry later"):
            send_job(self._celery, job_id, record.request)
        return self.status(job_id)

    # -- images -----------------------------------------------------------------------------

    def presigned_url(self, job_id: str, index: int = 0, expires_in_s: int = DEFAULT_PRESIGN_EXPIRY_S) -> str:
        """A time-limited GET URL for one finished image (at most 7 days)."""
        if not 1 <= expires_in_s <= MAX_PRESIGN_EXPIRY_S:
            raise InvalidRequest([("expires_in_s", f"must be between 1 and {MAX_PRESIGN_EXPIRY_S} seconds")])
        record = self.status(job_id)
        count = len(record.images)
        if not 0 <= index < count:
            rule = f"must be 0 to {count - 1}" if count else "has no image to point at"
            raise InvalidRequest([("index", f"{rule}: job {job_id} is {record.state.value} with {count} image(s) "
                                            f"(got {index})")])
        image = record.images[index]
        with service_errors("no URL made"):
            return str(
                self.s3().generate_presigned_url(
                    "get_object", Params={"Bucket": image.bucket, "Key": image.key}, ExpiresIn=expires_in_s
                )
            )

    def read_image(self, image: ImageRecord, on_chunk: Callable[[int], None] | None = None) -> bytes:
        """One stored image's bytes (``on_chunk`` is told each chunk's size, for a progress bar)."""
        body = bytearray()
        with service_errors(f"s3://{image.bucket}/{image.key} not read"):
            for chunk in self.s3().get_object(Bucket=image.bucket, Key=image.key)["Body"].iter_chunks(256 * 1024):
                body += chunk
                if on_chunk is not None:
                    on_chunk(len(chunk))
        return bytes(body)

    def s3(self) -> Any:
        """A boto3 S3 client for the configured endpoint (boto3 is imported only then), made once."""
        if self._s3 is None:
            self._s3 = make_s3_client(self.settings)
        return self._s3

    def close(self) -> None:
        if "_celery" in self.__dict__:
            self._celery.close()
        self.conn.close()
