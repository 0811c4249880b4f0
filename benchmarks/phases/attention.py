"""attention: PixArt-Σ's self-attention per SDPA backend at 1024² and 2048² (CUDA only)."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.context import Context
from benchmarks.inproc import sdpa_backend
from benchmarks.measure import free_cuda, sync


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
                with sdpa_backend(name):
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


def run(ctx: Context) -> None:
    phase_attention(ctx)
