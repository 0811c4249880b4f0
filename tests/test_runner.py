"""The worker's job runner in-process (real Redis, real S3, real tiny pipeline), for crash paths
that need a deliberately broken model: a transformer that runs out of CUDA memory on demand."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pixq.client import Client
from pixq.records import JobState
from pixq.settings import Settings
from pixq.worker.gpu.pipeline import LoadedPipeline, load_pipeline
from pixq.worker.jobs.lease import Leases
from pixq.worker.jobs.runner import JobRunner, RunnerConfig
from pixq.worker.jobs.storage import Storage
from pixq.worker.jobs.tasks import create_app

from tests.support import wait_for


@pytest.fixture()
def broken(
    tmp_path: Path, tiny_model: str, env: dict[str, str], s3_client
) -> Iterator[tuple[Client, JobRunner, threading.Event]]:
    model = str(tmp_path / "oom-model")
    Path(model).symlink_to(tiny_model)  # its own name: no other worker serves its queue
    settings = Settings.from_env(env)
    loaded: LoadedPipeline = load_pipeline(model)
    oom = threading.Event()

    def maybe_oom(*_: object) -> None:
        if oom.is_set():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    loaded.pipe.transformer.register_forward_pre_hook(maybe_oom)
    client = Client(settings)
    leases = Leases(client.records, "inproc@test", ttl_s=5, hard_limit_s=60)
    runner = JobRunner(client.records, loaded, Storage(settings, client=s3_client),
                       RunnerConfig(worker_name="inproc@test", model_name=model), leases, create_app(settings))
    yield client, runner, oom
    client.close()


def test_out_of_memory_fails_the_job_clearly_and_the_next_one_runs(broken) -> None:  # type: ignore[no-untyped-def]
    client, runner, oom = broken
    model = runner.config.model_name
    oom.set()
    job = client.submit("too big", model_name=model, width=128, height=128, num_inference_steps=3)
    record = runner.run(job.id)
    assert record is not None and record.state is JobState.failed
    assert record.error is not None and record.error.type == "OutOfMemoryError"
    assert "CUDA out of memory" in record.error.message and record.images == []
    assert client.records.running_ids().count(job.id) == 0  # lease and running entry released

    oom.clear()
    ok = runner.run(client.submit("fits", model_name=model, width=128, height=128, num_inference_steps=3).id)
    assert ok is not None and ok.state is JobState.succeeded and len(ok.images) == 1


def test_a_second_delivery_of_a_finished_job_does_nothing(broken) -> None:  # type: ignore[no-untyped-def]
    client, runner, _ = broken
    job = client.submit("once", model_name=runner.config.model_name, width=128, height=128, num_inference_steps=2)
    first = runner.run(job.id)
    assert first is not None and first.state is JobState.succeeded
    assert runner.run(job.id) is None  # settled: skipped
    again = client.status(job.id)
    assert again.attempts == 1 and again.images == first.images and again.finished_at == first.finished_at


def test_a_job_without_progress_past_the_hard_limit_is_caught(client, tiny_model: str) -> None:  # type: ignore[no-untyped-def]

    from pixq.worker.jobs.lease import exit_hung_process

    hung: list[str] = []
    leases = Leases(client.records, "hang@test", ttl_s=1, hard_limit_s=0.5, on_hung=hung.append)
    assert Leases(client.records, "x", 1, 1).on_hung is exit_hung_process  # production: end the process
    job = client.submit("hangs", model_name="/models/hangs-nowhere", width=128, height=128)
    assert client.records.claim(job.id, "hang@test", 1, 3)[0] == "claimed"
    leases.start()
    try:
        with leases.hold(job.id) as held:
            wait_for(lambda: hung, 5, "the hung job to be reported", poll_s=0.05)
            assert hung[0] == job.id
            assert not held.lost.is_set()  # the lease itself was kept renewed meanwhile
    finally:
        leases.stop()
        client.records.release(job.id, "hang@test", state=JobState.failed)
