"""Loading one PixArt-Σ pipeline onto one device, the model card's way."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pixq.models import BASE_COMPONENTS, is_local
from pixq.worker.gpu.compile import configure_compile_cache
from pixq.worker.gpu.speedups import RenderSpeedups, SpeedupOptions

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class LoadedPipeline:
    """What a worker process keeps: the pipeline and its per-process speed-ups (``RenderSpeedups``).

    Pass this object (not ``.pipe``) to ``render``; a bare pipe also works, its speed-ups are
    attached to it.
    """

    pipe: Any  # diffusers.PixArtSigmaPipeline
    model_name: str
    device: str
    dtype: str
    load_s: float
    accel: RenderSpeedups | None = None
    warmup_s: float = 0.0
    warmed: list[str] = field(default_factory=list)  # "1024x1024/exact", ...


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> ``(1024, 768)`` (width, height); ``"1024"`` -> square."""
    w, _, h = text.lower().partition("x")
    try:
        width, height = int(w), int(h or w)
    except ValueError:
        raise ValueError(f"size must look like 1024x1024 (got {text!r})") from None
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise ValueError(f"size must be positive multiples of 8 (got {text!r})")
    return width, height


def resolve_dtype(device: str, dtype: str) -> Any:
    import torch

    if dtype == "auto":
        # bf16 on GPUs: T5 overflows in fp16 on real weights; fp32 on the CPU.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_pipeline(
    model_name: str,
    device: str = "cpu",
    dtype: str = "auto",
    offload: bool = False,
    accel: SpeedupOptions | None = None,
    compile_cache: str | None = None,
    warmup: Sequence[tuple[int, int]] = (),
    warmup_modes: Sequence[str] = ("exact", "fast"),
    batch_for: Callable[[int, int], int] | None = None,
) -> LoadedPipeline:
    """Load ``model_name`` once onto ``device``, then compile and warm up as asked.

    A hub checkpoint loads its ``transformer`` subfolder beside the shared T5, tokenizer,
    SDXL VAE and scheduler (``BASE_COMPONENTS``), as the model card does; a local directory
    is one whole pipeline saved with ``save_pretrained``. ``offload`` keeps idle components
    in host memory (``enable_model_cpu_offload``) for cards of 24 GB or less.

    ``accel`` sets the worker's speed-ups (pixq.worker.gpu.speedups): ``compile`` (the transformer, with
    inductor's caches in ``compile_cache`` when given), prompt cache, text trimming, fast plan.
    ``warmup`` renders one short job per (width, height) and mode in ``warmup_modes`` so that
    compilation and kernel selection happen before the first real job.
    """
    import torch
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    started = time.perf_counter()
    if compile_cache:
        configure_compile_cache(compile_cache)
    torch_dtype = resolve_dtype(device, dtype)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if is_local(model_name):
        pipe = PixArtSigmaPipeline.from_pretrained(model_name, torch_dtype=torch_dtype)
    else:
        transformer = PixArtTransformer2DModel.from_pretrained(
            model_name, subfolder="transformer", torch_dtype=torch_dtype
        )
        pipe = PixArtSigmaPipeline.from_pretrained(BASE_COMPONENTS, transformer=transformer, torch_dtype=torch_dtype)
    if offload and device.startswith("cuda"):
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    options = accel or SpeedupOptions()
    if options.compile and offload:
        log.warning("--compile is ignored with --offload (offload hooks move weights under the compiled graph)")
        options = replace(options, compile=False)
    loaded = LoadedPipeline(pipe, model_name, device, str(torch_dtype).removeprefix("torch."), 0.0)
    loaded.accel = RenderSpeedups(pipe, options)
    loaded.load_s = time.perf_counter() - started
    log.info("loaded %s on %s as %s in %.1f s", model_name, device, torch_dtype, loaded.load_s)
    if warmup:
        warm_up(loaded, warmup, warmup_modes, batch_for)
    return loaded


def warm_up(loaded: LoadedPipeline, sizes: Sequence[tuple[int, int]], modes: Sequence[str],
            batch_for: Callable[[int, int], int] | None = None) -> None:
    """Render one job per size and mode (compiles the graphs those shapes need, selects kernels);
    with a compiled transformer and ``batch_for(width, height)`` > 1, a batch of jobs too (their one
    graph with a symbolic batch size serves every batch, pixq.worker.gpu.batch)."""
    from pixq.schema import JobRequest, RenderMode
    from pixq.worker.gpu.batch import render_batch
    from pixq.worker.gpu.render import render

    started = time.perf_counter()
    for width, height in sizes:
        for mode in modes:
            t0 = time.perf_counter()
            request = JobRequest.model_validate({
                "prompt": "warm-up: a red cube on a blue sphere", "width": width, "height": height, "seed": 0,
                "model_name": loaded.model_name, "mode": RenderMode(mode),
            })
            render(loaded, request)
            batch = min(batch_for(width, height), 4) if batch_for is not None else 1
            if batch > 1 and loaded.accel is not None and loaded.accel.options.compile:
                render_batch(loaded, [request.model_copy(update={"seed": i}) for i in range(batch)])
            loaded.warmed.append(f"{width}x{height}/{mode}")
            log.info("warm-up %dx%d %s: %.1f s", width, height, mode, time.perf_counter() - t0)
    loaded.warmup_s += time.perf_counter() - started
