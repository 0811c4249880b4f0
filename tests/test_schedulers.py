"""Per-job samplers (issue 27): every sampler renders as diffusers' own pipeline does with that scheduler.

CPU, the tiny test model (random weights: images are deterministic noise, so any change shows). In process:
each sampler against the direct pipeline, the loaded pipeline's scheduler never stepped, stochastic samplers
reproducible alone and in a batch, batches of one sampler only, no compile for a new sampler. Real worker
processes: jobs of every sampler at once on one worker, batched, each equal to the direct pipeline.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pixq.records import JobRecord, JobState
from pixq.schema import JobRequest, Scheduler

from tests.services import S3Endpoint, Service, start_worker
from tests.support import stack_env, wait_for

STOCHASTIC = (Scheduler.sa_solver, Scheduler.euler_ancestral)
PROMPT = "A small cactus with a happy face in the Sahara desert."


def diffusers_scheduler(name: Scheduler, config: Any) -> Any:
    """The scheduler a diffusers user builds for ``name`` from the checkpoint's config, spelled out here
    (not taken from the worker) so that the test checks the worker's mapping."""
    import diffusers

    if name is Scheduler.sa_solver:  # PixArt-sigma app/app_pixart_sigma.py, verbatim values
        return diffusers.SASolverScheduler.from_config(
            config, algorithm_type="data_prediction", tau_func=lambda t: 1 if 200 <= t <= 800 else 0,
            predictor_order=2, corrector_order=2)
    if name is Scheduler.ddim:
        return diffusers.DDIMScheduler.from_config(config, clip_sample=False, timestep_spacing="trailing")
    cls = {Scheduler.dpm_solver: diffusers.DPMSolverMultistepScheduler,
           Scheduler.unipc: diffusers.UniPCMultistepScheduler,
           Scheduler.euler: diffusers.EulerDiscreteScheduler,
           Scheduler.euler_ancestral: diffusers.EulerAncestralDiscreteScheduler}[name]
    return cls.from_config(config)


@pytest.fixture(scope="module")
def direct() -> Callable[[JobRequest], np.ndarray]:
    """The model card's call of a freshly loaded diffusers pipeline of the request's model (no worker
    speed-ups) with the request's sampler and the job's seeds."""
    from diffusers import PixArtSigmaPipeline
    from pixq.worker.gpu.pipecall import generators

    pipes: dict[str, tuple[Any, Any]] = {}  # model -> (pipeline, the checkpoint's scheduler config)

    def run(request: JobRequest) -> np.ndarray:
        if request.model_name not in pipes:
            pipe = PixArtSigmaPipeline.from_pretrained(Path(request.model_name))
            pipe.set_progress_bar_config(disable=True)
            pipes[request.model_name] = (pipe, pipe.scheduler.config)
        pipe, config = pipes[request.model_name]
        pipe.scheduler = diffusers_scheduler(Scheduler(request.scheduler), config)
        images = pipe(prompt=request.prompt, negative_prompt=request.negative_prompt,
                      num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                      width=request.width, height=request.height, num_images_per_prompt=request.num_images_per_prompt,
                      use_resolution_binning=request.use_resolution_binning, generator=generators(request)).images
        return np.stack([np.asarray(i, dtype=np.int16) for i in images])

    return run


@pytest.fixture(scope="module")
def loaded(tiny_model: str) -> Any:
    from pixq.worker.gpu.pipeline import load_pipeline

    return load_pipeline(tiny_model, "cpu")


def _request(model: str, scheduler: Scheduler, **fields: Any) -> JobRequest:
    # Native 128²: a quarter of the tiny model's 256² bins, rendered as asked.
    base: dict[str, Any] = dict(prompt=PROMPT, seed=7, width=128, height=128, use_resolution_binning=False,
                                num_inference_steps=8, model_name=model, scheduler=scheduler)
    base.update(fields)
    return JobRequest.model_validate(base)


def _render(loaded: Any, request: JobRequest) -> np.ndarray:
    from pixq.worker.gpu.render import render

    return np.stack([np.asarray(i, dtype=np.int16) for i in render(loaded, request)])


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def _mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# -- in process ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", list(Scheduler), ids=[s.value for s in Scheduler])
def test_each_sampler_renders_as_the_direct_pipeline_with_that_scheduler(
    loaded: Any, direct: Any, tiny_model: str, scheduler: Scheduler
) -> None:
    request = _request(tiny_model, scheduler)
    got, own = _render(loaded, request), direct(request)
    assert _max_diff(got, own) <= 1
    if scheduler is not Scheduler.dpm_solver:  # it ran this sampler, not the default (UniPC's image is close to it)
        default = direct(_request(tiny_model, Scheduler.dpm_solver))
        assert _mean_diff(got, own) < _mean_diff(got, default) and not np.array_equal(got, default)


def test_the_loaded_pipelines_scheduler_is_never_stepped_or_replaced(loaded: Any, tiny_model: str) -> None:
    own = loaded.pipe.scheduler
    before = _render(loaded, _request(tiny_model, Scheduler.dpm_solver))
    for scheduler in (Scheduler.sa_solver, Scheduler.unipc, Scheduler.euler_ancestral):
        _render(loaded, _request(tiny_model, scheduler))
    assert loaded.pipe.scheduler is own and type(own).__name__ == "DPMSolverMultistepScheduler"
    assert own.step_index is None and all(o is None for o in own.model_outputs)  # no call ran on it
    assert np.array_equal(_render(loaded, _request(tiny_model, Scheduler.dpm_solver)), before)


@pytest.mark.parametrize("scheduler", STOCHASTIC, ids=[s.value for s in STOCHASTIC])
def test_stochastic_samplers_repeat_with_the_seed_alone_and_in_a_batch(
    loaded: Any, tiny_model: str, scheduler: Scheduler
) -> None:
    from pixq.worker.gpu.batch import render_batch

    job = _request(tiny_model, scheduler, seed=5, num_images_per_prompt=2)
    first = _render(loaded, job)
    assert np.array_equal(_render(loaded, job), first)  # same seed, same images
    assert _max_diff(first[0], first[1]) > 10  # image 1 draws its own noise (seed + 1)
    assert _max_diff(_render(loaded, job.model_copy(update={"seed": 6}))[0], first[0]) > 10
    # In a batch beside other jobs (their own seeds and prompts), each image keeps its noise.
    partners = [_request(tiny_model, scheduler, seed=40, prompt="A red cube on a blue sphere."),
                _request(tiny_model, scheduler, seed=41)]
    batched = render_batch(loaded, [partners[0], job, partners[1]])
    assert [len(b) for b in batched] == [1, 2, 1]
    got = np.stack([np.asarray(i, dtype=np.int16) for i in batched[1]])
    assert _max_diff(got, first) <= 1  # the batch invariance measured for the default (tests/test_batching.py)
    assert _max_diff(np.asarray(batched[2][0], dtype=np.int16), _render(loaded, partners[1])[0]) <= 1


def test_jobs_of_different_samplers_never_share_a_call(loaded: Any, tiny_model: str) -> None:
    from pixq.worker.gpu.batch import batch_key, render_batch

    keys = {batch_key(_request(tiny_model, s)) for s in Scheduler}
    assert len(keys) == len(Scheduler)
    with pytest.raises(ValueError, match="sampler"):
        render_batch(loaded, [_request(tiny_model, Scheduler.euler), _request(tiny_model, Scheduler.ddim)])


def test_render_info_names_the_sampler(loaded: Any, tiny_model: str) -> None:
    from pixq.worker.gpu.render import render_info

    request = _request(tiny_model, Scheduler.unipc)
    _render(loaded, request)
    assert render_info(loaded, request, 0.1).scheduler is Scheduler.unipc


def test_every_sampler_hands_the_transformer_float32_timesteps(loaded: Any, tiny_model: str) -> None:
    """One input signature for the compiled graphs whatever the sampler (Euler's timesteps are float32 between
    the trained ones, the others' int64)."""
    seen: set[tuple[str, tuple[int, ...], int]] = set()

    def record(_module: Any, args: Any) -> None:
        t = args[0]
        seen.add((str(t.dtype), tuple(t.stride()), t.storage_offset()))

    # The transformer's first use of its timestep input (the pipeline's own call is seen before the router).
    handle = loaded.pipe.transformer.adaln_single.register_forward_pre_hook(record)
    try:
        for scheduler in Scheduler:
            _render(loaded, _request(tiny_model, scheduler, num_inference_steps=3))
    finally:
        handle.remove()
    assert seen == {("torch.float32", (1,), 0)}, seen


@pytest.mark.slow
def test_a_new_sampler_compiles_nothing(tiny_model: str) -> None:
    """The recompile guard of tests/test_batching.py: after the default sampler's first job compiled the
    transformer's graph, a job of every other sampler runs that graph and compiles no other (checked before
    the worker serves, when a failed guard would compile rather than run eager)."""
    import torch._dynamo
    from pixq.worker.gpu.pipeline import PipelineOptions, load_pipeline
    from pixq.worker.gpu.speedups import SpeedupOptions
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # as in a fresh worker process (dynamo's per-code cache limit)
    compiled = load_pipeline(tiny_model, options=PipelineOptions(
        speedups=SpeedupOptions(compile=True, compile_vae=False)))
    speedups = compiled.speedups
    assert speedups is not None
    _render(compiled, _request(tiny_model, Scheduler.dpm_solver, num_inference_steps=3))
    counters.clear()
    for scheduler in Scheduler:
        request = _request(tiny_model, scheduler, num_inference_steps=3)
        image = _render(compiled, request)
        with speedups.eager():
            assert _max_diff(image, _render(compiled, request)) <= 2  # the compile tolerance
    assert counters["stats"].get("unique_graphs", 0) == 0, dict(counters["stats"])
    assert speedups.gate.eager_calls == 0


# -- real worker processes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampler_worker(redis_url: str, s3: S3Endpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[dict[str, str], str]]:
    """A worker batching up to 4 images per call, on its own copy of the tiny model (its own queue: the
    session's worker never takes these jobs)."""
    from pixq.worker.gpu.testmodel import make_test_model

    model = str(make_test_model(tmp_path_factory.mktemp("sampler-model")).resolve())
    env = stack_env(redis_url, s3, model)
    svc: Service = start_worker(env, model, tmp_path_factory.mktemp("sampler-worker") / "worker.log",
                                name="samplers@test", extra=("--max-batch", "4"))
    yield env, model
    svc.stop()


def _done(client: Any, job_ids: list[str], timeout_s: float = 180) -> list[JobRecord]:
    return wait_for(lambda: (rs := [client.status(j) for j in job_ids]) and all(r.state.is_terminal for r in rs)
                    and rs, timeout_s, "jobs to end")


def _stored(s3_client: Any, env: dict[str, str], record: JobRecord) -> np.ndarray:
    images = []
    for image in record.images:
        body = s3_client.get_object(Bucket=env["PIXQ_S3_BUCKET"], Key=image.key)["Body"].read()
        images.append(np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.int16))
    return np.stack(images)


@pytest.mark.slow
def test_jobs_of_every_sampler_at_once_on_one_worker_render_as_the_direct_pipeline(
    sampler_worker: tuple[dict[str, str], str], s3_client: Any, direct: Any
) -> None:
    """Concurrent jobs of all samplers, two of each, queued behind a long job so that they wait together:
    same-sampler jobs share calls, no call mixes samplers, every image equals the direct diffusers pipeline
    with its sampler and seed, each record names its sampler, and a stochastic sampler's batched job
    repeats alone."""
    from pixq.client import Client
    from pixq.settings import Settings

    env, model = sampler_worker
    client = Client(Settings.from_env(env))
    try:
        blocker = client.submit("busy", width=384, height=384, num_inference_steps=200, seed=1)
        wait_for(lambda: client.status(blocker.id).step >= 1, 60, "the blocker to start")
        fields: dict[str, Any] = dict(width=256, height=256, num_inference_steps=8)
        jobs = [client.submit(f"{PROMPT} Job {i}.", seed=20 + i, scheduler=scheduler.value, **fields)
                for i, scheduler in enumerate(s for s in Scheduler for _ in range(2))]
        records = _done(client, [blocker.id] + [j.id for j in jobs])[1:]
        calls: dict[str, set[str]] = {}
        for record in records:
            assert record.state is JobState.succeeded and record.render is not None, record.error
            assert record.render.scheduler is record.request.scheduler  # the record says which sampler ran
            assert record.render.batch_id is not None
            calls.setdefault(record.render.batch_id, set()).add(record.request.scheduler.value)
            assert record.request.model_name == model
            assert _max_diff(_stored(s3_client, env, record), direct(record.request)) <= 1, record.request.scheduler
        assert all(len(samplers) == 1 for samplers in calls.values()), calls
        assert any(r.render is not None and r.render.batch_jobs > 1 for r in records)  # same samplers did batch
        for record in records:
            if record.request.scheduler in STOCHASTIC and record.render is not None and record.render.batch_jobs > 1:
                again = _done(client, [client.submit(record.request.prompt, seed=record.request.seed,
                                                     scheduler=record.request.scheduler.value, **fields).id])[0]
                assert again.render is not None and again.render.batch_jobs == 1
                assert _max_diff(_stored(s3_client, env, again), _stored(s3_client, env, record)) <= 1
    finally:
        client.close()
