"""Rendering one request with diffusers' ``PixArtSigmaPipeline`` (one batch of one: pixq.worker.gpu.batch),
and encoding the images."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from pixq.records import RenderInfo
from pixq.schema import JobRequest, OutputFormat, RenderMode
from pixq.worker.gpu.batch import render_batch
from pixq.worker.gpu.fastmode import measured_difference
from pixq.worker.gpu.pipecall import pipe_and_speedups
from pixq.worker.gpu.png import encode_png

# PNG goes through pixq.worker.gpu.png (zlib level 1, on several cores); the others through Pillow.
PNG_LEVEL = 1
_SAVE_OPTIONS: dict[OutputFormat, dict[str, Any]] = {
    OutputFormat.webp: {"format": "WEBP", "quality": 90, "method": 4},
    OutputFormat.jpeg: {"format": "JPEG", "quality": 92},
}


def render(target: Any, request: JobRequest, on_step: Callable[[int], None] | None = None) -> list[Any]:
    """Run the pipeline for ``request``; ``on_step(steps_done)`` runs after every denoising step.

    ``target`` is a ``LoadedPipeline`` (preferred: it carries the worker's compiled transformer and
    prompt cache) or a bare ``PixArtSigmaPipeline`` (its speed-ups are found on it, or plain ones
    are attached). ``request.mode`` picks the plain computation (``exact``) or fast mode's step plan
    (``fast``, worker/pixq/worker/gpu/fastmode.py) on the same pipeline; ``request.scheduler`` the sampler,
    a new scheduler for this call (worker/pixq/worker/gpu/samplers.py). An exception raised by ``on_step``
    (cancel, deadline) stops the render at that step.
    """
    return render_batch(target, [request], on_step)[0]


def render_info(target: Any, request: JobRequest, render_s: float, batch_images: int | None = None,
                batch_jobs: int = 1) -> RenderInfo:
    """How the last ``render`` (or ``render_batch`` of ``batch_jobs`` jobs, ``batch_images`` images)
    on ``target`` went, for the job record (read it before the next render)."""
    _, speedups = pipe_and_speedups(target)
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


def encode(image: Any, fmt: OutputFormat, threads: int = 0) -> bytes:
    """``image`` in ``fmt``; PNG on ``threads`` threads (0: ``pixq.worker.gpu.png``'s default)."""
    if fmt is OutputFormat.png:
        return encode_png(image, PNG_LEVEL, threads=threads)
    buf = io.BytesIO()
    image.save(buf, **_SAVE_OPTIONS[fmt])
    return buf.getvalue()
