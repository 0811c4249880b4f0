"""In-process rendering for the phases that load the pipeline themselves: the worker's pipeline, a fresh
prompt cache, a timed render stream, difference summaries and a forced SDPA backend."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from benchmarks.context import COMPILE_NONE, Context
from benchmarks.measure import gpu_sampler, peak_gib, reset_peak, summary, sync


def load_worker_pipeline(ctx: Context, compile_mode: str, **kwargs: Any) -> Any:
    from pixq.worker.gpu.pipeline import PipelineOptions, load_pipeline
    from pixq.worker.gpu.speedups import SpeedupOptions

    compiled = compile_mode != COMPILE_NONE
    options = SpeedupOptions(compile=compiled, compile_mode=compile_mode if compiled else "default",
                           compile_scope=ctx.args.compile_scope)
    return load_pipeline(str(ctx.model_dir), ctx.device, PipelineOptions(
        speedups=options, compile_cache=str(ctx.args.compile_cache), warmup=[(ctx.size, ctx.size)],
        warmup_modes=("exact", "fast"), **kwargs,
    ))


def fresh_prompt_cache(loaded: Any) -> None:
    """A steady-state worker: the empty negative cached, these prompts not yet seen."""
    import torch
    from pixq.worker.gpu.textcache import PromptCache

    loaded.speedups.cache = PromptCache(loaded.speedups.options.prompt_cache)
    with torch.inference_mode():
        loaded.speedups.encode("")


def render_stream(ctx: Context, loaded: Any, mode: str, offset: int) -> dict[str, Any]:
    from pixq.worker.gpu.render import render

    fresh_prompt_cache(loaded)
    reset_peak(ctx.device)
    times = []
    rows = []
    with gpu_sampler() as gpu:
        for i in range(ctx.args.images):
            sync(ctx.device)
            t0 = time.perf_counter()
            render(loaded, ctx.request(offset + i, mode))
            times.append(time.perf_counter() - t0)
            rows.append(loaded.speedups.controller.stats.rows)
    return {**summary(times), "peak_gib": peak_gib(ctx.device), "transformer_rows_per_image": rows[-1],
            **gpu.result()}


def diff_summary(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Worst and mean of ``image_diff`` rows (and of their latent differences where measured)."""
    out = {"psnr_db_min": min(x["psnr_db"] for x in items),
           "psnr_db_mean": sum(x["psnr_db"] for x in items) / len(items),
           "max_abs": max(x["max_abs"] for x in items)}
    if all("latent_rel" in x for x in items):
        out["latent_rel_max"] = max(x["latent_rel"] for x in items)
    return out


@contextlib.contextmanager
def sdpa_backend(name: str) -> Iterator[None]:
    """Force one scaled-dot-product-attention backend (eager calls) or leave torch's choice."""
    if name == "default":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    with sdpa_kernel(backend):
        yield
