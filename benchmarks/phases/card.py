"""card: the model card's plain ``PixArtSigmaPipeline`` (fp16, eager, batch 1), the reference; keeps the
fidelity references (latents, images, T5 output) for later phases in ``ctx``."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.context import PROMPTS, Context
from benchmarks.measure import Timer, capture_vae_input, free_cuda, peak_gib, reset_peak, summary, sync


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


def run(ctx: Context) -> None:
    phase_card(ctx)
