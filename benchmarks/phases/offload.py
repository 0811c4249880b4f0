"""offload: ``--offload`` (enable_model_cpu_offload) renders (CUDA only)."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.context import Context
from benchmarks.measure import free_cuda, peak_gib, reset_peak


def phase_offload(ctx: Context) -> None:
    from pixq.worker.gpu.pipeline import PipelineOptions, load_pipeline
    from pixq.worker.gpu.render import render

    if not ctx.device.startswith("cuda"):
        ctx.results["offload"] = "skipped: needs a CUDA device"
        return
    reset_peak(ctx.device)
    loaded = load_pipeline(str(ctx.model_dir), ctx.device, PipelineOptions(offload=True))
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


def run(ctx: Context) -> None:
    phase_offload(ctx)
