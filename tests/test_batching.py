"""Micro-batching (issue 13): compatible waiting jobs share one pipeline call, each job stays itself.

In-process: the batched call against each job alone on the tiny model. Real worker processes: a
batch of 4 gives 4 records and 4 objects equal to each job alone, a job canceled inside a running
batch ends canceled alone, kill -9 mid-batch re-runs every job of it once, incompatible jobs never
share a call, priorities hold, and a lone job starts at once.
"""

from __future__ import annotations

import io
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pixq.client import Client
from pixq.records import JobRecord, JobState
from pixq.schema import JobRequest
from pixq.worker.gpu.batch import BatchPolicy, batch_key, render_batch
from pixq.worker.gpu.pipeline import PipelineOptions, load_pipeline
from pixq.worker.gpu.render import render

from tests.fixtures.cluster import Cluster
from tests.services import Service, start_worker
from tests.support import wait_for

SMALL = dict(width=128, height=128, num_inference_steps=6)
BLOCKER = dict(width=384, height=384, num_inference_steps=200)  # keeps the GPU busy while others queue


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(_pixels(a) - _pixels(b)).max())


def test_batched_images_equal_each_job_alone(tiny_model: str) -> None:
    loaded = load_pipeline(tiny_model)
    requests = [JobRequest.model_validate({"prompt": f"job {i} " + "long words " * (3 * i), "seed": 10 + i,
                                           "model_name": tiny_model, "num_images_per_prompt": 1 + (i == 1),
                                           **SMALL}) for i in range(4)]
    alone = [render(loaded, r) for r in requests]
    batched = render_batch(loaded, requests)
    assert [len(b) for b in batched] == [1, 2, 1, 1]
    diffs = [_max_diff(a, b) for one, many in zip(alone, batched, strict=True) for a, b in zip(one, many, strict=True)]
    assert max(diffs) <= 1, diffs
    # Each job is itself: the two images of job 1 and the images of different jobs differ.
    assert _max_diff(batched[1][0], batched[1][1]) > 10 and _max_diff(batched[0][0], batched[2][0]) > 10


def test_incompatible_jobs_are_refused_one_call(tiny_model: str) -> None:
    base = {"prompt": "a", "model_name": tiny_model, **SMALL}
    one = JobRequest.model_validate(base)
    for change in ({"num_inference_steps": 7}, {"width": 136}, {"guidance_scale": 2.0}, {"mode": "fast"},
                   {"output_format": "webp"}, {"use_resolution_binning": False}, {"scheduler": "euler"}):
        other = JobRequest.model_validate({**base, **change})
        assert batch_key(other) != batch_key(one), change
        with pytest.raises(ValueError, match="must agree"):
            render_batch(load_pipeline(tiny_model), [one, other])
    # Prompt, seed, priority, image count and negative prompt may differ.
    same = JobRequest.model_validate({**base, "prompt": "b", "seed": 3, "priority": 5, "num_images_per_prompt": 2,
                                      "negative_prompt": "blur"})
    assert batch_key(same) == batch_key(one)


def test_batch_sizes_by_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    import pixq.worker.gpu.batch as batch

    policy = BatchPolicy()
    assert policy.limit(512, 512) == 8 and policy.limit(1024, 1024) == 1  # measured default (docs/performance.md)
    assert BatchPolicy(max_batch=3).limit(1024, 1024) == 3
    assert BatchPolicy(max_batch=2).largest() == 2
    assert BatchPolicy(by_size=False).limit(512, 512) == 1  # on a CPU: one image per call unless told
    # Binned jobs render at the model's trained size, whatever they asked for: a 512² job on the 1024
    # checkpoint renders 1024² (one per call), a 768×512 job on the 512 checkpoint about 512² (batched).
    assert policy.for_model(128).limit(512, 512, binned=True) == 1
    assert policy.for_model(128).limit(512, 512, binned=False) == 8
    assert policy.for_model(64).limit(768, 512, binned=True) == 8
    monkeypatch.setattr(batch, "DEFAULT_MAX_BATCH", ((512 * 512, 8), (768 * 768, 4)))  # a per-size table
    assert policy.limit(512, 512) == 8 and policy.limit(768, 512) == 4 and policy.limit(1024, 1024) == 1
    assert policy.for_model(64).largest() == 8 and policy.for_model(128).largest() == 1


# -- real worker processes --------------------------------------------------------------------


def _worker(cluster: Cluster, max_batch: int = 4) -> tuple[str, Service]:
    name = f"b{next(cluster.names)}@test"
    svc = start_worker(cluster.env, cluster.model, cluster.root / f"{name}.log", name=name,
                       extra=("--max-batch", str(max_batch)))
    cluster.workers[name] = svc
    return name, svc


def _image(cluster: Cluster, key: str) -> Image.Image:
    body = cluster.s3_client.get_object(Bucket=cluster.env["PIXQ_S3_BUCKET"], Key=key)["Body"].read()  # type: ignore[attr-defined]
    return Image.open(io.BytesIO(body))


def _done(client: Client, job_ids: list[str], timeout_s: float = 120) -> list[JobRecord]:
    return wait_for(lambda: (rs := [client.status(j) for j in job_ids]) and all(r.state.is_terminal for r in rs)
                    and rs, timeout_s, "jobs to end")


def _wait_batch(client: Client, job_ids: list[str], size: int, min_step: int = 2) -> None:
    """Until every job renders in a call of ``size`` images, at ``min_step`` or later."""
    wait_for(lambda: all((r := client.status(j)).state is JobState.running and r.batch == size and r.step >= min_step
                         for j in job_ids), 60, f"jobs to render in a batch of {size}")


@pytest.mark.slow
def test_four_waiting_jobs_render_in_one_call_each_as_alone(cluster: Cluster) -> None:
    _worker(cluster)
    client = cluster.client()
    blocker = client.submit("busy", **BLOCKER)
    wait_for(lambda: client.status(blocker.id).step >= 1, 60, "the blocker to start")
    jobs = [client.submit(f"batch job {i}", seed=100 + i, **SMALL) for i in range(4)]
    records = _done(client, [blocker.id] + [j.id for j in jobs])[1:]
    for r in records:
        cluster.assert_delivered_once(r)
        assert r.render is not None and r.render.batch_jobs == 4 and r.render.batch_images == 4, r.render
    assert len({r.render.batch_id for r in records if r.render}) == 1
    # The same jobs again, one at a time on the idle worker: each alone in its call, same pixels.
    for r in records:
        again = _done(client, [client.submit(r.request.prompt, seed=r.request.seed, **SMALL).id])[0]
        assert again.render is not None and again.render.batch_jobs == 1
        assert _max_diff(_image(cluster, r.images[0].key), _image(cluster, again.images[0].key)) <= 1


@pytest.mark.slow
def test_a_job_canceled_inside_a_running_batch_ends_alone(cluster: Cluster) -> None:
    _worker(cluster)
    client = cluster.client()
    blocker = client.submit("busy", **BLOCKER)
    wait_for(lambda: client.status(blocker.id).step >= 1, 60, "the blocker to start")
    jobs = [client.submit(f"cancel batch {i}", seed=i, width=256, height=256, num_inference_steps=200)
            for i in range(3)]
    _wait_batch(client, [j.id for j in jobs], 3)
    client.cancel(jobs[1].id)
    canceled = wait_for(lambda: (r := client.status(jobs[1].id)).state.is_terminal and r, 30, "the cancel")
    others = [client.status(j.id) for j in (jobs[0], jobs[2])]
    assert canceled.state is JobState.canceled and canceled.images == [] and cluster.objects(jobs[1].id) == []
    assert all(r.state is JobState.running for r in others)  # it left at once; the call goes on
    records = _done(client, [j.id for j in jobs])
    assert records[1].state is JobState.canceled and cluster.objects(jobs[1].id) == []
    for r in (records[0], records[2]):
        cluster.assert_delivered_once(r)
        assert r.render is not None and r.render.batch_jobs == 3


@pytest.mark.slow
def test_kill_9_mid_batch_reruns_every_job_of_it_once(cluster: Cluster) -> None:
    victim, svc = _worker(cluster)
    client = cluster.client()
    blocker = client.submit("busy", width=256, height=256, num_inference_steps=60)
    wait_for(lambda: client.status(blocker.id).step >= 1, 60, "the blocker to start")
    jobs = [client.submit(f"killed batch {i}", seed=i, width=256, height=256, num_inference_steps=200)
            for i in range(3)]
    _wait_batch(client, [j.id for j in jobs], 3)
    svc.signal(signal.SIGKILL)
    _worker(cluster)
    records = _done(client, [j.id for j in jobs], timeout_s=180)
    for r in records:
        cluster.assert_delivered_once(r)  # 0 lost, one object per image
        assert r.attempts == 2 and r.worker != victim, r


@pytest.mark.slow
def test_incompatible_jobs_never_share_a_call_and_priorities_hold(cluster: Cluster) -> None:
    _worker(cluster, max_batch=8)  # 16 job threads: every job below waits in the worker
    client = cluster.client()
    blocker = client.submit("busy", **BLOCKER)
    wait_for(lambda: client.status(blocker.id).step >= 1, 60, "the blocker to start")
    kinds: list[dict[str, Any]] = [SMALL, {**SMALL, "num_inference_steps": 5}, {**SMALL, "width": 136},
                                   {**SMALL, "mode": "fast"}]
    low = [client.submit(f"mixed {i}", seed=i, **kinds[i % len(kinds)]) for i in range(8)]
    urgent = client.submit("urgent", priority=9, width=136, height=136, num_inference_steps=6)
    records = _done(client, [j.id for j in low] + [urgent.id, blocker.id])
    by_call: dict[str, list[JobRecord]] = {}
    for r in records[:-1]:
        assert r.state is JobState.succeeded and r.render is not None and r.render.batch_id is not None
        by_call.setdefault(r.render.batch_id, []).append(r)
    for members in by_call.values():
        assert len({batch_key(r.request) for r in members}) == 1, [r.request for r in members]
        assert all(r.render is not None and r.render.batch_jobs == len(members) for r in members)
    assert max(len(m) for m in by_call.values()) > 1  # compatible ones did batch
    first_low = min(r.finished_at or 0 for r in records[:-2])
    assert (records[-2].finished_at or 0) < first_low  # the urgent job went first, alone in its kind


@pytest.mark.slow
def test_a_lone_job_starts_at_once(cluster: Cluster) -> None:
    _worker(cluster)
    client = cluster.client()
    _done(client, [client.submit("warm", **SMALL).id])
    started = time.monotonic()
    record = _done(client, [client.submit("lone", **SMALL).id])[0]
    took = time.monotonic() - started
    assert record.state is JobState.succeeded and record.render is not None and record.render.batch_jobs == 1
    # Not held for partners: the whole job within its render plus the queue's own overhead.
    assert took < record.render.render_s + 3.0, (took, record.render)


def test_worker_threads_follow_the_batch_size(tmp_path: Path) -> None:
    from pixq.worker.ops.options import WorkerOptions

    def threads(sample_size: int, **kw: object) -> int:
        options = WorkerOptions(model="/x", **kw)  # type: ignore[arg-type]
        return options.job_threads(options.batch_policy().for_model(sample_size))

    assert threads(64, device="cuda:0") == 16  # the 512 checkpoint on a GPU: batches of 8 by default
    assert threads(128, device="cuda:0") == 2  # the 1024 one: one image per call
    assert threads(64) == 2  # on the CPU: one per call unless told
    assert threads(64, max_batch=8) == 16 and threads(128, max_batch=1) == 2 and threads(32, max_batch=4) == 8


@pytest.mark.slow
def test_compile_batches_compiles_the_full_batch_only(tiny_model: str) -> None:
    """With ``compile_batches`` the policy's full batch runs a static compiled graph (within compile tolerance
    of eager), built by its first call; a smaller batch runs eager and nothing compiles after."""
    from pixq.worker.gpu.speedups import SpeedupOptions
    from torch._dynamo.utils import counters

    loaded = load_pipeline(tiny_model, options=PipelineOptions(
        speedups=SpeedupOptions(compile=True, compile_vae=False, compile_batches=True), batch=BatchPolicy(max_batch=4)))
    assert loaded.speedups is not None and loaded.speedups.router.batch_images == 4

    def requests(n: int) -> list[JobRequest]:
        return [JobRequest.model_validate({"prompt": f"graph {i}", "seed": i, "model_name": tiny_model,
                                           **{**SMALL, "num_inference_steps": 3}}) for i in range(n)]

    render_batch(loaded, requests(4))  # the full batch: compiles its graph (8 rows, guided)
    counters.clear()
    before = loaded.speedups.router.batched_eager_calls
    for n in (4, 3):
        batch = requests(n)
        with loaded.speedups.eager():
            eager = render_batch(loaded, batch)
        compiled = render_batch(loaded, batch)
        assert max(_max_diff(a[0], b[0]) for a, b in zip(eager, compiled, strict=True)) <= 2
    assert counters["stats"].get("unique_graphs", 0) == 0, dict(counters["stats"])  # no new graph
    assert loaded.speedups.router.batched_eager_calls - before == 3  # the batch of 3 only: eager, 3 steps


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_batches_run_eager_beside_compiled_single_images_by_default(tiny_model: str, scope: str) -> None:
    """By default a compiled worker compiles nothing for a batch: its calls of several images run the eager
    transformer (the same pixels as eager), while one image still runs its compiled graph."""
    from pixq.worker.gpu.speedups import SpeedupOptions
    from torch._dynamo.utils import counters

    loaded = load_pipeline(tiny_model, options=PipelineOptions(
        speedups=SpeedupOptions(compile=True, compile_scope=scope, compile_vae=False)))
    assert loaded.speedups is not None
    one = JobRequest.model_validate({"prompt": "graph one", "seed": 1, "model_name": tiny_model,
                                     **{**SMALL, "num_inference_steps": 3}})
    render_batch(loaded, [one])  # one image: compiles its graph
    counters.clear()
    batch = [one.model_copy(update={"prompt": f"graph {i}", "seed": i}) for i in range(4)]
    with loaded.speedups.eager():
        eager = render_batch(loaded, batch)
    batched = render_batch(loaded, batch)
    assert counters["stats"].get("unique_graphs", 0) == 0, dict(counters["stats"])  # nothing compiled
    assert max(_max_diff(a[0], b[0]) for a, b in zip(eager, batched, strict=True)) == 0  # the eager forward
    assert loaded.speedups.router.batched_eager_calls == 3  # one call of 8 rows (4 images, guided) per step


def test_a_serving_worker_never_recompiles_a_seen_shape() -> None:
    """Once serving, a compiled call whose shape was seen but whose inputs fail another guard (here the
    dtype) runs eager instead of compiling in front of the job (dynamo's eager_on_recompile stance)."""
    import torch
    from pixq.worker.gpu.compile import compile_fn
    from pixq.worker.gpu.routing import CompileGate, ShapeRouter
    from torch._dynamo.utils import counters

    def forward(hidden_states: torch.Tensor, **kw: object) -> torch.Tensor:
        return torch.sin(hidden_states) * 2

    gate = CompileGate()
    router = ShapeRouter(forward, compile_fn(forward, "default"), gate)
    router(torch.ones(2, 4, 8, 8))  # before serving: compiles this shape
    gate.serving = True
    counters.clear()
    x = torch.full((2, 4, 8, 8), 0.5, dtype=torch.float64)  # seen shape, another dtype: a guard fails
    assert torch.equal(router(x), forward(x))
    assert counters["stats"].get("unique_graphs", 0) == 0, dict(counters["stats"])
    with gate.warming():  # the deferred warm-up may compile it
        router(x)
    assert counters["stats"].get("unique_graphs", 0) == 1, dict(counters["stats"])
