"""inprocess[MODE]: ``pixq.worker.gpu.render`` on ``load_pipeline(...)`` with the levers, exact and fast
streams, the component breakdown, output differences, and the in-process job path (two threads, PNG, S3 put)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.context import PROMPTS, Context
from benchmarks.inproc import diff_summary, fresh_prompt_cache, load_worker_pipeline, render_stream
from benchmarks.measure import (
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
from benchmarks.services import services


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

    fresh_prompt_cache(loaded)
    req = ctx.request(len(PROMPTS) - 2)
    sync(ctx.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        encoded = loaded.speedups.encode(req.prompt)
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
    from pixq.worker.gpu.pipecall import generators
    from pixq.worker.gpu.render import render

    speedups = loaded.speedups
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

    plan = speedups.options.fast_plan
    for i in range(ctx.args.fidelity):
        req = ctx.request(i)

        def plain(req: Any = req) -> Any:
            with torch.inference_mode(), speedups.eager():
                return loaded.pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, width=req.width,
                                   height=req.height, generator=generators(req)[0]).images[0]

        got = {
            "plain": run(plain),
            "exact": run(lambda req=req: render(loaded, req)[0]),
            "fast": run(lambda i=i: render(loaded, ctx.request(i, "fast"))[0]),
        }
        speedups.options = dataclasses.replace(speedups.options, fast_plan=dataclasses.replace(plan, order=1))
        try:
            got["fast1"] = run(lambda i=i: render(loaded, ctx.request(i, "fast"))[0])
        finally:
            speedups.options = dataclasses.replace(speedups.options, fast_plan=plan)
        pairs["plain_vs_exact"].append(diff(got["exact"], got["plain"]))
        pairs["exact_vs_fast"].append(diff(got["fast"], got["exact"]))
        pairs["exact_vs_fast_order1"].append(diff(got["fast1"], got["exact"]))
        if i in ctx.ref:
            pairs["card_vs_plain"].append(diff(got["plain"], ctx.ref[i]))
            pairs["card_vs_exact"].append(diff(got["exact"], ctx.ref[i]))
    out: dict[str, Any] = dict(pairs)
    for key, items in pairs.items():
        if items:
            out[key + "_summary"] = diff_summary(items)
    if ctx.ref_t5 is not None:
        with torch.inference_mode():
            ours = speedups.encode(ctx.request(0).prompt).embeds.float().cpu()
        out["t5_card_vs_worker_rel"] = latent_rel(ours, ctx.ref_t5)
    return out


def _job_path(ctx: Context, loaded: Any, mode: str, offset: int) -> dict[str, Any]:
    """The queue's work without the queue: two threads, render under a lock, then PNG + S3 put."""
    from pixq.settings import Settings
    from pixq.worker.gpu.png import threads_for
    from pixq.worker.gpu.render import encode, render
    from pixq.worker.jobs.storage import Storage

    env = services(ctx)
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

    fresh_prompt_cache(loaded)
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
    loaded = load_worker_pipeline(ctx, compile_mode)
    res.update(load_s=loaded.load_s, warmup_s=loaded.warmup_s, warmed=loaded.warmed,
               peak_after_warmup_gib=peak_gib(ctx.device))
    ctx.save()
    res["exact"] = render_stream(ctx, loaded, "exact", offset=0)
    res["fast"] = render_stream(ctx, loaded, "fast", offset=0)
    res["breakdown_exact"] = _breakdown(ctx, loaded)
    res["fidelity"] = _fidelity(ctx, loaded)
    res["prompt_cache"] = {"hits": loaded.speedups.cache.hits, "misses": loaded.speedups.cache.misses}
    ctx.save()
    if not ctx.args.no_s3:
        try:
            res["job_path_exact"] = _job_path(ctx, loaded, "exact", offset=0)
            res["job_path_fast"] = _job_path(ctx, loaded, "fast", offset=0)
        except Exception as exc:  # the services are optional for this phase
            res["job_path_error"] = f"{type(exc).__name__}: {exc}"
    del loaded
    free_cuda()


def run(ctx: Context) -> None:
    for mode in ctx.compile_modes:
        phase_inprocess(ctx, mode)
