"""What the queues hold right now: per model, waiting jobs, the oldest one's age, running jobs, live workers.

Read straight from Redis, without a worker or Celery's remote control: the waiting messages in
kombu's priority lists (``wire.queue_lists``), the records of running jobs (``records.RUNNING_KEY``)
and the workers' presence keys (``wire.WORKER_KEY_PREFIX``).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from pixq.checkpoints import KNOWN_MODELS
from pixq.errors import JobNotFound
from pixq.records import RUNNING_KEY, JobState, RecordStore
from pixq.wire import PRIORITY_SEP, PRIORITY_STEPS, QUEUE_PREFIX, WORKER_KEY_PREFIX, queue_lists

# Messages read from the old end of each list to find the oldest job still queued (older
# messages may belong to jobs canceled meanwhile, which a worker drops when it gets to them).
OLDEST_SCAN = 50


@dataclass(frozen=True)
class WorkerPresence:
    name: str
    model: str
    device: str
    pid: int | None
    started_at: float | None
    paused: str | None = None  # why a live worker takes no jobs now (its storage is unavailable), else None

    @classmethod
    def from_json(cls, raw: bytes | str) -> WorkerPresence:
        data = json.loads(raw)
        paused = data.get("paused")
        return cls(name=str(data.get("name", "")), model=str(data.get("model", "")),
                   device=str(data.get("device", "")), pid=data.get("pid"), started_at=data.get("started_at"),
                   paused=str(paused) if paused else None)


@dataclass(frozen=True)
class RunningJob:
    id: str
    worker: str | None
    step: int
    total_steps: int
    started_at: float | None
    cancel_requested: bool
    batch: int = 0  # images in the pipeline call it renders in; 0: claimed, waiting for the GPU
    owner: str | None = None  # the API key's id that submitted it (None: the Python client, no key)


@dataclass
class QueueReport:
    """One model's queue. ``depth`` counts waiting messages (what an autoscaler sees); the oldest
    is the longest-waiting job still ``queued``, its age counted from its submission."""

    model: str
    depth: int = 0
    oldest_job_id: str | None = None
    oldest_age_s: float | None = None
    running: list[RunningJob] = field(default_factory=list)
    workers: list[WorkerPresence] = field(default_factory=list)

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tenant_view(self, owner: str) -> dict[str, Any]:
        """What one tenant (an API key without the admin scope) may see: counts, and of the running
        jobs only its own; never another tenant's job ids, nor the workers' names, hosts or pids."""
        own = [{k: v for k, v in asdict(job).items() if k not in ("worker", "owner")}
               for job in self.running if job.owner == owner]
        return {"model": self.model, "depth": self.depth, "oldest_age_s": self.oldest_age_s,
                "running_count": len(self.running), "worker_count": len(self.workers), "own_running": own}

    def public_to(self, owner: str) -> bool:
        """Whether a tenant may see this queue at all: a model someone other than the operator named
        (an absolute path another tenant submitted, served by no worker) is that tenant's business."""
        return self.model in KNOWN_MODELS or bool(self.workers) or any(j.owner == owner for j in self.running)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def message_job_id(raw: bytes | str) -> str | None:
    """The job a kombu message is for: its ``job_id`` keyword, else the Celery task id."""
    try:
        message = json.loads(raw)
        headers = message.get("headers") or {}
        body = message.get("body")
        if isinstance(body, str) and (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        payload = json.loads(body) if isinstance(body, (str, bytes)) else None
        # Celery's message protocol 2: the body is [args, kwargs, embed].
        if isinstance(payload, list) and len(payload) >= 2 and isinstance(payload[1], dict):
            job_id = payload[1].get("job_id")
            if isinstance(job_id, str):
                return job_id
        task_id = headers.get("id")
        return task_id if isinstance(task_id, str) else None
    except (ValueError, TypeError, AttributeError):
        return None  # not one of ours


def queue_models(conn: redis.Redis) -> set[str]:
    """Models with at least one waiting message (Redis drops an emptied list)."""
    models = set()
    priority_suffixes = tuple(f"{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS[1:])
    for key in conn.scan_iter(match=QUEUE_PREFIX + "*", count=1000, _type="list"):
        name = _text(key)
        if name.endswith(priority_suffixes):
            name = name.rsplit(PRIORITY_SEP, 1)[0]
        models.add(name[len(QUEUE_PREFIX):])
    return models


def live_workers(conn: redis.Redis) -> list[WorkerPresence]:
    workers = []
    for key in conn.scan_iter(match=WORKER_KEY_PREFIX + "*", count=1000):
        raw = conn.get(key)
        if raw is None:
            continue  # expired between the scan and the read
        try:
            workers.append(WorkerPresence.from_json(raw))
        except (ValueError, TypeError, AttributeError):
            continue
    return sorted(workers, key=lambda w: w.name)


def running_jobs(records: RecordStore) -> dict[str, list[RunningJob]]:
    """Jobs some worker holds a lease on, by model, earliest claim first."""
    by_model: dict[str, list[RunningJob]] = {}
    for member in records.conn.zrange(RUNNING_KEY, 0, -1):
        try:
            r = records.get(_text(member))
        except JobNotFound:
            continue
        if r.state is not JobState.running:
            continue  # ended between the two reads
        by_model.setdefault(r.request.model_name, []).append(
            RunningJob(id=r.id, worker=r.worker, step=r.step, total_steps=r.total_steps, started_at=r.started_at,
                       cancel_requested=r.cancel_requested, batch=r.batch, owner=r.owner))
    return by_model


def oldest_queued(records: RecordStore, model: str) -> tuple[str | None, float | None]:
    """The longest-waiting queued job of ``model`` and its submission time.

    kombu pushes on the left and pops on the right, so each list's oldest message is at -1.
    """
    best: tuple[str | None, float | None] = (None, None)
    for name in queue_lists(model):
        for raw in reversed(records.conn.lrange(name, -OLDEST_SCAN, -1)):
            job_id = message_job_id(raw)
            if job_id is None:
                continue
            try:
                record = records.get(job_id)
            except JobNotFound:
                continue
            if record.state is not JobState.queued:
                continue  # canceled (or already taken) while its message waits
            if best[1] is None or record.created_at < best[1]:
                best = (record.id, record.created_at)
            break  # the rest of this list is younger
    return best


def queue_depth(conn: redis.Redis, model: str) -> int:
    """Messages waiting on the model's queue, over all its priority lists."""
    with conn.pipeline(transaction=False) as pipe:
        for name in queue_lists(model):
            pipe.llen(name)
        return int(sum(pipe.execute()))


def inspect_queues(
    records: RecordStore, models: list[str] | None = None, now: float | None = None
) -> list[QueueReport]:
    """A report per model that has waiting messages, a running job or a live worker (plus ``models``)."""
    conn = records.conn
    now = time.time() if now is None else now
    workers = live_workers(conn)
    running = running_jobs(records)
    names = queue_models(conn) | set(running) | {w.model for w in workers} | set(models or [])
    reports = []
    for model in sorted(names):
        report = QueueReport(model=model, depth=queue_depth(conn, model), running=running.get(model, []),
                             workers=[w for w in workers if w.model == model])
        if report.depth:
            report.oldest_job_id, created_at = oldest_queued(records, model)
            if created_at is not None:
                report.oldest_age_s = max(now - created_at, 0.0)
        reports.append(report)
    return reports
