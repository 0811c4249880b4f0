"""The GPU's queue inside one worker: claimed jobs wait here, one thread renders them in batches.

Each job thread (one per Celery message, ``runner.py``) claims its job, hands it here with
``submit`` and waits for its images. One GPU thread takes the most urgent waiting job (highest
priority, then first come), adds the waiting jobs that can share its pipeline call
(``pixq.worker.gpu.batch.batch_key``, most urgent first) up to the policy's images per call, and
renders them in one call under the runner's GPU lock. Only jobs already waiting are batched: a
lone job starts at once (the gather window, 0 by default, is the only wait a job can be given).

No I/O on the GPU thread: the step callback only records each job's step and a heartbeat. Each
job's own thread writes its progress to Redis, reads its cancel flag and checks its deadline
while it waits, and ends its job at once when it stops (``Pending.stop``); its rows ride along to
the end of the call (the others' images are not disturbed) and its images are dropped. The call
stops early only when every job of it has stopped, or the worker is stopping now (then every
job of the call goes back to the queue).

Hand-written rather than a library: it has to sit between Celery's threads and one CUDA context,
and the batching rule is the model's, not a generic queue's.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pixq.records import JobRecord, RenderInfo
from pixq.worker.gpu.batch import BatchKey, BatchPolicy, batch_key, render_batch
from pixq.worker.gpu.render import render_info
from pixq.worker.jobs.lease import HeldJob

log = logging.getLogger(__name__)

_seq = itertools.count()


@dataclass(eq=False)
class Pending:
    """One claimed job from ``submit`` until its images (or its end) are known."""

    record: JobRecord
    held: HeldJob
    key: BatchKey = ()
    seq: int = field(default_factory=lambda: next(_seq))
    done: threading.Event = field(default_factory=threading.Event)
    started: float | None = None  # monotonic time its render began (None: still waiting)
    step: int = 0
    batch_images: int = 0
    images: list[Any] | None = None
    info: RenderInfo | None = None
    error: BaseException | None = None  # why the render gave no images (raised in the job's thread)
    stopped: BaseException | None = None  # set by the job's own thread: it has left the batch

    def __post_init__(self) -> None:
        if not self.key:
            self.key = batch_key(self.record.request)

    @property
    def images_wanted(self) -> int:
        return self.record.request.num_images_per_prompt

    @property
    def urgency(self) -> tuple[int, int]:
        return (-self.record.request.priority, self.seq)

    def stop(self, reason: BaseException) -> None:
        """The job leaves: its thread ends it; the GPU thread drops its rows' result."""
        if self.stopped is None:
            self.stopped = reason


class _AllStopped(Exception):
    """Every job of the running call has left it: stop the call."""


class Batcher:
    """One GPU thread rendering the waiting jobs in batches; started on first use."""

    def __init__(
        self,
        pipe: Any,
        gpu_lock: threading.Lock,
        policy: BatchPolicy,
        before_batch: Callable[[list[Pending]], BaseException | None] = lambda _: None,
        stop_now: Callable[[], BaseException | None] = lambda: None,
        on_step: Callable[[int], None] = lambda _: None,
        on_batch: Callable[[list[Pending], float], None] = lambda *_: None,
        after_batch: Callable[[], None] = lambda: None,
    ):
        self.pipe = pipe
        self.gpu_lock = gpu_lock
        self.policy = policy
        self.before_batch = before_batch  # under the GPU lock: a reason to start none of them (draining)
        self.stop_now = stop_now  # at every step: a reason to stop the whole call (the worker stops now)
        self.on_step = on_step  # metrics: steps done by jobs still in the call
        self.on_batch = on_batch  # metrics: the call rendered (its jobs, its seconds)
        self.after_batch = after_batch  # the call ended, however it ended
        self._waiting: list[Pending] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.running: list[Pending] = []  # the jobs of the call on the GPU now

    # -- the job threads' side ----------------------------------------------------------------

    def submit(self, pending: Pending) -> None:
        with self._cond:
            self._waiting.append(pending)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="pixq-gpu", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def withdraw(self, pending: Pending) -> bool:
        """Take a job that has not started out of the queue; ``False`` if its render began."""
        with self._cond:
            if pending in self._waiting:
                self._waiting.remove(pending)
                return True
            return False

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    # -- the GPU thread -----------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                with self.gpu_lock:
                    self._run(batch)
            except BaseException as exc:  # pragma: no cover - _run records errors itself
                log.exception("batch of %d job(s) failed outside the render", len(batch))
                for p in batch:
                    p.error = p.error or exc
            finally:
                self.running = []
                self.after_batch()
                for p in batch:
                    p.done.set()

    def _next_batch(self) -> list[Pending]:
        with self._cond:
            while True:
                while not self._waiting:
                    self._cond.wait()
                head = min(self._waiting, key=lambda p: p.urgency)
                request = head.record.request
                limit = self.policy.limit(request.width, request.height, request.use_resolution_binning)
                deadline = time.monotonic() + self.policy.gather_window_s
                while head in self._waiting and self._images(head) < limit \
                        and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                if head in self._waiting:  # not withdrawn (canceled) while gathering
                    break
            batch = [head]
            images = head.images_wanted
            for p in sorted(self._waiting, key=lambda p: p.urgency):
                if p is not head and p.key == head.key and images + p.images_wanted <= limit:
                    batch.append(p)
                    images += p.images_wanted
            for p in batch:
                self._waiting.remove(p)
            return batch

    def _images(self, head: Pending) -> int:
        return sum(p.images_wanted for p in self._waiting if p.key == head.key)

    def _run(self, batch: list[Pending]) -> None:
        live = [p for p in batch if p.stopped is None]
        reason = self.before_batch(live)
        if reason is not None:
            for p in live:
                p.error = reason
            return
        if not live:
            return
        self._render(live)

    def _render(self, batch: list[Pending]) -> None:
        images = sum(p.images_wanted for p in batch)
        started = time.monotonic()
        for p in batch:
            p.held.beat()  # waiting for the GPU counts as life; the deadline counts from here
            p.started, p.step, p.batch_images = started, 0, images
        self.running = batch

        stopping: list[BaseException] = []

        def on_step(step: int) -> None:
            left = 0
            for p in batch:
                if p.stopped is None:
                    p.held.beat()
                    p.step = step
                    left += 1
            self.on_step(left)
            reason = self.stop_now()
            if reason is not None:
                stopping.append(reason)
                raise reason
            if not left:
                raise _AllStopped()

        try:
            results = render_batch(self.pipe, [p.record.request for p in batch], on_step)
            seconds = time.monotonic() - started
            info = render_info(self.pipe, batch[0].record.request, seconds, batch_images=images,
                               batch_jobs=len(batch))
        except _AllStopped:
            return
        except Exception as exc:
            if len(batch) > 1 and not stopping:
                # A batch that fails (out of memory, say) is tried again one job at a time, so a job
                # fails for its own reasons only.
                log.warning("batch of %d jobs failed (%s: %s); rendering them one at a time",
                            len(batch), type(exc).__name__, exc)
                for p in batch:
                    if p.stopped is None:
                        self._render([p])
                return
            for p in batch:
                p.error = exc
            return
        self.on_batch(batch, seconds)
        info = info.model_copy(update={"batch_id": batch[0].record.id})
        for p, imgs in zip(batch, results, strict=True):
            p.images, p.info = imgs, info

