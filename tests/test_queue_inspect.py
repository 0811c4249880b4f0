"""`pixq queue` / ``Client.queues()``: what waits, for how long, what runs where, who serves (real Redis and worker)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from pixq.client import Client
from pixq.queues import QueueReport, message_job_id
from pixq.records import JobState
from pixq.schema import parse_request
from pixq.wire import queue_lists, send_job

from tests.services import Service
from tests.support import wait_for

MAIN_NODE = "cpu-main@test"  # conftest's session worker


def pixq(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pixq", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def by_model(reports: list[QueueReport]) -> dict[str, QueueReport]:
    return {r.model: r for r in reports}


@pytest.fixture()
def nobody(client: Client, raw_redis: redis.Redis) -> Iterator[str]:
    """A model no worker serves: its jobs stay queued. Canceled and its lists dropped afterwards."""
    model = f"/models/nobody-{uuid.uuid4().hex[:8]}"
    yield model
    for report in client.queues([model]):
        for job in report.running:
            client.cancel(job.id)
    raw_redis.delete(*queue_lists(model))


def submit_waiting(client: Client, model: str, n: int, gap_s: float = 0.05) -> list[str]:
    ids = []
    for priority in (0, 9, 5)[:n]:  # each priority has its own list; the oldest is found across them
        ids.append(client.submit("waits for nobody", model_name=model, width=128, height=128, priority=priority).id)
        time.sleep(gap_s)
    return ids


def test_waiting_jobs_depth_and_the_oldest_ones_age(client: Client, nobody: str) -> None:
    ids = submit_waiting(client, nobody, 3)
    time.sleep(0.3)
    report = by_model(client.queues())[nobody]
    first = client.status(ids[0])
    assert report.depth == 3
    assert report.oldest_job_id == ids[0]
    assert report.oldest_age_s is not None
    assert 0.3 <= report.oldest_age_s <= time.time() - first.created_at + 0.01
    assert report.running == [] and report.workers == []

    # A canceled job no longer waits: the oldest is the next one (its message stays until a worker drops it).
    client.cancel(ids[0])
    report = by_model(client.queues())[nobody]
    assert report.depth == 3 and report.oldest_job_id == ids[1]
    assert report.oldest_age_s is not None and report.oldest_age_s < time.time() - first.created_at
    for job_id in ids[1:]:
        client.cancel(job_id)
    assert by_model(client.queues())[nobody].oldest_job_id is None


def test_running_job_with_its_step_and_the_live_worker(client: Client, worker: Service, tiny_model: str) -> None:
    job = client.submit("a long one", model_name=tiny_model, width=256, height=256, num_inference_steps=200)
    try:
        def shown_running() -> Any:
            report = by_model(client.queues()).get(tiny_model)
            running = [j for j in report.running if j.id == job.id] if report else []
            return (report, running) if running and running[0].step >= 2 else None

        report, (entry,) = wait_for(shown_running, 30, "the job to show as running")
        assert entry.worker == MAIN_NODE and entry.total_steps == 200 and entry.started_at is not None
        assert report is not None and report.depth == 0 and report.oldest_age_s is None
        (live,) = [w for w in report.workers if w.name == MAIN_NODE]
        assert live.model == tiny_model and live.device == "cpu" and live.pid == worker.pid
    finally:
        client.cancel(job.id)
    assert client.wait(job.id, timeout_s=30).state in (JobState.canceled, JobState.succeeded)
    report = by_model(client.queues())[tiny_model]
    assert all(j.id != job.id for j in report.running)


def test_a_resent_message_is_traced_to_its_job(client: Client, raw_redis: redis.Redis, nobody: str) -> None:
    request = parse_request({"prompt": "again", "model_name": nobody, "width": 128, "height": 128,
                             "priority": 9}).with_seed()  # most urgent: the list without a suffix
    send_job(client._celery, "a" * 32, request)  # a re-sent message keeps the job id as its task id
    raw = raw_redis.lrange(queue_lists(nobody)[0], -1, -1)[0]
    assert json.loads(raw)["headers"]["id"] == "a" * 32 and message_job_id(raw) == "a" * 32
    # One sent before re-sent messages kept it (its task id is not the job id): traced by its kwargs.
    send_job(client._celery, "b" * 32, request, task_id=uuid.uuid4().hex)
    raw = raw_redis.lrange(queue_lists(nobody)[0], 0, 0)[0]  # the newest (kombu pushes on the left)
    assert json.loads(raw)["headers"]["id"] != "b" * 32
    assert message_job_id(raw) == "b" * 32
    assert message_job_id(b"not json") is None


def test_only_models_with_something_to_show_and_those_asked_for(client: Client, nobody: str) -> None:
    assert nobody not in by_model(client.queues())
    empty = by_model(client.queues([nobody]))[nobody]
    assert (empty.depth, empty.oldest_job_id, empty.running, empty.workers) == (0, None, [], [])


def test_pixq_queue_table_and_json(env: dict[str, str], client: Client, worker: Service, nobody: str,
                                   tiny_model: str) -> None:
    ids = submit_waiting(client, nobody, 2)
    as_json = pixq("queue", "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    reports = {r["model"]: r for r in json.loads(as_json.stdout)}
    assert reports[nobody]["depth"] == 2 and reports[nobody]["oldest_job_id"] == ids[0]
    assert reports[nobody]["oldest_age_s"] > 0 and reports[nobody]["workers"] == []
    assert [w["name"] for w in reports[tiny_model]["workers"]] == [MAIN_NODE]

    table = pixq("queue", env={**env, "COLUMNS": "250"})
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert any(nobody in line and " 2 " in line and " s " in line and "none" in line for line in lines), table.stdout
    assert any(tiny_model in line and MAIN_NODE in line for line in lines), table.stdout
    for job_id in ids:
        client.cancel(job_id)
