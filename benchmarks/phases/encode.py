"""encode: the idle path after the VAE: device -> PIL image, then PNG (Pillow vs pixq.worker.gpu.png)."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from benchmarks.context import Context
from benchmarks.measure import sync


def phase_encode(ctx: Context) -> None:
    """The idle path after the VAE: device → PIL image, then PNG: Pillow vs pixq.worker.gpu.png."""
    import io

    import numpy as np
    import torch
    from PIL import Image
    from pixq.worker.gpu.pipecall import to_pil
    from pixq.worker.gpu.png import encode_png

    res: dict[str, Any] = {"cpus": os.cpu_count()}
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:ctx.size, 0:ctx.size]
    smooth = np.stack([x % 256, y % 256, (x // 4 + y // 4) % 256], -1).astype(np.uint8)
    images = {"noise": rng.integers(0, 256, (ctx.size, ctx.size, 3), dtype=np.uint8), "smooth": smooth}

    def timed(fn: Any, n: int = 9) -> tuple[float, Any]:
        out, times = None, []
        for _ in range(n):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3, out

    for name, arr in images.items():
        image = Image.fromarray(arr)

        def pillow(image: Any = image) -> bytes:
            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=1)
            return buf.getvalue()

        pil_ms, pil_bytes = timed(pillow)
        ours_ms, ours_bytes = timed(lambda image=image: encode_png(image, 1))
        res[name] = {"pillow_level1_ms": pil_ms, "pillow_mb": len(pil_bytes) / 1e6,
                     "worker_png_ms": ours_ms, "worker_png_mb": len(ours_bytes) / 1e6}
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=8)
    decoded = torch.rand(1, 3, ctx.size, ctx.size, device=ctx.device, dtype=torch.bfloat16) * 2 - 1

    def pil_way() -> Any:
        out = proc.postprocess(decoded, output_type="pil")
        sync(ctx.device)
        return out

    def device_way() -> Any:
        out = to_pil(proc.postprocess(decoded, output_type="pt"))
        sync(ctx.device)
        return out

    res["to_pil_diffusers_ms"], a = timed(pil_way)
    res["to_pil_on_device_ms"], b = timed(device_way)
    res["to_pil_identical"] = bool(np.array_equal(np.asarray(a[0]), np.asarray(b[0])))
    ctx.results["encode"] = res


def run(ctx: Context) -> None:
    phase_encode(ctx)
