"""twok: the 2K architecture in process at 2048² (fast, exact per SDPA backend) and 4096² (binned, native)."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.context import COMPILE_NONE, Context
from benchmarks.inproc import diff_summary, sdpa_backend
from benchmarks.measure import free_cuda, image_diff, peak_gib, reset_peak, summary

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
    speedups = RenderSpeedups(pipe, SpeedupOptions(compile=compiled, compile_mode=ctx.args.twok_compile if compiled
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
            with sdpa_backend(backend):
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
        res[f"{side}_exact_vs_fast"] = {"n": len(pairs), **diff_summary(pairs), "pairs": pairs}
    big = 4 * ctx.size
    for mode, binned in [("fast", True)] + [(m, False) for m in ctx.args.native_modes.split(",") if m]:
        key = f"{big}_{mode}" + ("" if binned else "_native")
        if ctx.elapsed() > ctx.args.deadline_s:
            res[key] = "skipped: deadline"
            continue
        reset_peak(ctx.device)
        tiled = speedups.vae_decode.tiled
        t0 = time.perf_counter()
        try:
            out = render(pipe, ctx.request(0, mode, width=big, height=big, model_name=TWOK_MODEL,
                                           use_resolution_binning=binned))
        except Exception as exc:
            res[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        res[key] = {"s": time.perf_counter() - t0, "peak_gib": peak_gib(ctx.device), "size": list(out[0].size),
                    "tiled_decodes": speedups.vae_decode.tiled - tiled}
        ctx.save()
    del pipe, transformer, speedups
    free_cuda()
    ctx.save()


def run(ctx: Context) -> None:
    phase_twok(ctx)
