"""A worker that cannot write to its storage (issue 23, item 2), against real SeaweedFS, Redis and workers.

At start it refuses (one line, exit 8) instead of reporting ready; when the store goes away while it serves,
the job goes back to the queue (not failed), the worker stops taking jobs and says why (``/readyz``, presence
record, ready file), probes the store, and takes the job again once it answers, storing one set of images.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from pixq.client import Client
from pixq.errors import StorageUnavailable
from pixq.records import JobState
from pixq.schema import JobRequest
from pixq.settings import Settings
from pixq.wire import WORKER_KEY_PREFIX
from pixq.worker.jobs.storage import PROBE_FOLDER, Storage
from pixq.worker.jobs.storagewatch import StorageWatch

from tests.services import (
    S3Endpoint,
    Service,
    free_port,
    pixq_argv,
    restart_seaweedfs,
    s3_client_for,
    start_redis,
    start_seaweedfs,
    start_worker,
)
from tests.support import stack_env, wait_for

# -- at start -------------------------------------------------------------------------------------


def _refused_start(env: dict[str, str], *args: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    ready = tmp_path / "ready"
    done = subprocess.run(pixq_argv("worker", *args, "--ready-file", str(ready)), env=env, capture_output=True,
                          text=True, timeout=60)
    return done, ready


@pytest.mark.parametrize("case", ["missing bucket", "wrong secret", "unreachable endpoint"])
def test_a_worker_that_cannot_write_to_its_storage_refuses_to_start(
        case: str, redis_url: str, s3: S3Endpoint, tiny_model: str, tmp_path: Path) -> None:
    override, said = {
        "missing bucket": ({"PIXQ_S3_BUCKET": "no-such-bucket"}, "NoSuchBucket"),
        "wrong secret": ({"AWS_SECRET_ACCESS_KEY": "not-the-secret-9c2e"}, "SignatureDoesNotMatch"),
        "unreachable endpoint": ({"PIXQ_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}, "EndpointConnection"),
    }[case]
    env = stack_env(redis_url, s3, tiny_model, **override)
    name = f"refused-{uuid.uuid4().hex[:6]}@test"
    done, ready = _refused_start(env, "--model", tiny_model, "--name", name, tmp_path=tmp_path)
    assert done.returncode == StorageUnavailable.exit_code == 8, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr  # one line, no traceback, no log
    bucket = env["PIXQ_S3_BUCKET"]
    assert lines[0].startswith(f"error: cannot write and delete under s3://{bucket}/jobs/ at "), lines[0]
    assert said in lines[0] and lines[0].endswith("the worker did not start"), lines[0]
    assert "not-the-secret" not in done.stderr + done.stdout and s3.secret_key not in done.stderr
    assert not ready.exists()
    with redis.Redis.from_url(redis_url) as conn:
        assert conn.get(WORKER_KEY_PREFIX + name) is None  # never announced itself


def test_a_gpu_supervisor_refuses_to_start_before_it_starts_a_worker(
        redis_url: str, s3: S3Endpoint, tiny_model: str, tmp_path: Path) -> None:
    # CUDA_VISIBLE_DEVICES makes GPU 0 exist for the parent (it never touches CUDA); no child may start.
    env = stack_env(redis_url, s3, tiny_model, PIXQ_S3_BUCKET="no-such-bucket", CUDA_VISIBLE_DEVICES="0")
    done, ready = _refused_start(env, "--model", tiny_model, "--gpus", "0", tmp_path=tmp_path)
    assert done.returncode == StorageUnavailable.exit_code, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "NoSuchBucket" in lines[0] and "gpu0" not in done.stderr, done.stderr
    assert not ready.exists() and not list(tmp_path.glob("ready.gpu*"))


def test_a_second_upload_of_a_stored_image_keeps_the_first(settings: Settings, s3_client: Any) -> None:
    """What makes a job given back with some images stored safe to run again: the deterministic key is written
    once (If-None-Match), a later attempt's bytes are not stored and its record describes the stored object."""
    storage = Storage(settings, client=s3_client)
    request = JobRequest.model_validate({"prompt": "stored once", "width": 64, "height": 64})
    job_id = uuid.uuid4().hex
    first = storage.put_image(job_id, 0, b"first attempt's image", request, seed=1)
    again = storage.put_image(job_id, 0, b"second attempt's image, other bytes", request, seed=1)
    assert again == first and first.sha256 == hashlib.sha256(b"first attempt's image").hexdigest()
    body = s3_client.get_object(Bucket=first.bucket, Key=first.key)["Body"].read()
    assert body == b"first attempt's image"
    listed = s3_client.list_objects_v2(Bucket=first.bucket, Prefix=f"{settings.s3_prefix}/{job_id}/")["Contents"]
    assert [o["Key"] for o in listed] == [first.key]


def test_the_probe_writes_and_deletes_under_the_prefix(settings: Settings, s3: S3Endpoint, s3_client: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in s3.env().items():  # the credentials reach boto3 through the environment, as in a worker
        monkeypatch.setenv(var, value)
    storage = Storage(settings)  # its own clients, the probe's with a short timeout and one retry
    storage.probe()
    left = s3_client.list_objects_v2(Bucket=storage.bucket, Prefix=f"{storage.prefix}/{PROBE_FOLDER}/")
    assert left.get("KeyCount", 0) == 0  # nothing left behind


def test_the_watch_pauses_once_and_resumes_once_a_probe_passes() -> None:
    """The state machine alone (its probe a plain function here; the tests below probe a real SeaweedFS)."""
    answers = [False, False, False, True]  # the store: down (check), still down (a job's check, a probe), back
    events: list[str] = []

    def probe() -> None:
        if not answers.pop(0):
            raise StorageUnavailable("cannot write and delete under s3://b/p/: NoSuchBucket")

    watch = StorageWatch(probe, on_down=lambda why: events.append(f"down: {why}"),
                         on_up=lambda: events.append("up"), interval_s=0.05)
    try:
        assert watch.check() is False and watch.down is not None and "NoSuchBucket" in watch.down
        assert watch.check() is False  # another job's failed upload: still down, not paused twice
        wait_for(lambda: watch.down is None, 5, "a probe to pass")
        assert events == ["down: cannot write and delete under s3://b/p/: NoSuchBucket", "up"]
        assert answers == []
    finally:
        watch.stop()


# -- while serving --------------------------------------------------------------------------------


@dataclass
class Served:
    client: Client
    worker: Service
    s3_svc: Service
    endpoint: S3Endpoint
    s3: Any
    conn: redis.Redis
    metrics_port: int
    ready: Path
    name: str

    def readyz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=5) as answer:
                return answer.status, answer.read().decode().strip()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode().strip()

    def presence(self) -> dict[str, Any]:
        return dict(json.loads(self.conn.get(WORKER_KEY_PREFIX + self.name) or "{}"))

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as answer:
            return str(answer.read().decode())

    def keys(self, prefix: str) -> list[str]:
        listed = self.s3.list_objects_v2(Bucket=self.endpoint.bucket, Prefix=prefix)
        return sorted(o["Key"] for o in listed.get("Contents", []))

    def delete_bucket(self) -> None:
        for key in self.keys(""):
            self.s3.delete_object(Bucket=self.endpoint.bucket, Key=key)
        self.s3.delete_bucket(Bucket=self.endpoint.bucket)


@pytest.fixture()
def served(tmp_path: Path, tiny_model: str) -> Iterator[Served]:
    """A worker alone on its own Redis and its own SeaweedFS (this test deletes the bucket)."""
    s3_svc, endpoint = start_seaweedfs(tmp_path / "s3", bucket="faults")
    redis_svc, url = start_redis(tmp_path / "redis", password="faults-pw-2b7d")
    env = stack_env(url, endpoint, tiny_model)
    port = free_port()
    ready = tmp_path / "ready"
    name = "faults@test"
    svc = None
    client = Client(Settings.from_env(env))
    s3 = s3_client_for(endpoint)
    conn = redis.Redis.from_url(url)
    try:
        svc = start_worker(env, tiny_model, tmp_path / "worker.log", name=name,
                           extra=("--metrics-port", str(port), "--ready-file", str(ready)))
        yield Served(client, svc, s3_svc, endpoint, s3, conn, port, ready, name)
    finally:
        client.close()
        s3.close()
        conn.close()
        if svc is not None:
            svc.signal(signal.SIGKILL)
            svc.stop()
        redis_svc.stop()
        s3_svc.stop()


@pytest.mark.slow
def test_storage_gone_mid_serving_gives_the_job_back_pauses_and_resumes(served: Served) -> None:
    client = served.client
    wait_for(lambda: served.readyz() == (200, "ready"), 30, "the worker to be ready")
    assert served.ready.exists() and served.presence()["serving"] is True

    served.delete_bucket()  # as an operator's mistake, or a revoked grant: every write now refused
    job = client.submit("nowhere to store it", width=128, height=64, num_inference_steps=3, num_images_per_prompt=2)

    # Given back, an attempt counted, not failed.
    given = wait_for(lambda: (r := client.status(job.id)).attempts == 1 and r.state is JobState.queued and r,
                     60, "the job to be given back")
    assert given.error is None and given.images == [] and given.worker in ("", None)
    # The worker says it is not ready, and why, everywhere it says so.
    code, why = served.readyz()
    assert code == 503 and why.startswith("storage unavailable: cannot write and delete under s3://faults/jobs/")
    assert "NoSuchBucket" in why
    presence = served.presence()
    assert presence["serving"] is False and "NoSuchBucket" in presence["paused"]
    shown = next(w for r in client.queues() for w in r.workers if w.name == served.name)
    assert shown.paused is not None and "NoSuchBucket" in shown.paused  # pixq queue says so too
    assert not served.ready.exists()
    model = given.request.model_name
    assert f'pixq_jobs_total{{model="{model}",outcome="storage_unavailable"}} 1.0' in served.scrape()
    # ... and takes no job meanwhile: the message waits in Redis for any worker (checking that nothing happens).
    time.sleep(2.0)
    still = client.status(job.id)
    assert still.state is JobState.queued and still.attempts == 1
    assert client.queue_depth(model) == 1

    served.s3.create_bucket(Bucket=served.endpoint.bucket)  # storage answers again
    done = client.wait(job.id, timeout_s=60)
    assert done.state is JobState.succeeded and done.attempts == 2 and done.error is None
    assert [i.index for i in done.images] == [0, 1]
    prefix = f"jobs/{job.id}/"
    assert served.keys(prefix) == sorted(i.key for i in done.images)  # one set of images, nothing twice
    for image in done.images:
        body = served.s3.get_object(Bucket=image.bucket, Key=image.key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == image.sha256
    assert served.keys(f"jobs/{PROBE_FOLDER}/") == []  # probes clean up after themselves
    wait_for(lambda: served.readyz() == (200, "ready"), 10, "/readyz to say ready again")
    assert served.presence()["serving"] is True and "paused" not in served.presence()
    assert [w.paused for r in client.queues() for w in r.workers if w.name == served.name] == [None]
    assert served.ready.read_text().strip() == served.name
    # Serving as before.
    after = client.wait(client.submit("stored again", width=64, height=64, num_inference_steps=2).id, timeout_s=60)
    assert after.state is JobState.succeeded and after.attempts == 1
    assert served.worker.alive()


@pytest.mark.slow
def test_storage_stopped_mid_serving_pauses_the_worker_while_the_upload_rides_it_out(served: Served) -> None:
    """An outage, not a refusal: the rendered images wait for the store (the upload's retry budget) instead of
    going back, but the worker takes no other job meanwhile and says why; both jobs end with one set of images."""
    client = served.client
    wait_for(lambda: served.readyz() == (200, "ready"), 30, "the worker to be ready")
    served.s3_svc.stop()
    first = client.submit("through an outage", width=128, height=64, num_inference_steps=3)
    wait_for(lambda: served.readyz()[0] == 503, 60, "the worker to pause")
    code, why = served.readyz()
    assert why.startswith("storage unavailable: cannot write and delete under s3://faults/jobs/"), why
    assert served.presence()["serving"] is False and "storage unavailable" in served.presence()["paused"]
    assert not served.ready.exists()
    assert client.status(first.id).state is JobState.running  # its upload rides the outage out
    second = client.submit("waits for the store", width=64, height=64, num_inference_steps=2)
    time.sleep(2.0)  # checking that nothing happens: a paused worker does not take it
    assert client.status(second.id).state is JobState.queued and client.status(second.id).attempts == 0

    restart_seaweedfs(served.s3_svc)
    done = client.wait(first.id, timeout_s=120)
    assert done.state is JobState.succeeded and done.attempts == 1
    later = client.wait(second.id, timeout_s=60)
    assert later.state is JobState.succeeded and later.attempts == 1
    for record in (done, later):
        assert served.keys(f"jobs/{record.id}/") == sorted(i.key for i in record.images)
    wait_for(lambda: served.readyz() == (200, "ready"), 10, "/readyz to say ready again")
    assert served.presence()["serving"] is True and served.ready.exists()
