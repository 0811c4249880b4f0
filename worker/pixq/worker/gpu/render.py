"""Rendering one request with diffusers' ``PixArtSigmaPipeline`` (one batch of one: pixq.worker.gpu.batch),
and encoding the images."""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable
from typing import Any

from pixq.records import RenderInfo
from pixq.schema import JobRequest, OutputFormat, RenderMode
from pixq.worker.gpu.fastmode import measured_difference
from pixq.worker.gpu.png import encode_png
from pixq.worker.gpu.speedups import RenderSpeedups

# PNG goes through pixq.worker.gpu.png (zlib level 1, on several cores); the others through Pillow.
PNG_LEVEL = 1
_SAVE_OPTIONS: dict[OutputFormat, dict[str, Any]] = {
    OutputFormat.webp: {"format": "WEBP", "quality": 90, "method": 4},
    OutputFormat.jpeg: {"format": "JPEG", "quality": 92},
}


def generators(request: JobRequest) -> list[Any]:
    """One CPU generator per image, image i seeded with ``seed + i``.

    CPU generators draw the same noise on any device, so a seed means the same image
    on a GPU worker and on a CPU one (up to arithmetic differences).
    """
    import torch

    return [torch.Generator("cpu").manual_seed(seed) for seed in request.image_seeds()]


def _pipe_and_speedups(target: Any) -> tuple[Any, RenderSpeedups]:
    """A ``LoadedPipeline``'s pipe and accelerator, or a bare pipeline and the accelerator on it."""
    speedups: RenderSpeedups | None = getattr(target, "speedups", None)
    pipe = target.pipe if speedups is not None else target
    return pipe, speedups or RenderSpeedups.of(pipe)


def render(target: Any, request: JobRequest, on_step: Callable[[int], None] | None = None) -> list[Any]:
    """Run the pipeline for ``request``; ``on_step(steps_done)`` runs after every denoising step.

    ``target`` is a ``LoadedPipeline`` (preferred: it carries the worker's compiled transformer and
    prompt cache) or a bare ``PixArtSigmaPipeline`` (its accelerator is found on it, or a plain one
    is attached). ``request.mode`` picks the plain computation (``exact``) or fast mode's step plan
    (``fast``, worker/pixq/worker/gpu/fastmode.py) on the same pipeline; ``request.scheduler`` the sampler,
    a new scheduler for this call (worker/pixq/worker/gpu/samplers.py). An exception raised by ``on_step``
    (cancel, deadline) stops the render at that step.
    """
    from pixq.worker.gpu.batch import render_batch

    return render_batch(target, [request], on_step)[0]


def render_info(target: Any, request: JobRequest, render_s: float, batch_images: int | None = None,
                batch_jobs: int = 1) -> RenderInfo:
    """How the last ``render`` (or ``render_batch`` of ``batch_jobs`` jobs, ``batch_images`` images)
    on ``target`` went, for the job record (read it before the next render)."""
    _, speedups = _pipe_and_speedups(target)
    images = batch_images or request.num_images_per_prompt
    width, height, tiled = speedups.vae_decode.last or (request.width, request.height, False)
    fast = RenderMode(request.mode) is RenderMode.fast
    return RenderInfo(
        mode=request.mode, scheduler=request.scheduler, width=width, height=height,
        resized=(width, height) != (request.width, request.height),
        vae_tiled=tiled, transformer_rows_per_image=speedups.controller.stats.rows // images,
        render_s=round(render_s, 3), difference_from_exact=measured_difference(request.scheduler) if fast else None,
        batch_images=images, batch_jobs=batch_jobs,
    )


def to_pil(images: Any) -> list[Any]:
    """The pipeline's ``pt`` output (denormalised, N×3×H×W in [0, 1]) as PIL images.

    The same arithmetic as diffusers' ``output_type="pil"`` (float32, ×255, round half to even,
    uint8), so the pixels are identical, but done on the device: only the uint8 image crosses
    to the host (3 MB at 1024² instead of a 12 MB float32 copy converted on the CPU).
    """
    import torch
    from PIL import Image

    pixels = images.float().mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(image) for image in pixels]


def _step_callback(pipe: Any, on_step: Callable[[int], None] | None) -> dict[str, Any]:
    """The pipeline's per-step hook: ``callback_on_step_end`` where it has one, else ``callback``.

    diffusers' ``PixArtSigmaPipeline`` (0.42) only has the older ``callback(step, t, latents)``;
    an unknown ``callback_on_step_end`` would be swallowed by its ``**kwargs`` and never called.
    """
    if on_step is None:
        return {}
    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:

        def step_end(_pipe: Any, index: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(index + 1)
            return tensors

        return {"callback_on_step_end": step_end}

    def step(index: int, _timestep: Any, _latents: Any) -> None:
        on_step(index + 1)

    return {"callback": step, "callback_steps": 1}


def encode(image: Any, fmt: OutputFormat, threads: int = 0) -> bytes:
    """``image`` in ``fmt``; PNG on ``threads`` threads (0: ``pixq.worker.gpu.png``'s default)."""
    if fmt is OutputFormat.png:
        return encode_png(image, PNG_LEVEL, threads=threads)
    buf = io.BytesIO()
    image.save(buf, **_SAVE_OPTIONS[fmt])
    return buf.getvalue()
