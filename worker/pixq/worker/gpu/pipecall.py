"""The pieces of one call of diffusers' pipeline that ``render`` and ``render_batch`` share.

Which pipe and speed-ups a target carries, one CPU generator per image, the per-step hook and the
call's ``pt`` output as PIL images. Below both ``render.py`` (one request) and ``batch.py`` (several
in one call), so neither reaches into the other.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from pixq.schema import JobRequest
from pixq.worker.gpu.speedups import RenderSpeedups


def generators(request: JobRequest) -> list[Any]:
    """One CPU generator per image, image i seeded with ``seed + i``.

    CPU generators draw the same noise on any device, so a seed means the same image
    on a GPU worker and on a CPU one (up to arithmetic differences).
    """
    import torch

    return [torch.Generator("cpu").manual_seed(seed) for seed in request.image_seeds()]


def pipe_and_speedups(target: Any) -> tuple[Any, RenderSpeedups]:
    """A ``LoadedPipeline``'s pipe and speed-ups, or a bare pipeline and the speed-ups on it."""
    speedups: RenderSpeedups | None = getattr(target, "speedups", None)
    pipe = target.pipe if speedups is not None else target
    return pipe, speedups or RenderSpeedups.of(pipe)


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


def step_callback(pipe: Any, on_step: Callable[[int], None] | None) -> dict[str, Any]:
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
