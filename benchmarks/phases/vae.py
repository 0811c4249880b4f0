"""vae: VAE decode at 1024² and 2048²: one piece vs tiled vs a compiled decoder."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.context import Context
from benchmarks.measure import peak_gib, reset_peak, summary, sync


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


def run(ctx: Context) -> None:
    phase_vae(ctx)
