"""Several compatible jobs in one pipeline call: which jobs can share one, how many, and the call.

At 512² one job cannot fill a large GPU: the transformer's time per image at 20 steps halves
from 1 to 4 images per call on an H200 (docs/performance.md), while at 1024² the GPU is already
full. ``render_batch`` runs the jobs of a batch as one call of diffusers' pipeline:

* every image keeps its own CPU generator (job seed + i), so the initial noise of an image is
  the same as when its job runs alone; the pipeline draws each image's latents from its own
  generator, whatever the batch;
* the prompts that are not cached go through T5 in one call; each row of the batch gets its own
  prompt's embeddings (and its job's negative prompt); the text is trimmed to the bucket of the
  batch's longest prompt (padding is masked out exactly, so this changes summation order only);
* guidance scale, steps, size, mode (fast mode's per-step plan applies to all rows alike), the
  sampler and the VAE decode are shared: ``batch_key`` says what must be equal;
* the call steps its own scheduler, new from the checkpoint's config (``pixq.worker.gpu.samplers``); a
  stochastic sampler's noise comes from each image's own generator (diffusers' ``randn_tensor`` draws
  row i from generator i), so it too is the same in a batch as alone.

An image rendered in a batch equals the same job alone up to the arithmetic's batch invariance
(measured: tests/test_batching.py on the CPU; docs/performance.md on an H200).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pixq.schema import JobRequest, RenderMode, Scheduler
from pixq.worker.gpu.pipecall import generators, pipe_and_speedups, step_callback, to_pil
from pixq.worker.gpu.samplers import build_scheduler, checkpoint_config, with_scheduler

# Default images per pipeline call, by the pixels the pipeline renders (most pixels, images); larger: one
# image per call. Measured on an H200 (2026-12-01, docs/performance.md, "Micro-batching"): at 512² one
# image keeps the GPU busy for about half its render, and 8 per call (their static compiled graphs) give
# 4.1-4.5x the model card exact, 6.2-6.6x fast, against 1.5x / 2.0x one at a time; at 1024² the GPU is
# already full (the transformer's time per image is flat from 1 to 8 images), so one image per call.
DEFAULT_MAX_BATCH: tuple[tuple[int, int], ...] = ((512 * 512, 8),)


def rendered_pixels(trained_side: int, width: int, height: int, binned: bool) -> int:
    """Pixels one image of a job renders at: with resolution binning about the model's trained size
    squared (the bins of a trained size all hold about as many pixels), else the size asked for."""
    return trained_side * trained_side if binned and trained_side > 0 else width * height


@dataclass(frozen=True)
class BatchPolicy:
    """How many images one pipeline call may hold; ``max_batch`` 0 means the per-size default."""

    max_batch: int = 0
    gather_window_s: float = 0.0  # how long the first job of a batch may wait for partners
    trained_side: int = 0  # the model's trained size in pixels (8 × the transformer's sample size); 0: unknown
    # The per-size defaults were measured on a GPU; on a CPU one image already fills the device: one per call.
    by_size: bool = True

    def for_model(self, sample_size: int) -> BatchPolicy:
        """This policy for a model whose transformer works on a ``sample_size``² latent grid."""
        return replace(self, trained_side=8 * int(sample_size))

    def limit(self, width: int, height: int, binned: bool = False) -> int:
        """Images per call for a job of this size (``binned``: rendered at a trained bin, not as asked)."""
        if self.max_batch > 0:
            return self.max_batch
        if not self.by_size:
            return 1
        pixels = rendered_pixels(self.trained_side, width, height, binned)
        return next((n for most, n in DEFAULT_MAX_BATCH if pixels <= most), 1)

    def largest(self) -> int:
        """The most images a call gets for this model's usual job (binned: its trained size)."""
        if self.max_batch > 0 or self.trained_side <= 0:
            return self.limit(512, 512)
        return self.limit(self.trained_side, self.trained_side, binned=True)


BatchKey = tuple[Any, ...]


def batch_key(request: JobRequest) -> BatchKey:
    """Jobs with equal keys can share a pipeline call (and nothing else can)."""
    return (request.model_name, request.width, request.height, request.use_resolution_binning,
            request.num_inference_steps, request.guidance_scale, RenderMode(request.mode).value,
            request.output_format.value, Scheduler(request.scheduler).value)


def render_batch(
    target: Any, requests: Sequence[JobRequest], on_step: Callable[[int], None] | None = None
) -> list[list[Any]]:
    """Render ``requests`` (equal ``batch_key``) in one pipeline call; a list of PIL images per request.

    ``on_step(steps_done)`` runs after every denoising step of the call; an exception it raises
    stops the whole call.
    """
    import torch

    if not requests:
        return []
    keys = {batch_key(r) for r in requests}
    if len(keys) > 1:
        raise ValueError(f"jobs of one batch must agree on model, size, steps, guidance, mode, format and "
                         f"sampler: {keys}")
    pipe, speedups = pipe_and_speedups(target)
    call = with_scheduler(pipe, build_scheduler(checkpoint_config(target), requests[0].scheduler))
    first = requests[0]
    guided = first.guidance_scale > 1.0
    gens = [g for r in requests for g in generators(r)]
    with torch.inference_mode():
        prompts = batch_prompt_kwargs(speedups, requests, guided)
        plan = speedups.plan(RenderMode(first.mode) is RenderMode.fast, first.num_inference_steps, guided)
        with speedups.controller.planned(plan, order=speedups.options.fast_plan.order):
            out = call(
                **prompts,
                num_inference_steps=first.num_inference_steps,
                guidance_scale=first.guidance_scale,
                width=first.width,
                height=first.height,
                num_images_per_prompt=1,  # the rows are already one per image
                generator=gens if len(gens) > 1 else gens[0],
                use_resolution_binning=first.use_resolution_binning,
                output_type="pt",
                **step_callback(call, on_step),
            )
        images = to_pil(out.images)
    split: list[list[Any]] = []
    for r in requests:
        split.append(images[: r.num_images_per_prompt])
        images = images[r.num_images_per_prompt:]
    return split


def encode_prompts(speedups: Any, texts: Sequence[str]) -> list[Any]:
    """The ``Encoded`` T5 output of each text; the ones not cached in one T5 call."""
    from pixq.worker.gpu.textcache import MAX_SEQUENCE_LENGTH, Encoded

    found: dict[str, Any] = {}
    missing: list[str] = []
    for text in dict.fromkeys(texts):
        item = speedups.cache.get((text, MAX_SEQUENCE_LENGTH, True))
        if item is None:
            missing.append(text)
        else:
            found[text] = item
    if len(missing) == 1:
        found[missing[0]] = speedups.encode(missing[0])  # counted once more as a miss: same as alone
    elif missing:
        embeds, mask, _, _ = speedups.pipe.encode_prompt(
            missing, do_classifier_free_guidance=False, num_images_per_prompt=1,
            device=speedups.pipe._execution_device, clean_caption=True, max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        for i, text in enumerate(missing):
            item = Encoded(embeds[i : i + 1].clone(), mask[i : i + 1].clone(), int(mask[i].sum().item()))
            speedups.cache.put((text, MAX_SEQUENCE_LENGTH, True), item)
            found[text] = item
    return [found[t] for t in texts]


def batch_prompt_kwargs(speedups: Any, requests: Sequence[JobRequest], guided: bool) -> dict[str, Any]:
    """``prompt_embeds`` & co. with one row per image of ``requests``, trimmed to the longest prompt's bucket."""
    import math

    import torch

    counts = [r.num_images_per_prompt for r in requests]
    texts = [r.prompt for r in requests] + ([r.negative_prompt for r in requests] if guided else [])
    encoded = encode_prompts(speedups, texts)
    pos, neg = encoded[: len(requests)], encoded[len(requests):]
    length = pos[0].embeds.shape[1]
    if speedups.options.trim_text:
        tokens = max([e.tokens for e in encoded] + [1])
        bucket = max(1, speedups.options.text_bucket)
        length = min(length, math.ceil(tokens / bucket) * bucket)

    def rows(items: Sequence[Any], name: str) -> Any:
        parts = [getattr(e, name)[:, :length] for e, n in zip(items, counts, strict=True) for _ in range(n)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    kwargs: dict[str, Any] = {
        "prompt_embeds": rows(pos, "embeds"),
        "prompt_attention_mask": rows(pos, "mask"),
        "negative_prompt": None,  # the pipeline refuses a negative prompt beside its embeddings
    }
    if guided:
        kwargs["negative_prompt_embeds"] = rows(neg, "embeds")
        kwargs["negative_prompt_attention_mask"] = rows(neg, "mask")
    return kwargs
