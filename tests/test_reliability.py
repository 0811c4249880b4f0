"""No job lost, no image twice: fault scenarios on real processes (issue 3).

Each scenario runs on its own redis-server (AOF on, so it can be restarted) and its own
workers; leases are short (3 s) so lapses show quickly. Each checks 0 lost jobs and exactly
one object per image.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Producer
from pixq.client import Client
from pixq.errors import QueueFull
from pixq.records import JobState
from pixq.settings import Settings
from pixq.wire import celery_config, queue_name

from tests.fixtures.cluster import LEASE_TTL_S, Cluster
from tests.services import S3Endpoint
from tests.support import wait_for

pytestmark = pytest.mark.slow  # fault scenarios: each starts its own Redis and workers, kills and restarts them


def running_on(client: Client, job_id: str, min_step: int = 2, not_on: set[str] | None = None) -> str:
    """Wait until the job is rendering (on a worker not in ``not_on``); returns the worker's name."""
    def check() -> str | None:
        r = client.status(job_id)
        ok = r.state is JobState.running and r.step >= min_step and r.worker not in (not_on or set())
        return r.worker if ok else None

    return wait_for(check, 60, f"job {job_id} to run")


LONG = dict(width=256, height=256, num_inference_steps=200)


def test_kill_9_mid_render_another_worker_finishes_it(cluster: Cluster) -> None:
    for _ in range(2):
        cluster.start_worker()
    client = cluster.client()
    job = client.submit("killed mid-render", num_images_per_prompt=2, seed=5, **LONG)
    victim = running_on(client, job.id)
    cluster.workers[victim].signal(signal.SIGKILL)
    killed_at = time.monotonic()
    record = client.wait(job.id, timeout_s=90)
    cluster.assert_delivered_once(record)
    assert record.attempts == 2 and record.worker != victim
    # Re-queued by the survivor's reaper well within ~30 s of the lease lapsing.
    assert record.started_at is not None and time.monotonic() - killed_at < 60
    assert "re-queued" in "".join(cluster.log(n) for n in cluster.workers if n != victim)


def test_job_that_kills_its_worker_every_time_is_dead_after_the_cap(cluster: Cluster) -> None:
    cluster.start_worker()
    client = cluster.client()
    job = client.submit("poison", **LONG)
    killed: set[str] = set()
    for attempt in (1, 2, 3):
        victim = running_on(client, job.id, not_on=killed)
        killed.add(victim)
        assert client.status(job.id).attempts == attempt
        cluster.workers[victim].signal(signal.SIGKILL)
        cluster.workers[victim].stop()
        cluster.start_worker()  # a fresh worker: its reaper finds the lapsed lease
    record = wait_for(lambda: (r := client.status(job.id)).state.is_terminal and r, 60, "dead job")
    assert record.state is JobState.failed and record.attempts == 3
    assert record.error is not None and record.error.type == "WorkerLost"
    assert record.error.message == "worker lost 3 times"
    time.sleep(LEASE_TTL_S * 2)  # no loop: nothing picks it up again
    later = client.status(job.id)
    assert later.attempts == 3 and later.state is JobState.failed, later
    assert [r.id for r in client.dead()] == [job.id]
    assert cluster.objects(job.id) == []

    # `pixq retry` queues it again with fresh attempts; this time nothing kills the worker.
    again = client.retry(job.id)  # read after the send: a free worker may already have claimed it
    assert again.state is not JobState.failed and again.attempts <= 1 and again.error is None, again
    record = client.wait(job.id, timeout_s=60)
    cluster.assert_delivered_once(record)
    assert record.attempts == 1 and client.dead() == [], (record, cluster.objects(job.id))


def test_job_running_past_the_visibility_timeout_runs_once(cluster: Cluster, slow_model: str) -> None:
    short = {"PIXQ_VISIBILITY_TIMEOUT_S": "2"}
    for _ in range(2):
        cluster.start_worker(slow_model, **short)
    client = cluster.client(**short)
    job = client.submit("slow one", model_name=slow_model, **LONG)  # about 8 s
    running_on(client, job.id)
    record = client.wait(job.id, timeout_s=120)
    cluster.assert_delivered_once(record)
    assert record.attempts == 1
    logs = "".join(cluster.log(n) for n in cluster.workers)
    # Redis handed the unacked message out again; the second delivery did nothing.
    assert f"job {job.id}: not run (busy" in logs, logs[-3000:]
    assert logs.count(f"job {job.id}: running") == 1


def test_redis_restarted_mid_job(cluster: Cluster) -> None:
    name, _ = cluster.start_worker()
    client = cluster.client()
    job = client.submit("through a restart", **LONG)
    running_on(client, job.id)
    cluster.restart_redis()
    record = client.wait(job.id, timeout_s=90)
    cluster.assert_delivered_once(record)
    assert record.attempts == 1
    # The worker still consumes after reconnecting (celery#8030).
    after = client.wait(client.submit("after the restart", width=128, height=128, num_inference_steps=3).id,
                        timeout_s=60)
    cluster.assert_delivered_once(after)


@pytest.mark.slow
def test_jobs_prefetched_after_a_redis_restart_run_promptly_when_that_worker_dies(
        cluster: Cluster, slow_model: str) -> None:
    """The issue-15 defect: after a reconnect kombu does not lower the consumer's prefetch, so a
    worker busy with two jobs takes two more messages; they are neither claimed nor leased. When
    that worker dies, their messages sit in kombu's unacked hash until the visibility timeout
    (1800 s here). The reconciliation re-sends them once the dead worker's reservations lapse."""
    from pixq.wire import RESERVED_KEY_PREFIX

    name, svc = cluster.start_worker(slow_model)
    client = cluster.client()
    longs = [client.submit(f"long {i}", model_name=slow_model, **LONG)
             for i in range(2)]
    wait_for(lambda: all(client.status(j.id).state is JobState.running for j in longs), 60, "two jobs claimed")
    shorts = [client.submit(f"short {i}", model_name=slow_model, width=128, height=128, num_inference_steps=2,
                            priority=9) for i in range(3)]
    cluster.restart_redis()
    reserved = RESERVED_KEY_PREFIX + name
    held = wait_for(lambda: (m := {x.decode() for x in client.conn.smembers(reserved)}) >= {j.id for j in longs}
                    and len(m) == 4 and m, 60, "the worker to take two more messages after the restart")
    prefetched = [j for j in shorts if j.id in held]
    assert len(prefetched) == 2, held
    assert all(client.status(j.id).state is JobState.queued and client.status(j.id).attempts == 0
               for j in prefetched)
    assert all(client.status(j.id).state is JobState.running for j in longs)
    svc.signal(signal.SIGKILL)
    svc.stop()
    killed_at = time.monotonic()
    for job in longs:  # re-queued by the lapsed lease, they stop at their first step: the next worker is free
        client.cancel(job.id)
    survivor, _ = cluster.start_worker(slow_model)
    for job in prefetched:
        record = client.wait(job.id, timeout_s=120)
        cluster.assert_delivered_once(record)
        assert record.attempts == 1
    delay = time.monotonic() - killed_at
    print(f"prefetched jobs of the dead worker ran {delay:.1f} s after the kill (visibility timeout 1800 s)")
    assert "queued with no message" in cluster.log(survivor)
    for job in shorts:
        cluster.assert_delivered_once(client.wait(job.id, timeout_s=120))
    for job in longs:
        assert client.wait(job.id, timeout_s=120).state is JobState.canceled


def test_duplicate_idempotency_key_concurrently_gives_one_job(cluster: Cluster) -> None:
    cluster.start_worker()
    client = cluster.client()
    key = f"order-{uuid.uuid4()}"
    results: list[str] = []
    barrier = threading.Barrier(8)

    def submit() -> None:
        c = cluster.client()
        barrier.wait()
        results.append(c.submit("same order", idempotency_key=key, width=128, height=128,
                                num_inference_steps=3).id)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8 and len(set(results)) == 1
    record = client.wait(results[0], timeout_s=60)
    cluster.assert_delivered_once(record)
    assert len(list(client.conn.scan_iter("pixq:job:*"))) == 1
    assert client.queue_depth(cluster.model) == 0


def test_sigterm_drains_the_running_job_and_takes_no_new_one(cluster: Cluster) -> None:
    name, svc = cluster.start_worker()
    client = cluster.client()
    running = client.submit("finish me", **LONG)
    running_on(client, running.id)
    waiting = [client.submit(f"wait {i}", width=128, height=128, num_inference_steps=3) for i in range(3)]
    # The worker's second job thread takes one and waits for the GPU behind the running job.
    wait_for(lambda: client.status(waiting[0].id).state is JobState.running, 10, "a job waiting for the GPU")
    svc.signal(signal.SIGTERM)
    assert svc.proc is not None and svc.proc.wait(60) == 0
    cluster.assert_delivered_once(client.status(running.id))
    # The rest stay queued (one may have been reserved; it went back untouched).
    assert all(client.status(j.id).state is JobState.queued for j in waiting)
    assert all(client.status(j.id).attempts == 0 for j in waiting)
    cluster.start_worker()
    for j in waiting:
        cluster.assert_delivered_once(client.wait(j.id, timeout_s=60))


def test_second_sigterm_gives_the_running_job_back(cluster: Cluster) -> None:
    name, svc = cluster.start_worker()
    client = cluster.client()
    job = client.submit("give me back", **LONG)
    running_on(client, job.id)
    svc.signal(signal.SIGTERM)
    wait_for(lambda: "Warm shutdown" in cluster.log(name), 10, "the worker to start its warm shutdown")
    svc.signal(signal.SIGTERM)
    assert svc.proc is not None and svc.proc.wait(30) == 0
    record = client.status(job.id)
    assert record.state is JobState.queued and record.step == 0 and record.attempts == 0
    assert cluster.objects(job.id) == []
    assert "giving the running job back" in cluster.log(name)
    cluster.start_worker()
    record = client.wait(job.id, timeout_s=60)
    cluster.assert_delivered_once(record)
    assert record.attempts == 1


def test_per_job_deadline_fails_the_job_and_the_worker_goes_on(cluster: Cluster) -> None:
    cluster.start_worker(PIXQ_JOB_TIMEOUT_S="1")
    client = cluster.client()
    job = client.wait(client.submit("too slow", num_images_per_prompt=4, **LONG).id, timeout_s=60)
    assert job.state is JobState.failed and job.error is not None
    assert job.error.type == "TimedOut" and job.error.message.startswith("timed out after 1 s")
    assert cluster.objects(job.id) == []
    cluster.assert_delivered_once(client.wait(client.submit("quick", width=128, height=128,
                                                            num_inference_steps=2).id, timeout_s=60))


def test_queue_depth_limit_refuses_submits(cluster: Cluster) -> None:
    client = cluster.client(PIXQ_MAX_QUEUE_DEPTH="3")
    for i in range(3):
        client.submit(f"fill {i}", width=128, height=128)
    with pytest.raises(QueueFull, match="PIXQ_MAX_QUEUE_DEPTH"):
        client.submit("one too many", width=128, height=128)
    assert len(list(client.conn.scan_iter("pixq:job:*"))) == 3  # the refused one left nothing


def test_priorities_run_urgent_jobs_first(cluster: Cluster) -> None:
    client = cluster.client()
    low = [client.submit(f"low {i}", width=128, height=128, num_inference_steps=2, priority=0) for i in range(4)]
    high = client.submit("urgent", width=128, height=128, num_inference_steps=2, priority=9)
    mid = client.submit("soon", width=128, height=128, num_inference_steps=2, priority=5)
    cluster.start_worker()
    records = {j.id: client.wait(j.id, timeout_s=60) for j in [*low, high, mid]}
    order = sorted(records.values(), key=lambda r: r.started_at or 0)
    assert [r.id for r in order[:2]] == [high.id, mid.id]


def test_cancel_of_a_running_job_frees_the_worker(cluster: Cluster) -> None:
    cluster.start_worker()
    client = cluster.client()
    job = client.submit("stop me", **LONG)
    running_on(client, job.id)
    canceled_at = time.time()
    client.cancel(job.id)
    record = client.wait(job.id, timeout_s=30)
    # The job's thread reads the cancel flag every 50 ms beside the render (not at every step): it ends
    # within a fraction of a second, at whatever step the render has reached by then.
    assert record.state is JobState.canceled and record.step < LONG["num_inference_steps"]
    assert record.finished_at is not None and record.finished_at - canceled_at < 3.0
    assert cluster.objects(job.id) == []
    cluster.assert_delivered_once(client.wait(client.submit("next", width=128, height=128,
                                                            num_inference_steps=2).id, timeout_s=60))


def test_bad_messages_are_refused_and_the_worker_keeps_serving(cluster: Cluster) -> None:
    import pickle

    name, _ = cluster.start_worker()
    client = cluster.client()
    queue = queue_name(cluster.model)
    marker = cluster.root / "pwned"
    headers = {"lang": "py", "task": "pixq.render", "id": uuid.uuid4().hex, "argsrepr": "", "kwargsrepr": ""}
    options = celery_config(Settings.from_env(cluster.env))["broker_transport_options"]
    with Connection(cluster.env["PIXQ_REDIS_URL"], transport_options=options) as conn:
        producer = Producer(conn.channel(), exchange=Exchange(queue, type="direct"), routing_key=queue)

        class Pwn:
            def __reduce__(self):  # type: ignore[no-untyped-def]
                return (open, (str(marker), "w"))

        producer.publish(pickle.dumps(((), {"job_id": "x"}, {}, Pwn())), serializer=None,
                         content_type="application/x-python-serialize", content_encoding="binary",
                         headers={**headers, "id": uuid.uuid4().hex})
        producer.publish("this is not json {", serializer=None, content_type="application/json",
                         content_encoding="utf-8", headers={**headers, "id": uuid.uuid4().hex})
        producer.publish([[], {"job_id": "abc"}, {}], serializer="json",
                         headers={**headers, "task": "os.system", "id": uuid.uuid4().hex})
        producer.publish([[], {"job_id": "abc", "shell": "rm -rf /"}, {}], serializer="json",
                         headers={**headers, "id": uuid.uuid4().hex})
        producer.publish([[], {"job_id": "../../etc"}, {}], serializer="json",
                         headers={**headers, "id": uuid.uuid4().hex})
    record = client.wait(client.submit("still serving", width=128, height=128, num_inference_steps=2).id,
                         timeout_s=60)
    cluster.assert_delivered_once(record)
    refusals = ("Refusing to deserialize untrusted content of type pickle", "Can't decode message body",
                "Received unregistered task of type 'os.system'", "unexpected keyword argument 'shell'")
    wait_for(lambda: all(r in cluster.log(name) for r in refusals), 10, "the worker to log every refusal")
    log = cluster.log(name)
    assert not marker.exists()
    assert "malformed job id '../../etc'" in log
    assert cluster.workers[name].alive()
    assert client.queue_depth(cluster.model) == 0


def test_secrets_never_reach_logs_records_metadata_or_task_args(cluster: Cluster, s3: S3Endpoint) -> None:
    name, _ = cluster.start_worker()
    client = cluster.client()
    record = client.wait(client.submit("secret check", width=128, height=128, num_inference_steps=2,
                                       num_images_per_prompt=2).id, timeout_s=60)
    cluster.assert_delivered_once(record)
    secrets = [s3.secret_key, s3.access_key, "cluster-pw-41c9"]
    raw = client.conn.hgetall(f"pixq:job:{record.id}")
    texts = {
        "worker log": cluster.log(name),
        "job record": json.dumps({k.decode(): v.decode() for k, v in raw.items()}),
        "record json": record.model_dump_json(),
        "queue messages": json.dumps([m.decode(errors="replace") for key in client.conn.scan_iter("*")
                                      if client.conn.type(key) == b"list" for m in client.conn.lrange(key, 0, -1)]),
        "celery task meta": json.dumps([client.conn.get(k).decode(errors="replace")  # type: ignore[union-attr]
                                        for k in client.conn.scan_iter("celery-task-meta-*")]),
    }
    for image in record.images:
        head = cluster.s3_client.head_object(Bucket=image.bucket, Key=image.key)  # type: ignore[attr-defined]
        texts[f"metadata {image.key}"] = json.dumps(head["Metadata"])
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into the {where}"
    assert "redis://:**@" in texts["worker log"] or "redis://:***@" in texts["worker log"]


# A worker whose store refuses its credentials no longer starts, nor fails jobs: tests/test_storage_faults.py.


def test_s3_stopped_mid_upload_and_started_again(cluster: Cluster, tmp_path: Path) -> None:
    from tests.services import restart_seaweedfs, s3_client_for, start_seaweedfs

    s3_svc, endpoint = start_seaweedfs(tmp_path / "own-s3", bucket="outage")
    try:
        env = {**endpoint.env()}
        name, _ = cluster.start_worker(**env)
        client = cluster.client(**env)
        job = client.submit("through an S3 outage", num_images_per_prompt=2, **LONG)
        running_on(client, job.id)
        s3_svc.stop()  # down before the render ends, so the upload meets a dead endpoint
        wait_for(lambda: "upload of image 0 failed" in cluster.log(name), 60, "a failed upload")
        assert client.status(job.id).state is JobState.running  # riding it out, not failed
        restart_seaweedfs(s3_svc)
        record = client.wait(job.id, timeout_s=120)
        assert record.state is JobState.succeeded and record.attempts == 1
        s3c = s3_client_for(endpoint)
        keys = [o["Key"] for o in s3c.list_objects_v2(Bucket="outage", Prefix=f"{cluster.env['PIXQ_S3_PREFIX']}/")
                .get("Contents", [])]
        assert sorted(keys) == sorted(i.key for i in record.images) and len(keys) == 2
        for image in record.images:
            body = s3c.get_object(Bucket="outage", Key=image.key)["Body"].read()
            assert len(body) == image.size_bytes
        s3c.close()
    finally:
        s3_svc.stop()
