"""GPU throughput benchmark: the model card's plain pipeline vs the worker, in process and through the queue.

One run measures, on one device and on the same saved model:

card        the model card's plain ``PixArtSigmaPipeline`` (fp16, eager, batch 1): the reference
inprocess   ``pixq.worker.gpu.render`` on ``load_pipeline(...)`` with the levers (bf16, compile, warm-up, prompt
            cache, text trimming), exact and fast mode; the component breakdown; the output
            difference (card vs exact, exact vs fast) on fixed prompts and seeds; and the in-process
            job path (two threads, render under a lock, PNG encode and S3 put beside it)
queue       the same jobs end to end: real Redis, a real ``pixq worker`` started through the CLI, real
            SeaweedFS S3; cold start to the first finished job, streams, an idle single job
coldstart   a worker with an empty compile cache (cold start, cold cache)
twok        the 2K architecture (sample size 256, interpolation scale 4, VAE tiling) at 2048² and 4096²
offload     ``--offload`` (enable_model_cpu_offload) renders

    python -m benchmarks.bench --out OUT [--tiny] [--phases build,card,inprocess,queue] [--images 12]

``--tiny`` runs everything on the CPU with the tiny test model (to check the harness, not to time).
Results go to OUT/results.json after each phase; a table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.measure import (
    Timer,
    capture_vae_input,
    free_cuda,
    gpu_sampler,
    image_diff,
    latent_rel,
    peak_gib,
    reset_peak,
    summary,
    sync,
)

log = logging.getLogger("bench")

PROMPTS = [
    "A small cactus with a happy face in the Sahara desert.",
    "An astronaut riding a horse on the moon, photorealistic, 8k.",
    "A bowl of ramen with steam rising, studio lighting, top view.",
    "A watercolor painting of a lighthouse on a cliff at sunset, soft pastel colors, paper texture.",
    "Portrait of an old fisherman, dramatic light, film grain.",
    "A red cube on top of a blue sphere on a wooden table.",
    "A city street at night in the rain with neon reflections, cinematic, wide angle, shallow depth of field, "
    "people with umbrellas, taxis, steam from the manholes, reflections in puddles.",
    "A cozy cabin in a snowy forest, warm light in the windows.",
    "A macro photo of a dew drop on a leaf.",
    "An isometric illustration of a tiny island with a windmill, a harbour, boats, sheep and a lighthouse, "
    "clean vector style, bright colors.",
    "A golden retriever puppy playing in autumn leaves.",
    "A futuristic train crossing a desert canyon at dawn.",
    "A still life of lemons and a blue vase, oil painting.",
    "A knight in ornate armor standing in a misty forest.",
    "An aerial view of a coral reef with turquoise water.",
    "A steampunk owl made of brass gears, intricate detail, museum lighting, dark background.",
    "A bowl of fruit in the style of Cezanne.",
    "A robot barista making latte art in a busy cafe.",
    "Mount Fuji behind cherry blossoms, ukiyo-e woodblock print.",
    "A child's crayon drawing of a dragon.",
    "A glass of iced tea on a sunny balcony.",
    "An ancient library with towering shelves and floating candles.",
    "A hummingbird frozen mid flight, high speed photography.",
    "A minimalist poster of a single red balloon against a grey sky.",
]
GPU_MODEL = "/tmp/pixq-bench/model"  # on the device host's local disk
COMPILE_NONE = "none"


@dataclass
class Context:
    args: argparse.Namespace
    out: Path
    device: str
    size: int
    model_dir: Path
    results: dict[str, Any] = field(default_factory=dict)
    ref: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # fidelity index -> (latents, image)
    ref_t5: Any = None  # the card's (fp16) T5 output for prompt 0
    services: list[Any] = field(default_factory=list)
    env: dict[str, str] | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def tiny(self) -> bool:
        return bool(self.args.tiny)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=_jsonable))

    def request(self, index: int, mode: str = "exact", **extra: Any) -> Any:
        from pixq.schema import JobRequest

        fields: dict[str, Any] = dict(
            prompt=PROMPTS[index % len(PROMPTS)], seed=1000 + index, width=self.size, height=self.size,
            model_name=str(self.model_dir), mode=mode,
        )
        fields.update(extra)
        return JobRequest.model_validate(fields)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    return str(value)


# -- phases ---------------------------------------------------------------------------------------


def phase_build(ctx: Context) -> None:
    from benchmarks.fullsize import ensure_model

    _, info = ensure_model(ctx.model_dir, ctx.device, tiny=ctx.tiny)
    ctx.results["build"] = info


def phase_card(ctx: Context) -> None:
    """The model card's way: PixArtSigmaPipeline in fp16, .to(device), pipe(prompt)."""
    import numpy as np
    import torch
    from diffusers import PixArtSigmaPipeline

    from benchmarks.fullsize import parameter_counts

    dtype = torch.float16 if ctx.device.startswith("cuda") else torch.float32
    timer = Timer()
    pipe = PixArtSigmaPipeline.from_pretrained(ctx.model_dir, torch_dtype=dtype).to(ctx.device)
    pipe.set_progress_bar_config(disable=True)
    load_s = timer()

    def call(index: int, pipe: Any = pipe) -> Any:
        req = ctx.request(index)
        gen = torch.Generator("cpu").manual_seed(req.seed)
        return pipe(req.prompt, width=ctx.size, height=ctx.size, generator=gen).images[0]

    call(len(PROMPTS) - 1)  # warm-up: cuDNN/cuBLAS handles and kernel choice, as any long-lived process
    with torch.inference_mode():
        embeds, *_ = pipe.encode_prompt(ctx.request(0).prompt, do_classifier_free_guidance=False)
    ctx.ref_t5 = embeds.float().cpu()
    reset_peak(ctx.device)
    times = []
    for i in range(ctx.args.images):
        latents: list[Any] = []
        sync(ctx.device)
        t0 = time.perf_counter()
        with capture_vae_input(pipe, latents):
            image = call(i)
        times.append(time.perf_counter() - t0)
        if i < ctx.args.fidelity:
            ctx.ref[i] = (latents[-1], np.asarray(image))
    ctx.results["card"] = {
        "dtype": str(dtype), "load_s": load_s, **summary(times), "peak_gib": peak_gib(ctx.device),
        "params_m": parameter_counts(pipe),
        "nan_in_latents": any(bool(torch.isnan(r[0]).any()) for r in ctx.ref.values()),
    }
    del pipe
    free_cuda()


def _load(ctx: Context, compile_mode: str, **kwargs: Any) -> Any:
    from pixq.worker.gpu.pipeline import load_pipeline
    from pixq.worker.gpu.speedups import SpeedupOptions

    compiled = compile_mode != COMPILE_NONE
    options = SpeedupOptions(compile=compiled, compile_mode=compile_mode if compiled else "default",
                           compile_scope=ctx.args.compile_scope)
    return load_pipeline(
        str(ctx.model_dir), ctx.device, "auto", accel=options, compile_cache=str(ctx.args.compile_cache),
        warmup=[(ctx.size, ctx.size)], warmup_modes=("exact", "fast"), **kwargs,
    )


def _fresh_prompt_cache(loaded: Any) -> None:
    """A steady-state worker: the empty negative cached, these prompts not yet seen."""
    import torch
    from pixq.worker.gpu.textcache import PromptCache

    loaded.accel.cache = PromptCache(loaded.accel.options.prompt_cache)
    with torch.inference_mode():
        loaded.accel.encode("")


def _stream(ctx: Context, loaded: Any, mode: str, offset: int) -> dict[str, Any]:
    from pixq.worker.gpu.render import render

    _fresh_prompt_cache(loaded)
    reset_peak(ctx.device)
    times = []
    rows = []
    with gpu_sampler() as gpu:
        for i in range(ctx.args.images):
            sync(ctx.device)
            t0 = time.perf_counter()
            render(loaded, ctx.request(offset + i, mode))
            times.append(time.perf_counter() - t0)
            rows.append(loaded.accel.controller.stats.rows)
    return {**summary(times), "peak_gib": peak_gib(ctx.device), "transformer_rows_per_image": rows[-1],
            **gpu.result()}


def _breakdown(ctx: Context, loaded: Any) -> dict[str, float]:
    """Where one exact render's time goes: T5 (a new prompt), denoising, VAE decode, the rest."""
    import torch
    from pixq.worker.gpu.render import render

    pipe = loaded.pipe
    vae_s: list[float] = []
    original = pipe.vae.decode

    def timed_decode(*args: Any, **kwargs: Any) -> Any:
        sync(ctx.device)
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        sync(ctx.device)
        vae_s.append(time.perf_counter() - t0)
        return out

    _fresh_prompt_cache(loaded)
    req = ctx.request(len(PROMPTS) - 2)
    sync(ctx.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        encoded = loaded.accel.encode(req.prompt)
    sync(ctx.device)
    t5_s = time.perf_counter() - t0
    pipe.vae.decode = timed_decode
    try:
        sync(ctx.device)
        t0 = time.perf_counter()
        render(loaded, req)  # prompt now cached: this is denoise + decode + postprocess
        total_cached = time.perf_counter() - t0
    finally:
        del pipe.vae.decode
    return {"t5_new_prompt_s": t5_s, "render_cached_prompt_s": total_cached, "vae_decode_s": vae_s[-1],
            "denoise_and_rest_s": total_cached - vae_s[-1], "prompt_tokens": encoded.tokens}


def _fidelity(ctx: Context, loaded: Any) -> dict[str, Any]:
    """Output differences on the fixed prompts and seeds.

    plain_vs_exact: the plain pipeline call (prompt strings, eager transformer, same dtype) vs the
    worker's exact render (cached embeddings, trimmed text, compiled transformer): what the levers
    change. card_vs_plain: the card's fp16 vs the same plain call in the worker's dtype: what the
    dtype changes. exact_vs_fast / exact_vs_fast_order1: what fast mode changes.
    """
    import dataclasses

    import numpy as np
    import torch
    from pixq.worker.gpu.render import generators, render

    accel = loaded.accel
    pairs: dict[str, list[dict[str, Any]]] = {
        "plain_vs_exact": [], "card_vs_plain": [], "card_vs_exact": [], "exact_vs_fast": [],
        "exact_vs_fast_order1": [],
    }

    def run(fn: Any) -> tuple[Any, Any]:
        latents: list[Any] = []
        with capture_vae_input(loaded.pipe, latents):
            image = fn()
        return latents[-1], np.asarray(image)

    def diff(a: tuple[Any, Any], b: tuple[Any, Any]) -> dict[str, Any]:
        return {**image_diff(a[1], b[1]), "latent_rel": latent_rel(a[0], b[0])}

    plan = accel.options.fast_plan
    for i in range(ctx.args.fidelity):
        req = ctx.request(i)

        def plain(req: Any = req) -> Any:
            with torch.inference_mode(), accel.eager():
                return loaded.pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, width=req.width,
                                   height=req.height, generator=generators(req)[0]).images[0]

        got = {
            "plain": run(plain),
            "exact": run(lambda req=req: render(loaded, req)[0]),
            "fast": run(lambda i=i: render(loaded, ctx.request(i, "fast"))[0]),
        }
        accel.options = dataclasses.replace(accel.options, fast_plan=dataclasses.replace(plan, order=1))
        try:
            got["fast1"] = run(lambda i=i: render(loaded, ctx.request(i, "fast"))[0])
        finally:
            accel.options = dataclasses.replace(accel.options, fast_plan=plan)
        pairs["plain_vs_exact"].append(diff(got["exact"], got["plain"]))
        pairs["exact_vs_fast"].append(diff(got["fast"], got["exact"]))
        pairs["exact_vs_fast_order1"].append(diff(got["fast1"], got["exact"]))
        if i in ctx.ref:
            pairs["card_vs_plain"].append(diff(got["plain"], ctx.ref[i]))
            pairs["card_vs_exact"].append(diff(got["exact"], ctx.ref[i]))
    out: dict[str, Any] = dict(pairs)
    for key, items in pairs.items():
        if items:
            out[key + "_summary"] = _diff_summary(items)
    if ctx.ref_t5 is not None:
        with torch.inference_mode():
            ours = accel.encode(ctx.request(0).prompt).embeds.float().cpu()
        out["t5_card_vs_worker_rel"] = latent_rel(ours, ctx.ref_t5)
    return out


def _diff_summary(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Worst and mean of ``image_diff`` rows (and of their latent differences where measured)."""
    out = {"psnr_db_min": min(x["psnr_db"] for x in items),
           "psnr_db_mean": sum(x["psnr_db"] for x in items) / len(items),
           "max_abs": max(x["max_abs"] for x in items)}
    if all("latent_rel" in x for x in items):
        out["latent_rel_max"] = max(x["latent_rel"] for x in items)
    return out


def _job_path(ctx: Context, loaded: Any, mode: str, offset: int) -> dict[str, Any]:
    """The queue's work without the queue: two threads, render under a lock, then PNG + S3 put."""
    from pixq.settings import Settings
    from pixq.worker.gpu.png import threads_for
    from pixq.worker.gpu.render import encode, render
    from pixq.worker.jobs.storage import Storage

    env = _services(ctx)
    storage = Storage(Settings.from_env(env))
    lock = threading.Lock()
    done: list[float] = []
    run = f"{mode}-{time.time_ns()}"  # fresh keys: the store keeps an image already there
    encode_s: list[float] = []
    put_s: list[float] = []
    sizes: list[int] = []

    def job(index: int) -> None:
        req = ctx.request(offset + index, mode)
        with lock:
            images = render(loaded, req)
        for k, (image, seed) in enumerate(zip(images, req.image_seeds(), strict=True)):
            t0 = time.perf_counter()
            data = encode(image, req.output_format, threads=threads_for(lock.locked()))  # as the runner
            t1 = time.perf_counter()
            storage.put_image(f"inproc-{run}-{index:04d}", k, data, req, seed)
            encode_s.append(t1 - t0)
            put_s.append(time.perf_counter() - t1)
            sizes.append(len(data))
        done.append(time.perf_counter())

    _fresh_prompt_cache(loaded)
    t0 = time.perf_counter()
    with gpu_sampler() as gpu, ThreadPoolExecutor(2) as pool:
        list(pool.map(job, range(ctx.args.images)))
    done.sort()
    n = len(done)
    return {"n": n, "images_per_s": n / (done[-1] - t0),
            "steady_images_per_s": (n - 1) / (done[-1] - done[0]) if n > 1 else None, **gpu.result(),
            "png_encode_p50_s": summary(encode_s)["p50_s"], "s3_put_p50_s": summary(put_s)["p50_s"],
            "png_bytes_p50": sorted(sizes)[len(sizes) // 2]}


def phase_inprocess(ctx: Context, compile_mode: str) -> None:
    key = f"inprocess[{compile_mode}]"
    res: dict[str, Any] = {}
    ctx.results[key] = res
    reset_peak(ctx.device)
    loaded = _load(ctx, compile_mode)
    res.update(load_s=loaded.load_s, warmup_s=loaded.warmup_s, warmed=loaded.warmed,
               peak_after_warmup_gib=peak_gib(ctx.device))
    ctx.save()
    res["exact"] = _stream(ctx, loaded, "exact", offset=0)
    res["fast"] = _stream(ctx, loaded, "fast", offset=0)
    res["breakdown_exact"] = _breakdown(ctx, loaded)
    res["fidelity"] = _fidelity(ctx, loaded)
    res["prompt_cache"] = {"hits": loaded.accel.cache.hits, "misses": loaded.accel.cache.misses}
    ctx.save()
    if not ctx.args.no_s3:
        try:
            res["job_path_exact"] = _job_path(ctx, loaded, "exact", offset=0)
            res["job_path_fast"] = _job_path(ctx, loaded, "fast", offset=0)
        except Exception as exc:  # the services are optional for this phase
            res["job_path_error"] = f"{type(exc).__name__}: {exc}"
    del loaded
    free_cuda()


def phase_levers(ctx: Context) -> None:
    """One lever at a time on one bf16 pipeline: speed and output difference vs the plain call.

    plain: pipe(prompt strings), eager. cache: worker render with cached embeddings, eager, untrimmed.
    trim: + text trimming. compile: cached, compiled, untrimmed. exact: cached + trimmed + compiled
    (what exact mode ships).
    """
    import dataclasses

    import numpy as np
    import torch
    from pixq.worker.gpu.pipeline import load_pipeline
    from pixq.worker.gpu.render import generators, render
    from pixq.worker.gpu.speedups import SpeedupOptions

    loaded = load_pipeline(str(ctx.model_dir), ctx.device, "auto",
                           accel=SpeedupOptions(compile=True, trim_text=False,
                                              compile_scope=ctx.args.compile_scope),
                           compile_cache=str(ctx.args.compile_cache))
    accel: Any = loaded.accel
    base = accel.options
    variants = {  # name -> (eager, trim)
        "plain": None, "cache": (True, False), "trim": (True, True), "compile": (False, False),
        "exact": (False, True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, dict[int, tuple[Any, Any]]] = {name: {} for name in variants}
    for name, how in variants.items():
        for i in range(-1, ctx.args.fidelity):  # -1: untimed warm-up (compiles for "compile")
            req = ctx.request(i % len(PROMPTS))
            latents: list[Any] = []
            sync(ctx.device)
            t0 = time.perf_counter()
            with capture_vae_input(loaded.pipe, latents), torch.inference_mode():
                if how is None:
                    with accel.eager():
                        image = loaded.pipe(prompt=req.prompt, negative_prompt=req.negative_prompt,
                                            width=req.width, height=req.height,
                                            generator=generators(req)[0]).images[0]
                else:
                    eager, trim = how
                    accel.options = dataclasses.replace(base, trim_text=trim)
                    with accel.eager() if eager else contextlib.nullcontext():
                        image = render(loaded, req)[0]
            elapsed = time.perf_counter() - t0
            if i >= 0:
                times[name].append(elapsed)
                outputs[name][i] = (latents[-1], np.asarray(image))
    accel.options = base
    res: dict[str, Any] = {}
    for name in variants:
        diffs = [{**image_diff(outputs[name][i][1], outputs["plain"][i][1]),
                  "latent_rel": latent_rel(outputs[name][i][0], outputs["plain"][i][0])}
                 for i in outputs[name]]
        res[name] = {**summary(times[name]),
                     "vs_plain_psnr_db_min": min(d["psnr_db"] for d in diffs),
                     "vs_plain_max_abs": max(d["max_abs"] for d in diffs),
                     "vs_plain_latent_rel_max": max(d["latent_rel"] for d in diffs),
                     "bit_identical": all(d["max_abs"] == 0 and d["latent_rel"] == 0 for d in diffs)}
    ctx.results["levers"] = res
    del loaded
    free_cuda()
    ctx.save()


# -- the queue ------------------------------------------------------------------------------------


def _services(ctx: Context) -> dict[str, str]:
    """Redis and SeaweedFS on loopback, started once per run."""
    if ctx.env is not None:
        return ctx.env
    from pixq.worker.ops.stack import start_redis, start_seaweedfs

    root = _log_dir(ctx) / f"services-{os.getpid()}"
    svc, redis_url = start_redis(root / "redis")
    ctx.services.append(svc)
    svc, endpoint = start_seaweedfs(root / "s3", bucket="pixq-bench")
    ctx.services.append(svc)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIXQ_", "AWS_"))}
    env.update(endpoint.env())
    env.update({"PIXQ_REDIS_URL": redis_url, "PIXQ_MODEL": str(ctx.model_dir), "PIXQ_S3_PREFIX": "bench",
                "PYTHONUNBUFFERED": "1"})
    ctx.env = env
    # boto3 in this process (the in-process job path) reads its credentials from the environment.
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    return env


def _client(env: dict[str, str]) -> Any:
    from pixq.client import Client
    from pixq.settings import Settings

    return Client(Settings.from_env(env))


def _worker_args(ctx: Context, compile_mode: str, cache_dir: Path) -> tuple[str, ...]:
    args = ["--warmup", f"{ctx.size}x{ctx.size}", "--compile-cache", str(cache_dir)]
    if compile_mode == COMPILE_NONE:
        args.append("--no-compile")
    else:
        args += ["--compile", "--compile-mode", compile_mode, "--compile-scope", ctx.args.compile_scope]
    return tuple(args)


def _submit(client: Any, ctx: Context, index: int, mode: str) -> Any:
    req = ctx.request(index, mode)
    return client.submit(req.prompt, seed=req.seed, width=req.width, height=req.height, mode=mode,
                         model_name=req.model_name)


@contextlib.contextmanager
def _worker(
    ctx: Context, compile_mode: str, cache_dir: Path, log_name: str, extra: tuple[str, ...] = (),
    info: dict[str, Any] | None = None,
) -> Iterator[tuple[Any, Any, float]]:
    """Submit one job, start ``pixq worker``; yields (client, first job record, cold start s).

    ``info``, when given, receives the worker's presence record and the start time.
    """
    from pixq.wire import WORKER_KEY_PREFIX
    from pixq.worker.ops.stack import start_worker

    env = _services(ctx)
    client = _client(env)
    log_path = _log_dir(ctx) / f"{log_name}.log"
    t0 = time.time()
    first = _submit(client, ctx, len(PROMPTS) - 3, "exact")
    svc = start_worker(env, str(ctx.model_dir), log_path, device=ctx.device,
                       extra=_worker_args(ctx, compile_mode, cache_dir) + extra, timeout_s=ctx.args.worker_timeout_s)
    try:
        record = client.wait(first.id, timeout_s=ctx.args.worker_timeout_s, poll_s=0.02)
        if info is not None:
            info["t0"] = t0
            for key in client.conn.scan_iter(WORKER_KEY_PREFIX + "*"):
                presence = json.loads(client.conn.get(key) or "{}")
                if presence.get("pid") == svc.pid:
                    info.update(presence)
        yield client, record, record.finished_at - t0
    except Exception:
        print(f"--- {log_path} (tail)\n{svc.log_tail(40)}", file=sys.stderr)
        raise
    finally:
        svc.stop()


def _log_dir(ctx: Context) -> Path:
    path = ctx.out / "logs" if ctx.args.keep_logs else Path("/tmp/pixq-bench/logs")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _queue_stream(ctx: Context, client: Any, mode: str, offset: int) -> dict[str, Any]:
    jobs = []
    with gpu_sampler() as gpu:
        for i in range(ctx.args.images):
            jobs.append(_submit(client, ctx, offset + i, mode))
        records = [client.wait(job.id, timeout_s=600, poll_s=0.02) for job in jobs]
    states = sorted({r.state.value for r in records})
    finished = sorted(r.finished_at for r in records)
    first_created = min(r.created_at for r in records)
    n = len(records)
    service = [r.finished_at - r.started_at for r in records if r.started_at]
    return {
        "n": n, "states": states, "mode_recorded": sorted({str(r.request.mode.value) for r in records}),
        "images_per_s": n / (finished[-1] - first_created),
        "steady_images_per_s": (n - 1) / (finished[-1] - finished[0]) if n > 1 else None,
        "service_p50_s": summary(service).get("p50_s"), "service_p95_s": summary(service).get("p95_s"),
        **gpu.result(),
    }


def _idle_single_jobs(ctx: Context, client: Any, rounds: int, modes: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per round: 1 s with nothing queued or rendering, then one job per mode, each waited for."""
    idle = []
    for i in range(rounds):
        time.sleep(1.0)
        for mode in modes:
            job = _submit(client, ctx, 100 + i, mode)
            record = client.wait(job.id, timeout_s=600, poll_s=0.005)
            idle.append({"mode": mode, "latency_s": record.finished_at - record.created_at,
                         "queue_wait_s": record.started_at - record.created_at,
                         "service_s": record.finished_at - record.started_at,
                         "bytes": sum(im.size_bytes for im in record.images)})
    return idle


def phase_queue(ctx: Context, compile_mode: str, variant: str = "") -> None:
    """``variant``: "SCOPE:THREADS" (``--compile-scope``, ``--encode-threads``) or "" for the run's own."""
    key = f"queue[{compile_mode}]" if not variant else f"queue[{compile_mode},{variant}]"
    res: dict[str, Any] = {}
    ctx.results[key] = res
    extra: tuple[str, ...] = ()
    if variant:
        scope, threads = variant.split(":")
        extra = ("--compile-scope", scope, "--encode-threads", threads)
    with _worker(ctx, compile_mode, ctx.args.compile_cache, f"worker-{compile_mode}{variant.replace(':', '-')}",
                 extra=extra) as (client, first, cold):
        res["cold_start_warm_cache_s"] = cold
        res["first_job_state"] = first.state.value
        ctx.save()
        res["exact"] = _queue_stream(ctx, client, "exact", offset=0)
        res["fast"] = _queue_stream(ctx, client, "fast", offset=0)
        res["idle_single_job"] = _idle_single_jobs(ctx, client, rounds=3, modes=("exact",))
    ctx.save()


def _gpu_workers(ctx: Context, gpus: str, compile_mode: str, log_name: str) -> Any:
    """``pixq worker --gpus GPUS`` (the supervisor, one child per GPU); returns once all announced."""
    from pixq.wire import WORKER_KEY_PREFIX
    from pixq.worker.ops.stack import Service, pixq_argv

    env = _services(ctx)
    want = len(gpus.split(","))
    argv = pixq_argv("worker", "--model", str(ctx.model_dir), "--gpus", gpus,
                     *_worker_args(ctx, compile_mode, ctx.args.compile_cache))
    svc = Service(f"workers {gpus}", argv, _log_dir(ctx) / f"{log_name}.log", env=env).start()
    client = _client(env)

    def announced() -> bool:
        keys = client.conn.scan_iter(WORKER_KEY_PREFIX + "*")
        names = [json.loads(client.conn.get(k) or "{}").get("name") for k in keys]
        return len([n for n in names if n and n.startswith("gpu")]) >= want

    svc.wait_until(announced, ctx.args.worker_timeout_s)
    return svc, client


def phase_multigpu(ctx: Context, compile_mode: str) -> None:
    """Throughput through the queue with one worker process per GPU: 1 GPU, then 2 (issue 5)."""
    import torch

    res: dict[str, Any] = {"gpus_visible": torch.cuda.device_count()}
    ctx.results[f"multigpu[{compile_mode}]"] = res
    for gpus in ("0", "0,1")[: max(1, min(2, torch.cuda.device_count()))]:
        svc, client = _gpu_workers(ctx, gpus, compile_mode, f"workers-{gpus.replace(',', '-')}")
        try:
            n_gpus = len(gpus.split(","))
            # Warm every worker (first jobs pick kernels), then a burst that keeps all of them busy.
            warm = [_submit(client, ctx, 200 + i, "exact") for i in range(2 * n_gpus)]
            for job in warm:
                client.wait(job.id, timeout_s=600, poll_s=0.02)
            res[f"{n_gpus}_gpu"] = _queue_stream(ctx, client, "exact", offset=0)
            res[f"{n_gpus}_gpu"]["workers"] = sorted({client.status(j.id).worker or "" for j in warm})
        finally:
            client.close()
            svc.stop(timeout_s=60)
        ctx.save()
    one, two = res.get("1_gpu"), res.get("2_gpu")
    if one and two:
        res["scaling"] = two["steady_images_per_s"] / one["steady_images_per_s"]
        print(f"multigpu: 1 GPU {one['steady_images_per_s']:.3f} img/s, 2 GPUs {two['steady_images_per_s']:.3f} "
              f"img/s, scaling {res['scaling']:.2f}x", flush=True)


def phase_coldstart(ctx: Context, compile_mode: str) -> None:
    cache = Path("/tmp/pixq-bench-cold-cache") / str(time.time_ns())
    with _worker(ctx, compile_mode, cache, f"worker-cold-{compile_mode}") as (_client, first, cold):
        ctx.results[f"coldstart[{compile_mode}]"] = {"cold_start_cold_cache_s": cold, "state": first.state.value}
    shutil.rmtree(cache, ignore_errors=True)
    ctx.save()


def phase_coldsplit(ctx: Context) -> None:
    """Worker cold starts: cold compile cache, warm cache, warm cache with only exact mode warmed up."""
    import subprocess

    env = _services(ctx)
    res: dict[str, Any] = {}
    ctx.results["coldsplit"] = res
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, diffusers, transformers, celery, pixq.worker.ops.serve; "
                    "torch.cuda.init() if torch.cuda.is_available() else None"], env=env, check=True)
    res["imports_and_cuda_init_s"] = time.perf_counter() - t0
    cache = Path("/tmp/pixq-bench-split-cache") / str(time.time_ns())
    starts = (("cold_cache", ()), ("warm_cache", ()), ("warm_cache_exact_warmup_only", ("--warmup-mode", "exact")))
    for label, extra in starts:
        if label not in ctx.args.coldsplit_starts.split(","):
            continue
        if ctx.elapsed() > ctx.args.deadline_s:
            res[label] = "skipped: deadline"
            continue
        info: dict[str, Any] = {}
        with _worker(ctx, "default", cache, f"worker-{label}", extra=extra, info=info) as (client, first, cold):
            item: dict[str, Any] = {"cold_start_s": cold, "state": first.state.value,
                                    "first_job_service_s": first.finished_at - (first.started_at or 0)}
            if "started_at" in info:
                item.update(load_s=info.get("load_s"), presence_after_s=info["started_at"] - info["t0"])
            job = _submit(client, ctx, 3, "fast")
            rec = client.wait(job.id, timeout_s=600, poll_s=0.02)
            item["first_fast_job_latency_s"] = rec.finished_at - rec.created_at
            res[label] = item
        ctx.save()
    # Later phases start from the cache warmed here instead of compiling again.
    shutil.rmtree(ctx.args.compile_cache, ignore_errors=True)
    ctx.args.compile_cache.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(cache, ctx.args.compile_cache)


# -- single levers: compile scope, batching, attention kernels, image encoding ---------------------


def phase_scopes(ctx: Context) -> None:
    """Compile scope: the whole forward as one graph vs one graph shared by the blocks (regional).

    Each from an empty inductor cache (compile time = warm-up of exact and fast), then the same
    exact and fast streams. The blocks' cache is left in ``--compile-cache`` for later phases.
    Then micro-batching on the blocks pipeline: per-image time of one call with 1, 2, 4 images.
    """
    import torch
    from pixq.worker.gpu.pipeline import load_pipeline
    from pixq.worker.gpu.render import render
    from pixq.worker.gpu.speedups import SpeedupOptions

    res: dict[str, Any] = {}
    ctx.results["scopes"] = res
    for scope in ("model", "blocks"):
        if ctx.elapsed() > ctx.args.deadline_s:
            res[scope] = "skipped: deadline"
            continue
        torch._dynamo.reset()
        cache = ctx.args.compile_cache if scope == ctx.args.compile_scope else (
            Path("/tmp/pixq-bench/scope-cache") / f"{scope}-{time.time_ns()}")
        shutil.rmtree(cache, ignore_errors=True)
        loaded = load_pipeline(str(ctx.model_dir), ctx.device, "auto",
                               accel=SpeedupOptions(compile=True, compile_scope=scope), compile_cache=str(cache),
                               warmup=[(ctx.size, ctx.size)], warmup_modes=("exact", "fast"))
        item: dict[str, Any] = {"cold_compile_and_warmup_s": loaded.warmup_s}
        item["exact"] = _stream(ctx, loaded, "exact", offset=0)
        item["fast"] = _stream(ctx, loaded, "fast", offset=0)
        res[scope] = item
        ctx.save()
        if scope == "blocks" and ctx.elapsed() < ctx.args.deadline_s:
            batching: dict[str, Any] = {}
            for n in (1, 2, 4):
                times = []
                for i in range(4):  # the first call at a new batch size compiles its graph: not timed
                    sync(ctx.device)
                    t0 = time.perf_counter()
                    render(loaded, ctx.request(i, "exact", num_images_per_prompt=n))
                    times.append((time.perf_counter() - t0) / n)
                batching[f"batch_{n}"] = {"first_per_image_s": times[0], **summary(times[1:])}
            base = batching["batch_1"]["p50_s"]
            for n in (2, 4):
                batching[f"batch_{n}"]["per_image_vs_batch_1"] = batching[f"batch_{n}"]["p50_s"] / base
            res["batching_blocks"] = batching
        del loaded
        free_cuda()
        if cache != ctx.args.compile_cache:
            shutil.rmtree(cache, ignore_errors=True)
        ctx.save()


def phase_attention(ctx: Context) -> None:
    """Self-attention of PixArt-Σ (16 heads × 72, CFG batch 2) at 1024² and 2048², per SDPA backend."""
    import torch
    import torch.nn.functional as F

    if not ctx.device.startswith("cuda"):
        ctx.results["attention"] = "skipped: needs a CUDA device"
        return
    res: dict[str, Any] = {}
    for side in (1024, 2048):
        tokens = (side // 16) ** 2
        q, k, v = (torch.randn(2, 16, tokens, 72, device=ctx.device, dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * 2 * 16 * tokens * tokens * 72
        ref = F.scaled_dot_product_attention(q, k, v)
        row: dict[str, Any] = {"tokens": tokens}
        for name in ("default", "flash", "cudnn", "efficient"):
            try:
                with _sdpa_backend(name):
                    out = F.scaled_dot_product_attention(q, k, v)
                    sync(ctx.device)
                    reps = 20 if side == 1024 else 5
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        F.scaled_dot_product_attention(q, k, v)
                    sync(ctx.device)
                ms = (time.perf_counter() - t0) / reps * 1e3
                row[name] = {"ms": ms, "tflops": flops / ms / 1e9,
                             "max_abs_vs_default": float((out.float() - ref.float()).abs().max())}
            except Exception as exc:  # a backend that does not take these shapes
                row[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
        res[str(side)] = row
        del q, k, v, ref
    ctx.results["attention"] = res
    free_cuda()


def phase_encode(ctx: Context) -> None:
    """The idle path after the VAE: device → PIL image, then PNG: Pillow vs pixq.worker.gpu.png."""
    import io

    import numpy as np
    import torch
    from PIL import Image
    from pixq.worker.gpu.png import encode_png
    from pixq.worker.gpu.render import to_pil

    res: dict[str, Any] = {"cpus": os.cpu_count()}
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:ctx.size, 0:ctx.size]
    smooth = np.stack([x % 256, y % 256, (x // 4 + y // 4) % 256], -1).astype(np.uint8)
    images = {"noise": rng.integers(0, 256, (ctx.size, ctx.size, 3), dtype=np.uint8), "smooth": smooth}

    def timed(fn: Any, n: int = 9) -> tuple[float, Any]:
        out, times = None, []
        for _ in range(n):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3, out

    for name, arr in images.items():
        image = Image.fromarray(arr)

        def pillow(image: Any = image) -> bytes:
            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=1)
            return buf.getvalue()

        pil_ms, pil_bytes = timed(pillow)
        ours_ms, ours_bytes = timed(lambda image=image: encode_png(image, 1))
        res[name] = {"pillow_level1_ms": pil_ms, "pillow_mb": len(pil_bytes) / 1e6,
                     "worker_png_ms": ours_ms, "worker_png_mb": len(ours_bytes) / 1e6}
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=8)
    decoded = torch.rand(1, 3, ctx.size, ctx.size, device=ctx.device, dtype=torch.bfloat16) * 2 - 1

    def pil_way() -> Any:
        out = proc.postprocess(decoded, output_type="pil")
        sync(ctx.device)
        return out

    def device_way() -> Any:
        out = to_pil(proc.postprocess(decoded, output_type="pt"))
        sync(ctx.device)
        return out

    res["to_pil_diffusers_ms"], a = timed(pil_way)
    res["to_pil_on_device_ms"], b = timed(device_way)
    res["to_pil_identical"] = bool(np.array_equal(np.asarray(a[0]), np.asarray(b[0])))
    ctx.results["encode"] = res


# -- 2K, offload ----------------------------------------------------------------------------------


TWOK_MODEL = "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS"  # a 2K checkpoint's size limit (4096)


def phase_twok(ctx: Context) -> None:
    """2048² (the 2K architecture) in-process: fast and exact (per SDPA backend), what fast mode changes at
    2048², 4096² binned (diffusers' default: the 2048² bin, resized) and 4096² native (no binning, tiled VAE)."""
    import numpy as np
    import torch
    from diffusers import PixArtSigmaPipeline
    from pixq.worker.gpu.render import render
    from pixq.worker.gpu.speedups import RenderSpeedups, SpeedupOptions

    from benchmarks.fullsize import build_transformer, twice_the_size

    res: dict[str, Any] = {}
    ctx.results["twok"] = res
    dtype = torch.bfloat16 if ctx.device.startswith("cuda") else torch.float32
    transformer = build_transformer(twice_the_size(ctx.model_dir / "transformer"), ctx.device, dtype)
    pipe = PixArtSigmaPipeline.from_pretrained(ctx.model_dir, transformer=transformer, torch_dtype=dtype)
    pipe.to(ctx.device)
    pipe.set_progress_bar_config(disable=True)
    compiled = ctx.args.twok_compile != COMPILE_NONE
    # vae_tile_above=0: every decode tiled, as the 2048² setup states (the worker's default decodes
    # 2048² in one piece; the "vae" phase times both).
    accel = RenderSpeedups(pipe, SpeedupOptions(compile=compiled, compile_mode=ctx.args.twok_compile if compiled
                                           else "default", compile_scope=ctx.args.compile_scope,
                                           vae_tile_above=ctx.args.twok_tile_above))
    res["compile"] = ctx.args.twok_compile
    res["vae_tile_above"] = ctx.args.twok_tile_above
    side = 2 * ctx.size
    runs = [("fast", "default")] + [("exact", b) for b in ctx.args.twok_backends.split(",") if b]
    images: dict[tuple[str, int], Any] = {}
    for mode, backend in runs:
        key = f"{side}_{mode}" + ("" if backend == "default" else f"_{backend}")
        if ctx.elapsed() > ctx.args.deadline_s:
            res[key] = "skipped: deadline"
            continue
        times = []
        try:
            with _sdpa_backend(backend):
                for i in range(1 + ctx.args.twok_images):  # the first one warms up (and compiles)
                    reset_peak(ctx.device)
                    t0 = time.perf_counter()
                    image = render(pipe, ctx.request(i, mode, width=side, height=side, model_name=TWOK_MODEL))[0]
                    times.append(time.perf_counter() - t0)
                    if backend == "default":
                        images[(mode, i)] = np.asarray(image)
        except Exception as exc:
            res[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        res[key] = {"first_s": times[0], **summary(times[1:]), "peak_gib": peak_gib(ctx.device)}
        ctx.save()
    pairs = [image_diff(images[("fast", i)], images[("exact", i)])
             for i in range(1 + ctx.args.twok_images) if ("fast", i) in images and ("exact", i) in images]
    if pairs:
        res[f"{side}_exact_vs_fast"] = {"n": len(pairs), **_diff_summary(pairs), "pairs": pairs}
    big = 4 * ctx.size
    for mode, binned in [("fast", True)] + [(m, False) for m in ctx.args.native_modes.split(",") if m]:
        key = f"{big}_{mode}" + ("" if binned else "_native")
        if ctx.elapsed() > ctx.args.deadline_s:
            res[key] = "skipped: deadline"
            continue
        reset_peak(ctx.device)
        tiled = accel.vae_decode.tiled
        t0 = time.perf_counter()
        try:
            out = render(pipe, ctx.request(0, mode, width=big, height=big, model_name=TWOK_MODEL,
                                           use_resolution_binning=binned))
        except Exception as exc:
            res[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        res[key] = {"s": time.perf_counter() - t0, "peak_gib": peak_gib(ctx.device), "size": list(out[0].size),
                    "tiled_decodes": accel.vae_decode.tiled - tiled}
        ctx.save()
    del pipe, transformer, accel
    free_cuda()
    ctx.save()


def _twok_model(ctx: Context) -> Path:
    """A 2K pipeline directory: the 2K transformer saved beside links to the 1024 model's other parts."""
    import torch

    from benchmarks.fullsize import build_transformer, twice_the_size

    out = ctx.model_dir.with_name(ctx.model_dir.name + "-2k")
    if (out / "transformer" / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for part in ctx.model_dir.iterdir():
        if part.name != "transformer" and not (out / part.name).exists():
            (out / part.name).symlink_to(part)
    dtype = torch.bfloat16 if ctx.device.startswith("cuda") else torch.float32
    transformer = build_transformer(twice_the_size(ctx.model_dir / "transformer"), ctx.device, dtype)
    transformer.save_pretrained(out / "transformer", safe_serialization=True)
    del transformer
    free_cuda()
    return out


def phase_twokqueue(ctx: Context) -> None:
    """2048² jobs end to end (Redis, a ``pixq worker`` serving the 2K model, S3): fast and exact streams and
    idle single jobs, the worker's own settings (VAE tiling above its threshold)."""
    import argparse
    import dataclasses

    res: dict[str, Any] = {}
    ctx.results["twokqueue"] = res
    args = argparse.Namespace(**{**vars(ctx.args), "images": ctx.args.twok_queue_images})
    sub = dataclasses.replace(ctx, args=args, size=2 * ctx.size, model_dir=_twok_model(ctx))
    sub.env = ctx.env
    with _worker(sub, ctx.args.twok_compile, ctx.args.compile_cache, "worker-2k") as (client, first, cold):
        ctx.env = sub.env
        res["cold_start_s"] = cold
        res["first_job_state"] = first.state.value
        ctx.save()
        res["fast"] = _queue_stream(sub, client, "fast", offset=0)
        ctx.save()
        res["exact"] = _queue_stream(sub, client, "exact", offset=0)
        ctx.save()
        res["idle_single_job"] = _idle_single_jobs(sub, client, rounds=2, modes=("fast", "exact"))
    ctx.save()


def phase_vae(ctx: Context) -> None:
    """VAE decode at 1024² and 2048²: one piece vs tiled vs a compiled decoder (time, peak, pixel change)."""
    import torch
    from diffusers import AutoencoderKL

    dtype = torch.bfloat16 if ctx.device.startswith("cuda") else torch.float32
    vae = AutoencoderKL.from_pretrained(ctx.model_dir / "vae", torch_dtype=dtype).to(ctx.device).eval()
    res: dict[str, Any] = {}
    ctx.results["vae"] = res
    reps = 5 if not ctx.tiny else 2

    def decode(z: Any) -> Any:
        with torch.inference_mode():
            return vae.decode(z, return_dict=False)[0]

    def timed(z: Any) -> tuple[dict[str, Any], Any]:
        out = decode(z)  # warm-up (and compile)
        times = []
        reset_peak(ctx.device)
        for _ in range(reps):
            sync(ctx.device)
            t0 = time.perf_counter()
            out = decode(z)
            sync(ctx.device)
            times.append(time.perf_counter() - t0)
        return {**summary(times), "peak_gib": peak_gib(ctx.device)}, out

    def to8(x: Any) -> Any:
        return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round()

    plain_decoder = vae.decoder
    for side in (ctx.size, 2 * ctx.size):
        if ctx.elapsed() > ctx.args.deadline_s:
            break
        gen = torch.Generator("cpu").manual_seed(side)
        z = torch.randn(1, 4, side // 8, side // 8, generator=gen).to(ctx.device, dtype) / vae.config.scaling_factor
        vae.disable_tiling()
        vae.decoder = plain_decoder
        row, ref = timed(z)
        res[f"{side}_plain"] = row
        vae.enable_tiling()
        row, out = timed(z)
        res[f"{side}_tiled"] = {**row, "max_abs_8bit": float((to8(out) - to8(ref)).abs().max())}
        vae.disable_tiling()
        if ctx.args.vae_compile:
            vae.decoder = torch.compile(plain_decoder, fullgraph=True, dynamic=False)
            t0 = time.perf_counter()
            decode(z)
            sync(ctx.device)
            compile_s = time.perf_counter() - t0
            row, out = timed(z)
            res[f"{side}_compiled"] = {**row, "compile_s": compile_s,
                                       "max_abs_8bit": float((to8(out) - to8(ref)).abs().max())}
        ctx.save()
    vae.decoder = plain_decoder


@contextlib.contextmanager
def _sdpa_backend(name: str) -> Iterator[None]:
    """Force one scaled-dot-product-attention backend (eager calls) or leave torch's choice."""
    if name == "default":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    with sdpa_kernel(backend):
        yield


def phase_offload(ctx: Context) -> None:
    from pixq.worker.gpu.pipeline import load_pipeline
    from pixq.worker.gpu.render import render
    from pixq.worker.gpu.speedups import SpeedupOptions

    if not ctx.device.startswith("cuda"):
        ctx.results["offload"] = "skipped: needs a CUDA device"
        return
    reset_peak(ctx.device)
    loaded = load_pipeline(str(ctx.model_dir), ctx.device, "auto", offload=True, accel=SpeedupOptions())
    res: dict[str, Any] = {"load_s": loaded.load_s}
    for mode in ("exact", "fast"):
        times = []
        for i in range(2):
            reset_peak(ctx.device)
            t0 = time.perf_counter()
            render(loaded, ctx.request(i, mode))
            times.append(time.perf_counter() - t0)
        res[mode] = {"first_s": times[0], "second_s": times[1], "peak_gib": peak_gib(ctx.device)}
    ctx.results["offload"] = res
    del loaded
    free_cuda()
    ctx.save()


# -- report ---------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    card = results.get("card", {})
    base = card.get("images_per_s")
    rows = [("config", "img/s", "p50 s", "p95 s", "GPU busy", "peak GiB", "cold start s", "× card")]

    def ratio(ips: float | None) -> str:
        return f"{ips / base:.2f}" if ips and base else "-"

    def fmt(x: Any, spec: str = ".3f") -> str:
        return format(x, spec) if isinstance(x, (int, float)) else "-"

    if card:
        rows.append(("card fp16 eager (pipe call)", fmt(card["images_per_s"]), fmt(card["p50_s"]),
                     fmt(card["p95_s"]), "-", fmt(card.get("peak_gib"), ".1f"), "-", "1.00"))
    for key, res in results.items():
        if key.startswith("inprocess[") and isinstance(res, dict):
            for mode in ("exact", "fast"):
                r = res.get(mode)
                if r:
                    rows.append((f"render {mode} {key[9:]}", fmt(r["images_per_s"]), fmt(r["p50_s"]),
                                 fmt(r["p95_s"]), fmt(r.get("gpu_busy"), ".2f"), fmt(r.get("peak_gib"), ".1f"),
                                 fmt(res.get("load_s", 0) + res.get("warmup_s", 0), ".1f") + " (in-proc)",
                                 ratio(r["images_per_s"])))
            for mode in ("exact", "fast"):
                r = res.get(f"job_path_{mode}")
                if r:
                    ips = r.get("steady_images_per_s") or r["images_per_s"]
                    rows.append((f"job path {mode} (2 thr, no queue)", fmt(ips), "-", "-",
                                 fmt(r.get("gpu_busy"), ".2f"), "-", "-", ratio(ips)))
        if key.startswith("queue[") and isinstance(res, dict):
            for mode in ("exact", "fast"):
                r = res.get(mode)
                if r:
                    ips = r.get("steady_images_per_s") or r["images_per_s"]
                    rows.append((f"queue {mode} {key[5:]}", fmt(ips), fmt(r.get("service_p50_s")),
                                 fmt(r.get("service_p95_s")), fmt(r.get("gpu_busy"), ".2f"),
                                 fmt(r.get("gpu_mem_used_max_gib"), ".1f"),
                                 fmt(res.get("cold_start_warm_cache_s"), ".1f"),
                                 ratio(ips)))
            idle = res.get("idle_single_job")
            if idle:
                rows.append(("queue idle single job", "-", fmt(sorted(x["latency_s"] for x in idle)[len(idle) // 2]),
                             fmt(max(x["latency_s"] for x in idle)), "-", "-", "-", "-"))
        if key.startswith("coldstart[") and isinstance(res, dict):
            rows.append((f"cold start, cold cache {key[9:]}", "-", "-", "-", "-", "-",
                         fmt(res.get("cold_start_cold_cache_s"), ".1f"), "-"))
    levers = results.get("levers")
    if isinstance(levers, dict):
        for name, r in levers.items():
            rows.append((f"lever: {name} (worker dtype)", fmt(r.get("images_per_s")), fmt(r.get("p50_s")),
                         fmt(r.get("p95_s")), "-", "-", "-", ratio(r.get("images_per_s"))))
    split = results.get("coldsplit")
    if isinstance(split, dict):
        for name, r in split.items():
            if isinstance(r, dict):
                rows.append((f"cold start: {name}", "-", "-", "-", "-", "-", fmt(r.get("cold_start_s"), ".1f"), "-"))
    twok = results.get("twok")
    if isinstance(twok, dict):
        for name, r in twok.items():
            if isinstance(r, dict) and "p50_s" in r:
                rows.append((f"{name} ({twok.get('compile')})", fmt(r["images_per_s"]), fmt(r["p50_s"]),
                             fmt(r["p95_s"]), "-", fmt(r.get("peak_gib"), ".1f"), "-", "-"))
            elif isinstance(r, dict) and "s" in r:
                rows.append((name, "-", fmt(r["s"]), "-", "-", fmt(r.get("peak_gib"), ".1f"), "-", "-"))
            elif isinstance(r, dict) and "psnr_db_min" in r:
                rows.append((f"{name}: PSNR min {r['psnr_db_min']:.1f} dB, max |d| {r['max_abs']:.0f}/255",
                             "-", "-", "-", "-", "-", "-", "-"))
    tq = results.get("twokqueue")
    if isinstance(tq, dict):
        for mode in ("fast", "exact"):
            r = tq.get(mode)
            if r:
                ips = r.get("steady_images_per_s") or r["images_per_s"]
                rows.append((f"queue 2K model {mode}", fmt(ips), fmt(r.get("service_p50_s")),
                             fmt(r.get("service_p95_s")),
                             fmt(r.get("gpu_busy"), ".2f"), fmt(r.get("gpu_mem_used_max_gib"), ".1f"),
                             fmt(tq.get("cold_start_s"), ".1f"), "-"))
        for r in tq.get("idle_single_job") or []:
            rows.append((f"queue 2K model idle {r['mode']}", "-", fmt(r["latency_s"]), "-", "-", "-", "-", "-"))
    vae = results.get("vae")
    if isinstance(vae, dict):
        for name, r in vae.items():
            if isinstance(r, dict):
                note = f" (max |d| {r['max_abs_8bit']:.0f}/255)" if "max_abs_8bit" in r else ""
                rows.append((f"VAE decode {name}{note}", "-", fmt(r.get("p50_s")), fmt(r.get("p95_s")), "-",
                             fmt(r.get("peak_gib"), ".1f"), fmt(r.get("compile_s"), ".1f"), "-"))
    scopes = results.get("scopes")
    if isinstance(scopes, dict):
        for scope in ("model", "blocks"):
            res = scopes.get(scope)
            if isinstance(res, dict):
                for mode in ("exact", "fast"):
                    r = res.get(mode) or {}
                    rows.append((f"render {mode}, compile {scope}", fmt(r.get("images_per_s")), fmt(r.get("p50_s")),
                                 fmt(r.get("p95_s")), fmt(r.get("gpu_busy"), ".2f"), fmt(r.get("peak_gib"), ".1f"),
                                 fmt(res.get("cold_compile_and_warmup_s"), ".1f") + " (compile)",
                                 ratio(r.get("images_per_s"))))
        for name, r in (scopes.get("batching_blocks") or {}).items():
            rows.append((f"exact {name}, per image", "-", fmt(r.get("p50_s")), fmt(r.get("p95_s")), "-", "-", "-",
                         fmt(r.get("per_image_vs_batch_1", 1.0), ".3f") + " of b1"))
    extra = {k: results[k] for k in ("attention", "encode") if isinstance(results.get(k), dict)}
    off = results.get("offload")
    if isinstance(off, dict):
        for mode in ("exact", "fast"):
            r = off.get(mode)
            if r:
                rows.append((f"offload {mode}", "-", fmt(r["second_s"]), "-", "-", fmt(r.get("peak_gib"), ".1f"),
                             "-", "-"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    for name, res in extra.items():
        lines.append(f"{name}: {json.dumps(res, default=str)}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    labels, values = [], []
    for line in table(results).splitlines()[2:]:
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 2:  # the JSON lines under the table
            continue
        with contextlib.suppress(ValueError):
            values.append(float(cells[1]))
            labels.append(cells[0])
    if not values:
        return
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(values) + 1))
    ax.barh(labels[::-1], values[::-1])
    ax.set_xlabel("images/s (1024², 20 steps, CFG 4.5)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def environment(ctx: Context) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "argv": sys.argv,
        "device": ctx.device, "size": ctx.size, "images": ctx.args.images,
    }
    with contextlib.suppress(Exception):
        import diffusers
        import transformers

        info.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    if ctx.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    p.add_argument("--tiny", action="store_true", help="CPU, the tiny test model, 256²")
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--phases", default="build,card,inprocess,queue")
    p.add_argument("--compile-modes", default="default", help="comma list; 'none' for eager")
    p.add_argument("--compile-scope", default="model", choices=("blocks", "model"))
    p.add_argument("--twok-backends", default="default", help="comma list of SDPA backends for exact 2048²: "
                   "default, cudnn, flash, efficient")
    p.add_argument("--queue-variants", default="", help="comma list of SCOPE:ENCODE_THREADS, one queue run each "
                   "(e.g. blocks:0,blocks:1,model:0)")
    p.add_argument("--compile-cache", type=Path, default=Path("/tmp/pixq-bench/inductor"))
    p.add_argument("--twok-compile", default=COMPILE_NONE)
    p.add_argument("--twok-images", type=int, default=2)
    p.add_argument("--coldsplit-starts", default="cold_cache,warm_cache,warm_cache_exact_warmup_only")
    p.add_argument("--twok-tile-above", type=int, default=0, help="the 2K phase's VAE tiling threshold (pixels)")
    p.add_argument("--twok-queue-images", type=int, default=6)
    p.add_argument("--native-modes", default="fast", help="comma list: modes rendered at 4096² natively")
    p.add_argument("--vae-compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--fidelity", type=int, default=4)
    p.add_argument("--deadline-s", type=float, default=540, help="optional phases are skipped past this")
    p.add_argument("--worker-timeout-s", type=float, default=420)
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--keep-logs", action="store_true", help="service and worker logs under OUT")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        device, size = "cpu", 256
        model_dir = args.model_dir or Path("/tmp/pixq-bench/tiny-model")
    else:
        device, size = "cuda:0", 1024
        model_dir = args.model_dir or Path(GPU_MODEL)
    ctx = Context(args, args.out, device, size, model_dir.resolve())
    previous = args.out / "results.json"
    if previous.exists():
        ctx.results = json.loads(previous.read_text())
    ctx.results["env"] = environment(ctx)
    modes = [m for m in args.compile_modes.split(",") if m]
    phases = [ph for ph in args.phases.split(",") if ph]
    try:
        for phase in phases:
            if ctx.elapsed() > args.deadline_s and phase not in ("build",):
                ctx.results.setdefault("skipped", []).append(phase)
                continue
            log.info("== phase %s (%.0f s in)", phase, ctx.elapsed())
            try:
                if phase == "queue" and args.queue_variants:
                    for mode in modes:
                        for variant in args.queue_variants.split(","):
                            if ctx.elapsed() < args.deadline_s:
                                phase_queue(ctx, mode, variant)
                elif phase in ("inprocess", "queue", "coldstart", "multigpu"):
                    for mode in modes:
                        {"inprocess": phase_inprocess, "queue": phase_queue, "coldstart": phase_coldstart,
                         "multigpu": phase_multigpu}[phase](ctx, mode)
                else:
                    {"build": phase_build, "card": phase_card, "twok": phase_twok, "offload": phase_offload,
                     "levers": phase_levers, "coldsplit": phase_coldsplit, "scopes": phase_scopes,
                     "attention": phase_attention, "encode": phase_encode, "twokqueue": phase_twokqueue,
                     "vae": phase_vae}[phase](ctx)
            except Exception as exc:
                traceback.print_exc()
                ctx.results.setdefault("errors", {})[phase] = f"{type(exc).__name__}: {exc}"
                free_cuda()
            ctx.results.setdefault("phase_s", {})[phase] = ctx.elapsed()
            ctx.save()
    finally:
        for svc in reversed(ctx.services):
            svc.stop()
        ctx.save()
    plot(ctx.results, args.out / "throughput.png")
    print(json.dumps({k: v for k, v in ctx.results.items() if k in ("errors", "skipped", "phase_s")}, default=str))
    print(table(ctx.results))
    return 1 if ctx.results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
