"""Serving: one worker process's lifecycle: load the pipeline on its device, warm it up, serve its model's queue
through Celery, pause while its storage refuses writes, and stop in two stages on SIGTERM (finish the job, then
give it back)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from pixq.durable import Durability
from pixq.records import RecordStore
from pixq.redisconn import check_memory_policy
from pixq.settings import Settings
from pixq.wire import queue_name
from pixq.worker.gpu.batch import BatchPolicy
from pixq.worker.gpu.pipeline import LoadedPipeline, load_pipeline, parse_size, warm_up
from pixq.worker.gpu.routing import CompileGate
from pixq.worker.jobs.lease import Leases
from pixq.worker.jobs.metrics import WorkerMetrics
from pixq.worker.jobs.reaper import Reaper
from pixq.worker.jobs.reservations import Reservations
from pixq.worker.jobs.runner import JobRunner, RunnerConfig, Shutdown
from pixq.worker.jobs.storage import Storage
from pixq.worker.jobs.storagewatch import StorageWatch
from pixq.worker.jobs.tasks import create_app, register_render_task
from pixq.worker.ops.identity import Presence, check_name_free, claim_name
from pixq.worker.ops.options import WorkerOptions

log = logging.getLogger(__name__)

UPLOAD_RETRY_BUDGET_S = 120.0


def install_second_stop(shutdown: Shutdown) -> None:
    """Celery ignores a repeated SIGTERM; ours gives the running job back at its next step.

    The first SIGTERM still goes to Celery (warm shutdown: stop consuming, finish the job).
    """
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: FrameType | None) -> None:
        if shutdown.draining.is_set():
            shutdown.request()
            log.warning("second SIGTERM: giving the running job back to the queue")
        elif callable(previous):
            previous(signum, frame)  # Celery's warm shutdown, which reports worker_shutting_down
        else:
            shutdown.request()

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: keep Celery's own handling
        log.warning("could not install the second-SIGTERM handler")


# The deferred warm-up starts once no job has been in the worker for this long (a queued job is
# delivered within milliseconds of the consumer starting).
IDLE_BEFORE_WARMUP_S = 1.0


def warm_up_while_serving(
    loaded: LoadedPipeline, runner: JobRunner, sizes: Sequence[tuple[int, int]], modes: Sequence[str],
    shutdown: Shutdown,
) -> threading.Thread:
    """Warm up ``modes`` at ``sizes`` on a background thread while the worker is idle.

    Each warm-up render waits until no job has been in the worker for ``IDLE_BEFORE_WARMUP_S``,
    then runs under the runner's GPU lock: renders never overlap (dynamo traces one thing at a
    time in a process: a compile beside a render fails it). A job arriving during a warm-up
    render waits for that one render at most; a job needing a graph not yet warm runs eager
    (``pixq.worker.gpu.routing``): it never waits for its own compile.
    """

    def idle() -> bool:
        while not shutdown.draining.is_set():
            if runner.idle_for() >= IDLE_BEFORE_WARMUP_S:
                return True
            time.sleep(0.05)
        return False

    gate = loaded.speedups.gate if loaded.speedups is not None else CompileGate()

    def run() -> None:
        runner.touch()
        for size in sizes:
            for mode in modes:
                while idle():
                    with runner.gpu_lock:
                        if runner.idle_for() < IDLE_BEFORE_WARMUP_S:
                            continue  # a job came in meanwhile: it goes first
                        try:
                            with gate.warming():  # this render may compile; jobs' renders may not
                                warm_up(loaded, [size], [mode], runner.config.batch)
                        except Exception:
                            log.exception("warm-up %dx%d %s failed; its first job compiles instead", *size, mode)
                        break
                else:
                    return  # stopping
        log.info("warm-up done: %s", ", ".join(loaded.warmed))

    thread = threading.Thread(target=run, name="pixq-warmup", daemon=True)
    thread.start()
    return thread


def resume_gc() -> None:
    """Turn the cyclic garbage collector back on after a start that ran without it (``pixq worker``).

    A start makes some 700,000 objects (3,400 modules' functions, classes and constants, the model's
    modules) and almost no cyclic garbage (10,000 objects): the collector's passes over them cost 16 % of
    the import time (3.83 s -> 3.22 s for the worker's imports on a 2-core VM). What the start made is
    frozen (``gc.freeze``: the permanent generation), so collections while serving skip it too; the
    start's little garbage stays, as in a forking server that freezes before it forks."""
    gc.freeze()
    gc.enable()


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or ``None`` where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        started = float(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 (starttime), after pid and comm
    except (OSError, ValueError, IndexError):
        return None
    return max(uptime - started, 0.0)


class Readiness:
    """What the worker shows and does as it starts serving, pauses while its store is down, and resumes.

    Serving: the Celery consumer takes the model's queue, the presence record says ``serving: true``, the ready
    file is there and ``/readyz`` answers 200. Paused (``StorageWatch``'s ``on_down``): the consumer cancels the
    queue (the messages stay in Redis for other workers), the presence record says ``serving: false`` and
    ``paused: storage unavailable: ...``, the ready file is gone and ``/readyz`` answers 503 with the reason.
    Celery's own calls change the consumer, in its event loop (``Consumer.call_soon``), as its remote control does.
    """

    def __init__(self, options: WorkerOptions, name: str, metrics: WorkerMetrics, shutdown: Shutdown):
        self.options = options
        self.name = name
        self.queue = queue_name(options.model)
        self.metrics = metrics
        self.shutdown = shutdown
        self.presence: Presence | None = None  # once the name is claimed
        self.consumer: Any = None  # Celery's, once it takes messages
        self.why: str | None = None
        self._lock = threading.Lock()  # Celery's thread (serving) and the store's watch (down, up)

    def serving(self, consumer: Any) -> None:
        """The consumer takes messages: show the worker ready, unless the store is down already (then paused)."""
        with self._lock:
            self.consumer = consumer
            if self.why is not None:
                self.consumer.call_soon(self.consumer.cancel_task_queue, self.queue)
            self._show(ready=self.why is None)

    def down(self, why: str) -> None:
        with self._lock:
            self.why = why
            if self.consumer is not None:
                self.consumer.call_soon(self.consumer.cancel_task_queue, self.queue)
            self._show(ready=False)

    def up(self) -> None:
        with self._lock:
            self.why = None
            if self.consumer is None or self.shutdown.draining.is_set():
                return  # not serving yet (serving() shows it), or stopping: no queue to take again
            self.consumer.call_soon(self.consumer.add_task_queue, self.queue)
            self._show(ready=True)

    def _show(self, ready: bool) -> None:
        reason = "" if ready else f"storage unavailable: {self.why}"
        if self.presence is not None:
            if ready:
                self.presence.serving()
            else:
                self.presence.paused(reason)
        self.metrics.set_ready(ready, reason)  # /readyz on the metrics port
        if self.options.ready_file:
            if ready:
                Path(self.options.ready_file).write_text(f"{self.name}\n")
            else:
                Path(self.options.ready_file).unlink(missing_ok=True)


def serve(settings: Settings, options: WorkerOptions) -> None:
    """Load once, then consume the model's queue until told to stop (two-stage on SIGTERM)."""
    # Loading and warm-up log before Celery sets up logging: same format, same stream.
    logging.basicConfig(level=options.loglevel.upper(),
                        format="[%(asctime)s: %(levelname)s/%(processName)s] %(message)s")
    storage = Storage(settings, retry_budget_s=UPLOAD_RETRY_BUDGET_S)
    sizes = [parse_size(size) for size in options.warmup]
    now_modes: tuple[str, ...] = options.warmup_modes
    later_modes: tuple[str, ...] = ()
    if options.defer_warmup and len(options.warmup_modes) > 1:
        now_modes, later_modes = options.warmup_modes[:1], options.warmup_modes[1:]
    # Rides out a Redis restart or failover (about a minute of retries) instead of failing the job
    # it is recording (pixq/redisconn.py).
    conn = settings.redis_endpoint().client()
    check_memory_policy(conn)
    name = options.node_name()
    check_name_free(conn, name)
    loaded = load_pipeline(options.model, options.device, options.pipeline_options(warmup_modes=now_modes))
    if loaded.artefacts is not None:
        later_modes = ()  # every size of the set is warm in every mode; nothing compiles
    if loaded.speedups is not None and (sizes or loaded.artefacts is not None):
        loaded.speedups.gate.serving = True  # from here, a shape with no graph runs eager (routing.py)
    records = RecordStore(conn, settings.retention_s,
                          Durability(conn, settings.redis_min_replicas, settings.redis_wait_timeout_ms))
    app = create_app(settings)
    leases = Leases(records, name, ttl_s=settings.lease_ttl_s,
                    hard_limit_s=settings.job_timeout_s + UPLOAD_RETRY_BUDGET_S + 60)
    shutdown = Shutdown()
    metrics = WorkerMetrics(model=options.model, worker=name, device=options.device)
    readiness = Readiness(options, name, metrics, shutdown)
    watch = StorageWatch(storage.probe, on_down=readiness.down, on_up=readiness.up)
    metrics.pipeline_loaded(loaded.load_s)
    gate = loaded.speedups.gate if loaded.speedups is not None else CompileGate()
    metrics.started(loaded.phases, len(loaded.artefacts.graphs()) if loaded.artefacts else 0,
                    lambda: float(gate.eager_calls))
    runner = JobRunner(
        records, loaded, storage,
        RunnerConfig(worker_name=name, model_name=options.model, job_timeout_s=settings.job_timeout_s,
                     lease_ttl_s=settings.lease_ttl_s, max_attempts=settings.max_attempts,
                     encode_threads=options.encode_threads,
                     batch=loaded.batch or BatchPolicy()),
        leases, app, shutdown, metrics=metrics, storage_watch=watch,
    )
    reservations = Reservations(conn, name)
    register_render_task(app, runner, reservations)
    reaper = Reaper(records, app, settings.max_attempts, interval_s=max(settings.lease_ttl_s / 3, 0.5))
    info: dict[str, object] = {
        "name": name,
        "model": options.model,
        "device": options.device,
        "dtype": loaded.dtype,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "load_s": round(loaded.load_s, 3),
        "artefacts": loaded.artefacts.folder.name if loaded.artefacts else None,
        "start_phases_s": {k: round(v, 3) for k, v in loaded.phases.items()},
        "started_at": time.time(),
    }
    # The name is held from here on; "serving" turns true with the presence beat, once the Celery consumer
    # has declared its queue and takes messages (what a readiness check, or a test, must wait for).
    claim_name(conn, name, {**info, "serving": False})
    presence = Presence(conn, name, info, reservations)
    presence.start()  # beats "serving": false until on_ready
    readiness.presence = presence

    from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

    def on_ready(sender: Any = None, **_: object) -> None:
        resume_gc()
        install_second_stop(shutdown)
        leases.start()
        reaper.start()
        readiness.serving(sender)  # ready, unless the store went down before the consumer started: paused then
        if sizes and later_modes:
            warm_up_while_serving(loaded, runner, sizes, later_modes, shutdown)
        ready_s = process_age_s()
        if ready_s is not None:
            metrics.start_seconds.labels(model=options.model, phase="ready").set(ready_s)
            log.info("ready %.1f s after the process started (%s)", ready_s,
                     ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in loaded.phases.items()))

    def on_shutting_down(**_: object) -> None:
        shutdown.draining.set()  # first stop: jobs waiting for the GPU go back, the running one finishes
        metrics.set_ready(False, "draining")

    def on_shutdown(**_: object) -> None:
        watch.stop()
        presence.stop()
        metrics.stop_server()
        reaper.stop()
        leases.stop()
        if options.ready_file:
            Path(options.ready_file).unlink(missing_ok=True)

    try:
        if options.metrics_port:
            metrics.start_server(options.metrics_port, options.metrics_host)  # a taken port stops the start
        worker_ready.connect(on_ready, weak=False)
        worker_shutting_down.connect(on_shutting_down, weak=False)
        worker_shutdown.connect(on_shutdown, weak=False)
        # The threads pool runs tasks in this process, next to the loaded pipeline.
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={options.job_threads(runner.config.batch)}",
                f"--queues={queue_name(options.model)}",
                f"--hostname={name}",
                f"--loglevel={options.loglevel}",
                "--task-events",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        presence.stop()  # also when the start fails: the claimed name is given back at once
        if not gc.isenabled():
            gc.enable()
