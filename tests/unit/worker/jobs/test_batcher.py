"""The GPU's queue inside one worker (pixq/worker/jobs/batcher.py), on its own: no Redis, no Celery.

The Batcher renders claimed jobs on the tiny test model (CPU): which waiting jobs share a call (same batch key,
most urgent first, up to the policy's images per call), a lone job starts at once, a job withdrawn while it waits
never renders, a call whose every job has left stops early, and a drain refuses a call without rendering it.
The test holds the GPU lock to let jobs pile up behind a running one, as jobs arrive while the GPU is busy.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from pixq.records import JobRecord, JobState
from pixq.schema import JobRequest
from pixq.worker.gpu.batch import BatchPolicy
from pixq.worker.gpu.pipeline import LoadedPipeline, load_pipeline
from pixq.worker.jobs.batcher import Batcher, Pending
from pixq.worker.jobs.lease import HeldJob

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def pipe(tiny_model: str) -> LoadedPipeline:
    return load_pipeline(tiny_model)


def job(model: str, name: str, priority: int = 0, images: int = 1, steps: int = 2) -> Pending:
    request = JobRequest.model_validate({"prompt": name, "model_name": model, "width": 128, "height": 128,
                                         "num_inference_steps": steps, "priority": priority, "seed": 1,
                                         "num_images_per_prompt": images})
    job_id = f"{name}-{uuid.uuid4().hex[:8]}"
    record = JobRecord(id=job_id, state=JobState.running, request=request, created_at=0.0)
    return Pending(record=record, held=HeldJob(job_id))


def names(batch: list[Pending]) -> list[str]:
    return [p.record.request.prompt for p in batch]


class Calls:
    """What the Batcher reports through its hooks: each call's jobs, in the order the calls ran."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def on_batch(self, batch: list[Pending], _seconds: float) -> None:
        self.batches.append(names(batch))


def batcher(pipe: Any, lock: threading.Lock, calls: Calls, **policy: Any) -> Batcher:
    return Batcher(pipe, lock, BatchPolicy(**policy), on_batch=calls.on_batch)


def wait_done(*jobs: Pending) -> None:
    for p in jobs:
        assert p.done.wait(TIMEOUT_S), f"{names([p])} never ended"


def test_waiting_jobs_that_can_share_a_call_share_it_most_urgent_first(pipe: LoadedPipeline, tiny_model: str) -> None:
    lock, calls = threading.Lock(), Calls()
    gpu = batcher(pipe, lock, calls, max_batch=4)
    first = job(tiny_model, "first")
    with lock:  # the GPU is busy: what arrives now waits
        gpu.submit(first)
        assert_taken(gpu, first)
        low = job(tiny_model, "low")
        other = job(tiny_model, "other-steps", priority=9, steps=3)  # another batch key: never in low's call
        high = job(tiny_model, "high", priority=5)
        pair = job(tiny_model, "pair", images=2)
        extra = job(tiny_model, "over-the-limit")  # 1 + 1 + 2 images already: the fifth image waits
        for p in (low, other, high, pair, extra):
            gpu.submit(p)
        assert gpu.waiting() == 5
    wait_done(first, low, other, high, pair, extra)
    assert calls.batches == [["first"], ["other-steps"], ["high", "low", "pair"], ["over-the-limit"]]
    for p in (first, low, other, high, pair, extra):
        assert p.error is None and p.images is not None and len(p.images) == p.images_wanted, names([p])
        assert p.step == p.record.request.num_inference_steps
    assert high.batch_images == 4 and high.info is not None and high.info.batch_id == high.record.id
    assert pair.info == high.info  # one call, one render report
    assert extra.batch_images == 1


def assert_taken(gpu: Batcher, p: Pending) -> None:
    """The GPU thread took ``p`` (a lone job starts at once) and now waits for the lock."""
    for _ in range(TIMEOUT_S * 50):
        if gpu.waiting() == 0:
            return
        p.done.wait(0.02)
    raise AssertionError("a lone job was not taken at once")


def test_the_policy_caps_the_images_of_a_call(pipe: LoadedPipeline, tiny_model: str) -> None:
    lock, calls = threading.Lock(), Calls()
    gpu = batcher(pipe, lock, calls, max_batch=2)
    first = job(tiny_model, "first")
    with lock:
        gpu.submit(first)
        assert_taken(gpu, first)
        jobs = [job(tiny_model, f"j{i}") for i in range(3)]
        for p in jobs:
            gpu.submit(p)
    wait_done(first, *jobs)
    assert calls.batches == [["first"], ["j0", "j1"], ["j2"]]


def test_a_job_withdrawn_while_it_waits_never_renders(pipe: LoadedPipeline, tiny_model: str) -> None:
    lock, calls = threading.Lock(), Calls()
    gpu = batcher(pipe, lock, calls, max_batch=4)
    first, canceled, kept = job(tiny_model, "first"), job(tiny_model, "canceled"), job(tiny_model, "kept")
    with lock:
        gpu.submit(first)
        assert_taken(gpu, first)
        gpu.submit(canceled)
        gpu.submit(kept)
        assert gpu.withdraw(canceled) is True
    wait_done(first, kept)
    assert calls.batches == [["first"], ["kept"]]
    assert canceled.images is None and not canceled.done.is_set()
    assert gpu.withdraw(kept) is False  # its render began (and ended): too late to take it out


def test_a_call_whose_every_job_left_stops_early_without_images(pipe: LoadedPipeline, tiny_model: str) -> None:
    lock, calls = threading.Lock(), Calls()
    left: list[Pending] = []

    def leave_at_step_two(_in_call: int) -> None:
        for p in gpu.running:
            if p.step >= 2:
                p.stop(RuntimeError("canceled"))  # what the job's own thread does on a cancel
                left.append(p)

    gpu = Batcher(pipe, lock, BatchPolicy(max_batch=4), on_step=leave_at_step_two, on_batch=calls.on_batch,
)
    long = job(tiny_model, "long", steps=40)
    gpu.submit(long)
    wait_done(long)
    assert left and long.stopped is not None
    assert long.images is None and long.error is None and calls.batches == []  # no render reported
    assert long.step < 40


def test_a_drain_refuses_the_call_before_it_renders(pipe: LoadedPipeline, tiny_model: str) -> None:
    lock, calls = threading.Lock(), Calls()
    draining = RuntimeError("the worker is draining")
    gpu = Batcher(pipe, lock, BatchPolicy(max_batch=4), before_batch=lambda _jobs: draining,
                  on_batch=calls.on_batch)
    a, b = job(tiny_model, "a"), job(tiny_model, "b")
    with lock:
        gpu.submit(a)
        assert_taken(gpu, a)
        gpu.submit(b)
    wait_done(a, b)
    assert a.error is draining and b.error is draining
    assert a.images is None and b.images is None and a.started is None and calls.batches == []
