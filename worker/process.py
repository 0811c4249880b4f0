"""One worker process: load the pipeline on its device, then serve its model's queue."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from producer.records import RecordStore
from producer.settings import Settings
from producer.wire import WORKER_KEY_PREFIX, WORKER_KEY_TTL_S, queue_name
from worker.pipeline import load_pipeline
from worker.runner import JobRunner
from worker.storage import Storage
from worker.tasks import create_app

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    model: str
    device: str = "cpu"
    dtype: str = "auto"
    name: str | None = None
    offload: bool = False
    loglevel: str = "INFO"
    ready_file: str | None = None  # touched once the pipeline is loaded and the queue consumed

    def node_name(self) -> str:
        if self.name:
            return self.name
        tag = "cpu" if self.device == "cpu" else "gpu" + (self.device.split(":", 1)[1] if ":" in self.device else "0")
        return f"{tag}@{socket.gethostname()}"


class Presence:
    """Keeps ``pixq:worker:{name}`` alive while the worker serves, so others can see it."""

    def __init__(self, conn: redis.Redis, name: str, info: dict[str, object]):
        self.conn = conn
        self.key = WORKER_KEY_PREFIX + name
        self.info = json.dumps(info)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="pixq-presence", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.conn.set(self.key, self.info, ex=WORKER_KEY_TTL_S)
            except redis.RedisError as exc:
                log.warning("presence: %s", exc)
            self._stop.wait(WORKER_KEY_TTL_S / 3)

    def stop(self) -> None:
        self._stop.set()
        try:
            self.conn.delete(self.key)
        except redis.RedisError:
            pass


def serve(settings: Settings, options: WorkerOptions) -> None:
    """Load once, then consume the model's queue with one task at a time until told to stop."""
    settings.require_redis()
    storage = Storage(settings)
    loaded = load_pipeline(options.model, options.device, options.dtype, options.offload)
    conn = redis.Redis.from_url(settings.require_redis(), socket_connect_timeout=5, socket_timeout=30)
    records = RecordStore(conn, settings.retention_s)
    name = options.node_name()
    runner = JobRunner(records, loaded.pipe, storage, worker_name=name, model_name=options.model)
    app = create_app(settings, runner)
    presence = Presence(
        conn,
        name,
        {
            "name": name,
            "model": options.model,
            "device": options.device,
            "dtype": loaded.dtype,
            "pid": os.getpid(),
            "load_s": round(loaded.load_s, 3),
            "started_at": time.time(),
        },
    )

    from celery.signals import worker_ready, worker_shutdown

    def on_ready(**_: object) -> None:
        presence.start()
        if options.ready_file:
            Path(options.ready_file).write_text(f"{name}\n")

    def on_shutdown(**_: object) -> None:
        presence.stop()
        if options.ready_file:
            Path(options.ready_file).unlink(missing_ok=True)

    worker_ready.connect(on_ready, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)
    # The threads pool runs the task in this process, next to the loaded pipeline; one at a time.
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            "--concurrency=1",
            f"--queues={queue_name(options.model)}",
            f"--hostname={name}",
            f"--loglevel={options.loglevel}",
            "--task-events",
            "--without-gossip",
            "--without-mingle",
        ]
    )
