"""twokqueue: 2048² jobs end to end through a ``pixq worker`` serving a saved 2K model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.context import Context
from benchmarks.measure import free_cuda
from benchmarks.services import idle_single_jobs, queue_stream, serving_worker


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
    import dataclasses

    res: dict[str, Any] = {}
    ctx.results["twokqueue"] = res
    args = argparse.Namespace(**{**vars(ctx.args), "images": ctx.args.twok_queue_images})
    sub = dataclasses.replace(ctx, args=args, size=2 * ctx.size, model_dir=_twok_model(ctx))
    sub.env = ctx.env
    with serving_worker(sub, ctx.args.twok_compile, ctx.args.compile_cache, "worker-2k") as (client, first, cold):
        ctx.env = sub.env
        res["cold_start_s"] = cold
        res["first_job_state"] = first.state.value
        ctx.save()
        res["fast"] = queue_stream(sub, client, "fast", offset=0)
        ctx.save()
        res["exact"] = queue_stream(sub, client, "exact", offset=0)
        ctx.save()
        res["idle_single_job"] = idle_single_jobs(sub, client, rounds=2, modes=("fast", "exact"))
    ctx.save()


def run(ctx: Context) -> None:
    phase_twokqueue(ctx)
