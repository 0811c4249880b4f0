"""Prometheus metrics of one worker process, served on their own port (``pixq worker --metrics-port``).

One ``WorkerMetrics`` per worker process, with its own ``CollectorRegistry`` (nothing global).
The runner tells it what happens, in this order for a job it claimed::

    metrics = WorkerMetrics(model=..., worker=..., device=...)
    metrics.pipeline_loaded(loaded.load_s)
    metrics.start_server(port, address)         # serves /metrics and /readyz; port 0 picks a free one
    metrics.set_ready(True)                     # /readyz answers 200 from here (every size and mode warm)
    metrics.job_claimed(time.time() - record.created_at)
    metrics.rendering(jobs)                     # a pipeline call for this many jobs starts (it holds the GPU)
    metrics.step(n)                             # after every denoising step (n: jobs in the call)
    metrics.batch_rendered(jobs, images)        # one pipeline call rendered this many jobs and images
    metrics.rendering(0)                        # the call ended, however it ended
    metrics.job_finished("succeeded", render_s=..., width=..., height=..., images=...)

Rates are offered both ways: counters (``pixq_images_total``, ``pixq_denoising_steps_total``)
for ``rate()`` in PromQL, which is the Prometheus way, and gauges over a sliding window
(``pixq_images_per_second``, ``pixq_denoising_steps_per_second``) for a glance without a query.
GPU memory is read when scraped, and only where CUDA is already in use. docs/monitoring.md lists
every metric with Grafana panels.

The port answers without authentication, so it holds no job id (nor prompt, nor anything a job's owner
submitted): counts, timings and the worker's own name, model and device. Which jobs run where is for those
who may see jobs: ``pixq queue`` (Redis credentials) and Flower (its login). It listens on loopback unless
told otherwise (``pixq worker --metrics-host``; a pod that Prometheus scrapes sets ``0.0.0.0``).

The same port answers ``/readyz`` for an HTTP readiness probe: 503 ``starting`` until the worker is ready (its
graphs loaded and warm, the Celery consumer taking messages: what the ready file and the presence record's
``serving`` say), 200 ``ready`` then, 503 ``storage unavailable: ...`` while its store refuses writes (it takes no
jobs then), 503 ``draining`` once it is told to stop. prometheus_client's own server
answers every path with the metrics, so this module serves its WSGI app behind that one extra path.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

# How a claimed job ended for this worker.
OUTCOMES = (
    "succeeded",
    "failed",  # an error in the job (bad input, a render or upload error)
    "timed_out",  # ran past PIXQ_JOB_TIMEOUT_S
    "canceled",  # canceled while running
    "lease_lost",  # another worker holds it now (this one stalled past its lease)
    "given_back",  # the worker was stopping (or its store went down before the render): back on the queue
    "storage_unavailable",  # its images could not be stored, the store down: back on the queue, an attempt counted
)

# 0.05 s (a small image on a fast GPU) .. 120 s (2K, many steps, or a CPU).
RENDER_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0)
# A job may wait milliseconds on an idle worker or an hour behind a backlog.
QUEUE_WAIT_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                        3600.0)
DEFAULT_WINDOW_S = 60.0
# Images (and jobs) in one pipeline call: 1 .. a few dozen.
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class WindowedRate:
    """Events per second over the last ``window_s`` seconds, kept in one-second buckets.

    A process younger than the window divides by its age (at least one second), so the
    first minute does not read low.
    """

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        if window_s < 1:
            raise ValueError("window_s must be at least 1 second")
        self.window_s = window_s
        self.clock = clock
        self._started = clock()
        self._buckets: deque[list[float]] = deque()  # [second, count], oldest first
        self._lock = threading.Lock()

    def add(self, n: float = 1) -> None:
        now = self.clock()
        second = float(int(now))
        with self._lock:
            if self._buckets and self._buckets[-1][0] == second:
                self._buckets[-1][1] += n
            else:
                self._buckets.append([second, n])
            self._prune(now)

    def rate(self) -> float:
        now = self.clock()
        with self._lock:
            self._prune(now)
            total = sum(count for _, count in self._buckets)
        return total / min(self.window_s, max(now - self._started, 1.0))

    def _prune(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - self.window_s:
            self._buckets.popleft()


class GpuMemoryCollector(Collector):
    """GPU memory of this process, read at scrape time; nothing on CPU or before CUDA is in use.

    It never initializes CUDA itself (a scrape must not create a context, nor touch CUDA in a
    process that may fork).
    """

    def __init__(self, device: str):
        self.device = device

    def collect(self) -> Iterator[GaugeMetricFamily]:
        torch = sys.modules.get("torch")
        if torch is None or not self.device.startswith("cuda"):
            return
        try:
            if not torch.cuda.is_initialized():
                return
            allocated = torch.cuda.memory_allocated(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.memory_reserved(self.device)
        except Exception:  # a broken device: the scrape still answers, without these
            return
        for name, doc, value in (
            ("pixq_gpu_memory_allocated_bytes", "GPU memory held by tensors now.", allocated),
            ("pixq_gpu_memory_peak_allocated_bytes", "Most GPU memory held by tensors since start.", peak),
            ("pixq_gpu_memory_reserved_bytes", "GPU memory held by PyTorch's caching allocator.", reserved),
        ):
            family = GaugeMetricFamily(name, doc, labels=["device"])
            family.add_metric([self.device], float(value))
            yield family


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        """Scrapes and probes every few seconds are not worth a log line each."""


class WorkerMetrics:
    """The metrics of one worker process serving one model. Thread-safe (two job threads share it)."""

    def __init__(
        self,
        model: str,
        worker: str,
        device: str = "cpu",
        registry: CollectorRegistry | None = None,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.model = model
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._readiness: tuple[bool, str] = (False, "starting")
        self._lock = threading.Lock()
        self._holding = 0
        self._rendering = 0  # jobs in the pipeline call on the GPU now

        Info("pixq_worker", "The worker process: Celery node name, model and device.", registry=r).info(
            {"worker": worker, "model": model, "device": device})
        self.jobs = Counter("pixq_jobs", "Jobs this worker claimed, by how they ended.", ["model", "outcome"],
                            registry=r)
        for outcome in OUTCOMES:
            self.jobs.labels(model=model, outcome=outcome)  # every series exists from the start, at 0
        self.render_seconds = Histogram(
            "pixq_render_seconds", "Time on the GPU per job: prompt encoding, denoising and decoding.",
            ["model", "size"], buckets=RENDER_BUCKETS_S, registry=r)
        self.queue_wait_seconds = Histogram(
            "pixq_queue_wait_seconds", "From the job's submission to its claim by this worker.",
            ["model"], buckets=QUEUE_WAIT_BUCKETS_S, registry=r).labels(model=model)
        self.images = Counter("pixq_images", "Images rendered and stored.", ["model"], registry=r).labels(model=model)
        self.steps = Counter("pixq_denoising_steps", "Denoising steps done (each step is one transformer pass).",
                             ["model"], registry=r).labels(model=model)
        self._images_rate = WindowedRate(window_s, clock)
        self._steps_rate = WindowedRate(window_s, clock)
        Gauge("pixq_images_per_second", f"Images stored per second over the last {window_s:g} s.", ["model"],
              registry=r).labels(model=model).set_function(self._images_rate.rate)
        Gauge("pixq_denoising_steps_per_second", f"Denoising steps per second over the last {window_s:g} s.",
              ["model"], registry=r).labels(model=model).set_function(self._steps_rate.rate)
        self.batch_images = Histogram(
            "pixq_batch_images", "Images per pipeline call (jobs rendered together share one call).",
            ["model"], buckets=BATCH_BUCKETS, registry=r).labels(model=model)
        self.batch_jobs = Histogram(
            "pixq_batch_jobs", "Jobs per pipeline call.", ["model"], buckets=BATCH_BUCKETS,
            registry=r).labels(model=model)
        self.load_seconds = Gauge("pixq_pipeline_load_seconds", "Time to load the pipeline (and warm it up).",
                                  ["model"], registry=r).labels(model=model)
        self.start_seconds = Gauge(
            "pixq_worker_start_seconds", "Seconds each start-up phase took (phase=ready: process start to serving).",
            ["model", "phase"], registry=r)
        self.aot_graphs = Gauge("pixq_worker_aot_graphs", "AOT graphs loaded from a pixq compile artefact set "
                                "(0: none matched, the worker compiled or runs eager).", ["model"],
                                registry=r).labels(model=model)
        self.eager_calls = Gauge("pixq_worker_uncompiled_calls", "Transformer and VAE calls that ran eager because "
                                 "their shape had no compiled graph (never compiled while a job waits).", ["model"],
                                 registry=r).labels(model=model)
        self.current_jobs = Gauge("pixq_current_jobs", "Jobs this worker holds now (rendering or storing).",
                                  ["model"], registry=r).labels(model=model)
        # How busy the GPU is, never which jobs (an unauthenticated port: see the module docstring).
        self.rendering_jobs = Gauge("pixq_rendering_jobs", "Jobs in the pipeline call on the GPU now (0: idle).",
                                    ["model"], registry=r).labels(model=model)
        self.rendering_step = Gauge("pixq_rendering_step", "The denoising step the call on the GPU has done "
                                    "(0: idle).", ["model"], registry=r).labels(model=model)
        r.register(GpuMemoryCollector(device))
        ProcessCollector(registry=r)  # process_* (CPU seconds, resident memory, open files)

    # -- what the worker reports --------------------------------------------------------------

    def pipeline_loaded(self, seconds: float) -> None:
        self.load_seconds.set(seconds)

    def started(self, phases: dict[str, float], aot_graphs: int, eager_calls: Callable[[], float]) -> None:
        """The start-up's phases (seconds), how many AOT graphs were loaded, and the eager-call count's source."""
        for phase, seconds in phases.items():
            self.start_seconds.labels(model=self.model, phase=phase.removesuffix("_s")).set(seconds)
        self.aot_graphs.set(aot_graphs)
        self.eager_calls.set_function(eager_calls)

    def job_claimed(self, queue_wait_s: float) -> None:
        """This worker claimed a job that waited ``queue_wait_s`` since its submission."""
        self.queue_wait_seconds.observe(max(queue_wait_s, 0.0))
        with self._lock:
            self._holding += 1
            self.current_jobs.set(self._holding)

    def rendering(self, jobs: int) -> None:
        """A pipeline call for ``jobs`` jobs holds the GPU now (its step back at 0); ``0`` once it let go."""
        self._rendering = jobs
        self.rendering_jobs.set(jobs)
        self.rendering_step.set(0)

    def step(self, n: int = 1) -> None:
        """One denoising step of the call finished, for its ``n`` jobs still in it."""
        self.steps.inc(n)
        self._steps_rate.add(n)
        if self._rendering:
            self.rendering_step.inc()

    def batch_rendered(self, jobs: int, images: int) -> None:
        """One pipeline call rendered ``jobs`` jobs, ``images`` images in all."""
        self.batch_jobs.observe(jobs)
        self.batch_images.observe(images)

    def job_finished(self, outcome: str, render_s: float | None = None, width: int | None = None,
                     height: int | None = None, images: int = 0) -> None:
        """A claimed job ended for this worker. ``render_s`` (with the size) when it rendered to the end;
        ``images``: how many were stored."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; one of {', '.join(OUTCOMES)}")
        self.jobs.labels(model=self.model, outcome=outcome).inc()
        if render_s is not None:
            if width is None or height is None:
                raise ValueError("render_s needs the width and height")
            self.render_seconds.labels(model=self.model, size=f"{width}x{height}").observe(render_s)
        if images:
            self.images.inc(images)
            self._images_rate.add(images)
        with self._lock:
            self._holding = max(self._holding - 1, 0)
            self.current_jobs.set(self._holding)

    # -- serving ------------------------------------------------------------------------------

    def set_ready(self, ready: bool, why: str = "") -> None:
        """What ``/readyz`` answers: 200 when ready, else 503 with ``why`` (``starting``, ``draining``,
        ``storage unavailable: ...``)."""
        self._readiness = (ready, why or ("ready" if ready else "starting"))

    def start_server(self, port: int, address: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` and ``/readyz`` from a daemon thread on ``address`` (loopback unless told: the
        port has no authentication); returns the port (``port=0`` picks a free one).

        Call it in the process that renders, after the pipeline is loaded.
        """
        if self._server is not None:
            raise RuntimeError("the metrics server is already running")
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if environ.get("PATH_INFO") == "/readyz":
                ready, why = self._readiness
                start_response("200 OK" if ready else "503 Service Unavailable",
                               [("Content-Type", "text/plain; charset=utf-8")])
                return [f"{why}\n".encode()]
            return metrics_app(environ, start_response)

        self._server = make_server(address, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="pixq-metrics", daemon=True)
        self._thread.start()
        return int(self._server.server_port)

    def stop_server(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def exposition(self) -> bytes:
        """The text a scrape gets."""
        return generate_latest(self.registry)
