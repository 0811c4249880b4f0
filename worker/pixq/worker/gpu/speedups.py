"""Per-process speed-ups around one loaded ``PixArtSigmaPipeline`` (``RenderSpeedups``): what a worker keeps
between jobs. Its parts live in their own modules; this one puts them on a pipeline.

* prompt embeddings: the T5-XXL encoding of each prompt is kept in a small LRU on the device
  (``pixq.worker.gpu.textcache``); the empty negative prompt is encoded once;
* text trimming: T5 pads every prompt to 300 tokens and the cross-attention masks the padding
  out with a -10000 bias, whose softmax weight is exactly 0 in float32. Cutting the padded tail
  (rounded up to ``text_bucket`` tokens) changes only summation order, and saves the projection
  and cross-attention work of the padding (about 3% of the transformer at 1024²);
* ``torch.compile`` of the transformer's whole forward (``compile_scope="model"``) or of its blocks
  (regional: one graph that all 28 blocks share, ``CompiledBlocks``); fullgraph, static shapes
  except the text length, which is marked dynamic so trimmed prompts share one graph; inductor's
  on-disk caches make a restart compile from cache (``pixq.worker.gpu.compile``);
* fast mode's step plan (``pixq.worker.gpu.fastmode``), switched per render on the same pipeline;
* the VAE decode (``pixq.worker.gpu.vae.VaeDecode``): larger than ``vae_tile_above`` pixels in tiles
  (a native 4096² image), smaller ones in one piece as the plain pipeline does; with ``compile`` (and
  ``compile_vae``) the one-piece decode runs a compiled decoder.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pixq.worker.gpu.aot import Graph
from pixq.worker.gpu.compile import (
    COMPILE_SCOPES,
    CUDAGRAPH_MODES,
    CompiledBlocks,
    compile_forward,
    cudagraph_step_begin,
)
from pixq.worker.gpu.fastmode import Action, FastPlan, StepController
from pixq.worker.gpu.routing import CompileGate, ShapeRouter
from pixq.worker.gpu.textcache import MAX_SEQUENCE_LENGTH, Encoded, PromptCache
from pixq.worker.gpu.vae import VAE_TILE_ABOVE, VaeDecode


@dataclass(frozen=True)
class SpeedupOptions:
    compile: bool = False
    compile_mode: str = "default"
    compile_scope: str = "model"
    trim_text: bool = True
    text_bucket: int = 32
    prompt_cache: int = 64  # prompts whose embeddings stay on the device (≈2.4 MB each at full size)
    vae_tile_above: int = VAE_TILE_ABOVE  # pixels; 0: tile every decode the VAE can tile
    compile_vae: bool = True  # with ``compile``: the VAE decoder too
    # With ``compile`` (model scope): the full batch of the batch policy gets static graphs too (compiled by
    # the warm-up; other batch sizes run eager). Off: every batched call runs the eager transformer.
    compile_batches: bool = False
    fast_plan: FastPlan = field(default_factory=FastPlan)


class RenderSpeedups:
    """The per-pipeline state: prompt cache, compiled transformer, fast-mode controller, VAE tiling."""

    ATTRIBUTE = "_pixq_speedups"

    def __init__(self, pipe: Any, options: SpeedupOptions | None = None):
        self.pipe = pipe
        self.options = options or SpeedupOptions()
        self.cache = PromptCache(self.options.prompt_cache)
        previous = getattr(pipe, self.ATTRIBUTE, None)
        # A second RenderSpeedups on one pipeline replaces the first instead of wrapping it.
        forward: Any = (
            previous.eager_forward if isinstance(previous, RenderSpeedups) else pipe.transformer.forward
        )
        if isinstance(previous, RenderSpeedups):
            if previous.blocks is not None:
                previous.blocks.remove()
            previous.vae_decode.remove()
        vae_mode = None
        if self.options.compile and self.options.compile_vae:
            # No CUDA graphs for the VAE: its per-image outputs must outlive the next replay.
            vae_mode = "max-autotune-no-cudagraphs" if "max-autotune" in self.options.compile_mode else "default"
        self.gate = CompileGate()
        self.vae_decode: VaeDecode = VaeDecode(pipe.vae, self.options.vae_tile_above, vae_mode, gate=self.gate)
        self.eager_forward: Any = forward
        self.blocks: CompiledBlocks | None = None
        before_call = None
        if self.options.compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile scope must be one of {', '.join(COMPILE_SCOPES)} "
                             f"(got {self.options.compile_scope!r})")
        compiled = None
        if self.options.compile:
            if self.options.compile_scope == "blocks":
                self.blocks = CompiledBlocks(pipe.transformer, self.options.compile_mode)
            else:
                compiled = compile_forward(forward, self.options.compile_mode)
            if self.options.compile_mode in CUDAGRAPH_MODES:
                before_call = cudagraph_step_begin
        # Per call: an AOT graph for its shape (``use_graphs``), else the compiled forward, else eager.
        self.router = ShapeRouter(forward, compiled, self.gate)
        self.controller = StepController.install(pipe.transformer, self.router, before_call=before_call)
        setattr(pipe, self.ATTRIBUTE, self)

    def use_graphs(self, transformer: dict[tuple[int, int], list[Graph]],
                   vae: dict[tuple[int, int], list[Graph]]) -> None:
        """Run these AOT graphs (``pixq compile``, by latent height and width) for the shapes they cover."""
        self.router.graphs.update(transformer)
        self.vae_decode.use_graphs(vae)

    @classmethod
    def of(cls, pipe: Any) -> RenderSpeedups:
        """The pipeline's speed-ups; plain ones (no compile) is attached on first use."""
        speedups = getattr(pipe, cls.ATTRIBUTE, None)
        return speedups if isinstance(speedups, RenderSpeedups) else cls(pipe)

    @contextmanager
    def eager(self) -> Iterator[None]:
        """Run the transformer and the VAE uncompiled inside the block (a reference for the compiled ones)."""
        compiled, self.controller.forward = self.controller.forward, self.eager_forward
        if self.blocks is not None:
            self.blocks.eager = True
        self.vae_decode.eager = True
        try:
            yield
        finally:
            self.controller.forward = compiled
            self.vae_decode.eager = False
            if self.blocks is not None:
                self.blocks.eager = False

    # -- prompts ------------------------------------------------------------------------------

    def encode(self, text: str, clean_caption: bool = True) -> Encoded:
        key = (text, MAX_SEQUENCE_LENGTH, clean_caption)
        item = self.cache.get(key)
        if item is None:
            embeds, mask, _, _ = self.pipe.encode_prompt(
                text,
                do_classifier_free_guidance=False,
                num_images_per_prompt=1,
                device=self.pipe._execution_device,
                clean_caption=clean_caption,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
            item = Encoded(embeds, mask, int(mask.sum().item()))
            self.cache.put(key, item)
        return item

    def prompt_kwargs(self, prompt: str, negative_prompt: str, guided: bool) -> dict[str, Any]:
        """``prompt_embeds`` & co. for one pipeline call, trimmed to the longest prompt's bucket."""
        pos = self.encode(prompt)
        neg = self.encode(negative_prompt) if guided else None
        length = pos.embeds.shape[1]
        if self.options.trim_text:
            tokens = max(pos.tokens, neg.tokens if neg is not None else 0, 1)
            bucket = max(1, self.options.text_bucket)
            length = min(length, math.ceil(tokens / bucket) * bucket)
        kwargs: dict[str, Any] = {
            "prompt_embeds": pos.embeds[:, :length],
            "prompt_attention_mask": pos.mask[:, :length],
        }
        kwargs["negative_prompt"] = None  # the pipeline refuses a negative prompt beside its embeddings
        if neg is not None:
            kwargs["negative_prompt_embeds"] = neg.embeds[:, :length]
            kwargs["negative_prompt_attention_mask"] = neg.mask[:, :length]
        return kwargs

    # -- fast mode ----------------------------------------------------------------------------

    def plan(self, fast: bool, steps: int, guided: bool) -> list[Action] | None:
        return self.options.fast_plan.actions(steps, guided) if fast else None
