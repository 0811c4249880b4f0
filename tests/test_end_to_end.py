"""The whole job path on real services: producer → Redis → Celery worker → PixArt-Σ → S3."""

from __future__ import annotations

import calendar
import io
import time

import numpy as np
import pytest
import redis
from PIL import Image
from pixq.client import Client
from pixq.errors import InvalidRequest, JobNotFound
from pixq.records import JobState

from tests.services import S3Endpoint, Service
from tests.support import wait_for, write_artifact


def observe(client: Client, job_id: str, timeout_s: float = 60) -> list[tuple[str, int]]:
    """Every (state, step) seen while polling the record quickly until it ends."""
    seen: list[tuple[str, int]] = []

    def ended() -> bool:
        r = client.status(job_id)
        if not seen or seen[-1] != (r.state.value, r.step):
            seen.append((r.state.value, r.step))
        return r.state.is_terminal

    wait_for(ended, timeout_s, f"job {job_id} to finish", poll_s=0.002)
    return seen


def test_job_goes_queued_running_succeeded_with_progress(client: Client, worker: Service, s3_client) -> None:
    # A long job first keeps the worker busy, so the second is seen waiting in the queue.
    blocker = client.submit("keep the worker busy", width=256, height=256, num_inference_steps=150, seed=1)
    job = client.submit("A small cactus with a happy face", width=384, height=256, num_inference_steps=40, seed=3)
    seen = observe(client, job.id)
    states = [s for s, _ in seen]
    assert states[0] == "queued"
    assert states[-1] == "succeeded"
    steps = [step for s, step in seen if s == "running"]
    assert any(0 < step < 40 for step in steps), seen  # progress was visible mid-render
    assert steps == sorted(steps)
    assert client.wait(blocker.id, timeout_s=60).state is JobState.succeeded

    record = client.status(job.id)
    assert record.attempts == 1 and record.worker == "cpu-main@test"
    assert record.started_at is not None and record.finished_at is not None
    assert record.created_at <= record.started_at <= record.finished_at
    assert record.step == record.total_steps == 40
    (image,) = record.images
    assert image.key == f"jobs/{job.id}/0.png"
    obj = s3_client.get_object(Bucket=image.bucket, Key=image.key)
    body = obj["Body"].read()
    assert obj["ContentType"] == "image/png" == image.content_type
    assert len(body) == image.size_bytes
    meta = obj["Metadata"]
    assert meta["seed"] == "3" and meta["steps"] == "40" and meta["width"] == "384" and meta["height"] == "256"
    assert meta["job-id"] == job.id and meta["guidance-scale"] == "4.5"
    assert meta["prompt"] == "A small cactus with a happy face"
    png = Image.open(io.BytesIO(body))
    assert png.format == "PNG" and png.size == (384, 256) and png.mode == "RGB"
    write_artifact("end-to-end.png", body)


def test_several_images_and_formats(client: Client, worker: Service, s3_client) -> None:
    job = client.submit("three of them", width=256, height=192, num_images_per_prompt=3, seed=100,
                        output_format="webp", num_inference_steps=5)
    record = client.wait(job.id, timeout_s=60)
    assert record.state is JobState.succeeded
    assert [i.seed for i in record.images] == [100, 101, 102]
    assert [i.key for i in record.images] == [f"jobs/{job.id}/{n}.webp" for n in range(3)]
    bodies = []
    for image in record.images:
        obj = s3_client.get_object(Bucket=image.bucket, Key=image.key)
        assert obj["ContentType"] == "image/webp"
        body = obj["Body"].read()
        assert Image.open(io.BytesIO(body)).size == (256, 192)
        bodies.append(body)
    assert len(set(bodies)) == 3  # each image its own seed

    jpeg = client.wait(client.submit("jpeg", width=128, height=128, output_format="jpeg",
                                     num_inference_steps=3).id, timeout_s=60)
    assert jpeg.images[0].key.endswith(".jpg") and jpeg.images[0].content_type == "image/jpeg"


def test_presigned_urls_default_to_an_hour_and_never_exceed_a_week(
    client: Client, worker: Service, s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    from urllib.parse import parse_qs, urlsplit

    for key, value in s3.env().items():  # the standard AWS chain, as a service would have it
        monkeypatch.setenv(key, value)
    record = client.wait(client.submit("url", width=128, height=128, num_inference_steps=2).id, timeout_s=60)
    query = parse_qs(urlsplit(client.presigned_url(record.id)).query)  # SigV4: X-Amz-Date + X-Amz-Expires
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Expires"] == ["3600"]
    signed_at = calendar.timegm(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
    assert abs(signed_at - time.time()) < 60
    with pytest.raises(InvalidRequest, match="expires_in_s"):
        client.presigned_url(record.id, expires_in_s=7 * 24 * 3600 + 1)
    with pytest.raises(InvalidRequest, match="index"):
        client.presigned_url(record.id, index=1)


def test_random_seed_is_recorded_and_a_seed_repeats_exactly(client: Client, worker: Service) -> None:
    drawn = client.wait(client.submit("seeded", width=128, height=128, num_inference_steps=4).id, timeout_s=60)
    assert drawn.request.seed >= 0 and drawn.images[0].seed == drawn.request.seed
    again = client.wait(client.submit("seeded", width=128, height=128, num_inference_steps=4,
                                      seed=drawn.request.seed).id, timeout_s=60)
    assert again.images[0].sha256 == drawn.images[0].sha256  # identical bytes
    other = client.wait(client.submit("seeded", width=128, height=128, num_inference_steps=4,
                                      seed=drawn.request.seed + 1).id, timeout_s=60)
    assert other.images[0].sha256 != drawn.images[0].sha256


@pytest.mark.parametrize("binning", [True, False], ids=["binned", "native"])
def test_image_from_the_queue_equals_a_direct_pipeline_call(
    client: Client, worker: Service, s3_client, tiny_model: str, binning: bool
) -> None:
    import torch
    from diffusers import PixArtSigmaPipeline

    # 400x208 is no trained bin: binned, it renders at 336x176 and is resized; native, at 400x208.
    params = dict(prompt="A watercolor lighthouse at sunset", negative_prompt="blurry", num_inference_steps=12,
                  guidance_scale=4.5, width=400, height=208, use_resolution_binning=binning)
    record = client.wait(client.submit(seed=1234, **params).id, timeout_s=60)
    assert record.request.use_resolution_binning is binning
    # The record says what the model rendered: the 336x176 bin resized, or 400x208 itself.
    assert record.render is not None
    rendered = (record.render.width, record.render.height, record.render.resized)
    assert rendered == ((336, 176, True) if binning else (400, 208, False))
    assert record.render.transformer_rows_per_image == 2 * 12 and record.render.difference_from_exact is None
    body = s3_client.get_object(Bucket=record.images[0].bucket, Key=record.images[0].key)["Body"].read()
    queued = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.int16)

    pipe = PixArtSigmaPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    direct = pipe(**params, generator=torch.Generator("cpu").manual_seed(1234)).images[0]
    reference = np.asarray(direct.convert("RGB"), dtype=np.int16)
    assert queued.shape == reference.shape == (208, 400, 3)
    assert np.abs(queued - reference).max() <= 1


def test_the_first_mode_warms_up_before_serving_and_the_others_while_serving(
    client: Client, worker: Service
) -> None:
    record = client.wait(client.submit("a fox", width=128, height=128, mode="fast").id, timeout_s=60)
    assert record.state.value == "succeeded" and record.render is not None
    # Fast mode's default plan: 18 transformer rows per image instead of 40, and its measured difference.
    assert record.render.mode.value == "fast" and record.render.transformer_rows_per_image == 18
    assert "dB" in (record.render.difference_from_exact or "")
    wait_for(lambda: "warm-up done" in worker.log_path.read_text(), 60, "the deferred warm-up")
    log = worker.log_path.read_text()
    marks = ("warm-up 128x128 exact", "cpu-main@test ready", "warm-up 128x128 fast")
    exact, ready, fast = (log.index(mark) for mark in marks)
    assert exact < ready < fast


def test_invalid_requests_reach_nothing(client: Client, raw_redis: redis.Redis, tiny_model: str) -> None:
    def footprint() -> tuple[int, int]:
        return len(list(raw_redis.scan_iter("pixq:job:*"))), client.queue_depth(tiny_model)

    before = footprint()
    for fields in (
        {"prompt": ""},
        {"prompt": "x", "width": 1001},
        {"prompt": "x", "height": 4096},
        {"prompt": "x", "num_inference_steps": 0},
        {"prompt": "x", "num_inference_steps": 100_000},
        {"prompt": "x", "guidance_scale": -1.0},
        {"prompt": "x", "num_images_per_prompt": 50},
        {"prompt": "x", "model_name": "nobody/knows-this"},
        {"prompt": "x", "width": "wide"},
        {"prompt": "x", "colour": "red"},
    ):
        with pytest.raises(InvalidRequest):
            client.submit(**fields)
    assert footprint() == before


def test_unknown_job_reads_as_unknown(client: Client) -> None:
    with pytest.raises(JobNotFound, match="no job 'does-not-exist'"):
        client.status("does-not-exist")
    with pytest.raises(JobNotFound):
        client.cancel("does-not-exist")


def test_job_for_a_model_no_worker_serves_stays_queued(
    client: Client, worker: Service, raw_redis: redis.Redis
) -> None:
    orphan_model = "/models/served-by-nobody"
    orphan = client.submit("nobody renders me", model_name=orphan_model, width=128, height=128)
    served = client.submit("rendered", width=128, height=128, num_inference_steps=3)
    assert client.wait(served.id, timeout_s=60).state is JobState.succeeded
    time.sleep(0.5)  # a check that nothing happens: no condition to wait for
    record = client.status(orphan.id)
    assert record.state is JobState.queued and record.attempts == 0 and record.worker is None
    assert client.queue_depth(orphan_model) == 1
    client.cancel(orphan.id)  # leave nothing behind for other tests


def test_cancel_a_queued_job_before_it_starts(
    client: Client, worker: Service, s3_client, raw_redis: redis.Redis
) -> None:
    blocker = client.submit("busy", width=256, height=256, num_inference_steps=120)
    victim = client.submit("never rendered", width=128, height=128, num_inference_steps=3)
    assert client.cancel(victim.id).state is JobState.canceled
    client.wait(blocker.id, timeout_s=60)

    def victim_message_handled() -> bool:  # taken from the queue and acknowledged by the worker
        unacked = " ".join(str(m) for m in raw_redis.hvals("unacked"))
        return client.queue_depth(client.settings.model) == 0 and victim.id not in unacked

    wait_for(victim_message_handled, 30, "the worker to handle the canceled job's message")
    record = client.status(victim.id)
    assert record.state is JobState.canceled and record.attempts == 0 and record.images == []
    listing = s3_client.list_objects_v2(Bucket="pixq-test", Prefix=f"jobs/{victim.id}/")
    assert listing.get("KeyCount", 0) == 0


def test_cancel_a_running_job_stops_it_within_a_step(client: Client, worker: Service, s3_client) -> None:
    job = client.submit("long one", width=256, height=256, num_inference_steps=200)
    wait_for(lambda: client.status(job.id).step >= 3, 30, "the long job to render", poll_s=0.01)
    client.cancel(job.id)
    record = client.wait(job.id, timeout_s=30)
    assert record.state is JobState.canceled
    assert record.step < 200 and record.images == []
    listing = s3_client.list_objects_v2(Bucket="pixq-test", Prefix=f"jobs/{job.id}/")
    assert listing.get("KeyCount", 0) == 0
    # The worker serves the next job.
    assert client.wait(client.submit("after cancel", width=128, height=128, num_inference_steps=2).id,
                       timeout_s=60).state is JobState.succeeded


@pytest.mark.slow
def test_a_job_waiting_at_start_runs_before_the_deferred_warm_up(
    env: dict[str, str], settings, tiny_model: str, tmp_path
) -> None:
    """A GPU run found the fast-mode warm-up taking the GPU ahead of a job already queued (+9 s on the
    first job); the deferred warm-up waits until the worker is idle."""
    import shutil

    from tests.services import start_worker

    model = str(shutil.copytree(tiny_model, tmp_path / "model"))  # its own queue: no other worker takes it
    c = Client(settings)
    try:
        job = c.submit("a lighthouse", model_name=model, width=128, height=128)
        svc = start_worker(env, model, tmp_path / "worker.log", name="cpu-warm@test", extra=("--warmup", "128x128"))
        try:
            assert c.wait(job.id, timeout_s=60).state.value == "succeeded"
            wait_for(lambda: "warm-up done" in svc.log_path.read_text(), 60, "the deferred warm-up")
            log = svc.log_path.read_text()
            assert log.index(f"job {job.id}: succeeded") < log.index("warm-up 128x128 fast"), svc.log_tail(30)
        finally:
            svc.stop()
    finally:
        c.close()
