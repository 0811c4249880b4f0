"""Rendering one request with diffusers' ``PixArtSigmaPipeline``, and encoding the images."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from producer.schema import JobRequest, OutputFormat

# PNG at zlib level 1 is several times faster than Pillow's default 6 and still lossless.
_SAVE_OPTIONS: dict[OutputFormat, dict[str, Any]] = {
    OutputFormat.png: {"format": "PNG", "compress_level": 1},
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


def render(pipe: Any, request: JobRequest, on_step: Callable[[int], None] | None = None) -> list[Any]:
    """Run the pipeline for ``request``; ``on_step(steps_done)`` runs after every denoising step.

    An exception raised by ``on_step`` (cancel, deadline) stops the render at that step.
    """
    import torch

    # PixArtSigmaPipeline takes the older ``callback(step, timestep, latents)`` (it silently
    # ignores ``callback_on_step_end``); it runs after every denoising step.
    def step_end(index: int, _timestep: Any, _latents: Any) -> None:
        if on_step is not None:
            on_step(index + 1)

    gens = generators(request)
    with torch.inference_mode():
        out = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            width=request.width,
            height=request.height,
            num_images_per_prompt=request.num_images_per_prompt,
            generator=gens if len(gens) > 1 else gens[0],
            callback=step_end,
            callback_steps=1,
            output_type="pil",
        )
    return list(out.images)


def encode(image: Any, fmt: OutputFormat) -> bytes:
    buf = io.BytesIO()
    image.save(buf, **_SAVE_OPTIONS[fmt])
    return buf.getvalue()
