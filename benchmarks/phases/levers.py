"""levers: one speed-up at a time on one bf16 pipeline, speed and output difference vs the plain call."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from benchmarks.context import PROMPTS, Context
from benchmarks.measure import capture_vae_input, free_cuda, image_diff, latent_rel, summary, sync


def phase_levers(ctx: Context) -> None:
    """One lever at a time on one bf16 pipeline: speed and output difference vs the plain call.

    plain: pipe(prompt strings), eager. cache: worker render with cached embeddings, eager, untrimmed.
    trim: + text trimming. compile: cached, compiled, untrimmed. exact: cached + trimmed + compiled
    (what exact mode ships).
    """
    import dataclasses

    import numpy as np
    import torch
    from pixq.worker.gpu.pipecall import generators
    from pixq.worker.gpu.pipeline import PipelineOptions, load_pipeline
    from pixq.worker.gpu.render import render
    from pixq.worker.gpu.speedups import SpeedupOptions

    loaded = load_pipeline(str(ctx.model_dir), ctx.device, PipelineOptions(
        speedups=SpeedupOptions(compile=True, trim_text=False, compile_scope=ctx.args.compile_scope),
        compile_cache=str(ctx.args.compile_cache)))
    speedups: Any = loaded.speedups
    base = speedups.options
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
                    with speedups.eager():
                        image = loaded.pipe(prompt=req.prompt, negative_prompt=req.negative_prompt,
                                            width=req.width, height=req.height,
                                            generator=generators(req)[0]).images[0]
                else:
                    eager, trim = how
                    speedups.options = dataclasses.replace(base, trim_text=trim)
                    with speedups.eager() if eager else contextlib.nullcontext():
                        image = render(loaded, req)[0]
            elapsed = time.perf_counter() - t0
            if i >= 0:
                times[name].append(elapsed)
                outputs[name][i] = (latents[-1], np.asarray(image))
    speedups.options = base
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


def run(ctx: Context) -> None:
    phase_levers(ctx)
