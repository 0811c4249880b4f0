"""scopes: compile scope (whole forward vs regional blocks) from an empty cache, and micro-batching."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.context import Context
from benchmarks.inproc import render_stream
from benchmarks.measure import free_cuda, summary, sync


def phase_scopes(ctx: Context) -> None:
    """Compile scope: the whole forward as one graph vs one graph shared by the blocks (regional).

    Each from an empty inductor cache (compile time = warm-up of exact and fast), then the same
    exact and fast streams. The blocks' cache is left in ``--compile-cache`` for later phases.
    Then micro-batching on the blocks pipeline: per-image time of one call with 1, 2, 4 images.
    """
    import torch
    from pixq.worker.gpu.pipeline import PipelineOptions, load_pipeline
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
        loaded = load_pipeline(str(ctx.model_dir), ctx.device, PipelineOptions(
            speedups=SpeedupOptions(compile=True, compile_scope=scope), compile_cache=str(cache),
            warmup=[(ctx.size, ctx.size)], warmup_modes=("exact", "fast")))
        item: dict[str, Any] = {"cold_compile_and_warmup_s": loaded.warmup_s}
        item["exact"] = render_stream(ctx, loaded, "exact", offset=0)
        item["fast"] = render_stream(ctx, loaded, "fast", offset=0)
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


def run(ctx: Context) -> None:
    phase_scopes(ctx)
