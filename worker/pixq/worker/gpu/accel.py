"""Per-process speed-ups around one loaded ``PixArtSigmaPipeline``: what a worker keeps between jobs.

* prompt embeddings: the T5-XXL encoding of each prompt is kept in a small LRU on the device;
  the empty negative prompt is encoded once. The pipeline gets ``prompt_embeds`` and
  ``negative_prompt_embeds`` with their attention masks, which is the same T5 call the pipeline
  would make (bit-identical output, tests/test_render_fidelity.py);
* text trimming: T5 pads every prompt to 300 tokens and the cross-attention masks the padding
  out with a -10000 bias, whose softmax weight is exactly 0 in float32. Cutting the padded tail
  (rounded up to ``text_bucket`` tokens) changes only summation order, and saves the projection
  and cross-attention work of the padding (about 3% of the transformer at 1024²);
* ``torch.compile`` of the transformer's whole forward (``compile_scope="model"``) or of its blocks
  (regional: one graph that all 28 blocks share, ``CompiledBlocks``); fullgraph, static shapes
  except the text length, which is marked dynamic so trimmed prompts share one graph; inductor's
  on-disk caches make a restart compile from cache (``configure_compile_cache``);
* fast mode's step plan (``pixq.worker.gpu.fastmode``), switched per render on the same pipeline;
* the VAE decode (``VaeDecode``): larger than ``vae_tile_above`` pixels in tiles (a native 4096²
  image), smaller ones in one piece as the plain pipeline does; with ``compile`` (and
  ``compile_vae``) the one-piece decode runs a compiled decoder.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixq.worker.gpu.fastmode import Action, FastPlan, StepController

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
# "model": the whole transformer forward as one graph (the default: fastest through the queue);
# "blocks": each transformer block compiled, one graph shared by all 28 (regional compilation):
#   compiles in seconds, renders as fast alone, but ~9 % slower beside the upload thread (docs/performance.md).
COMPILE_SCOPES = ("blocks", "model")
MAX_SEQUENCE_LENGTH = 300  # PixArt-Σ's T5 token budget (the pipeline's default)
# Decodes above this many pixels run tiled: a 2048² decode in one piece peaks at 8.7 GiB (fits a 24 GB
# card), a native 4096² one would need ~35 GiB.
VAE_TILE_ABOVE = 2048 * 2048


@dataclass(frozen=True)
class AccelOptions:
    compile: bool = False
    compile_mode: str = "default"
    compile_scope: str = "model"
    trim_text: bool = True
    text_bucket: int = 32
    prompt_cache: int = 64  # prompts whose embeddings stay on the device (≈2.4 MB each at full size)
    vae_tile_above: int = VAE_TILE_ABOVE  # pixels; 0: tile every decode the VAE can tile
    compile_vae: bool = True  # with ``compile``: the VAE decoder too
    fast_plan: FastPlan = field(default_factory=FastPlan)


@dataclass(frozen=True)
class Encoded:
    """One prompt's T5 output (batch 1) and mask, with its token count."""

    embeds: Any
    mask: Any
    tokens: int


class PromptCache:
    """A thread-safe LRU of ``Encoded`` by (text, max_sequence_length, clean_caption)."""

    def __init__(self, size: int):
        self.size = size
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple[str, int, bool], Encoded] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, bool]) -> Encoded | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return item

    def put(self, key: tuple[str, int, bool], item: Encoded) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def configure_compile_cache(cache_dir: str | os.PathLike[str]) -> Path:
    """Keep inductor's FX-graph, AOT-autograd and Triton caches in ``cache_dir`` across restarts.

    Read lazily by torch at compile time, so setting it before the first compile is enough.
    """
    path = Path(cache_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
    return path


def _compile(fn: Any, mode: str) -> Any:
    import torch
    import torch._dynamo

    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)} (got {mode!r})")
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), 64))
    kwargs: dict[str, Any] = {"fullgraph": True, "dynamic": False}
    if mode != "default":
        kwargs["mode"] = mode
    return torch.compile(fn, **kwargs)


def compile_forward(forward: Any, mode: str = "default") -> Any:
    """``torch.compile`` one transformer forward: one full graph per batch size and image size."""
    import torch

    compiled = _compile(forward, mode)

    def call(hidden_states: Any, *args: Any, **kw: Any) -> Any:
        # The text length varies with trimming; one symbolic graph serves all lengths.
        for name in ("encoder_hidden_states", "encoder_attention_mask"):
            value = kw.get(name)
            if value is not None and value.ndim >= 2 and value.shape[1] > 1:
                torch._dynamo.mark_dynamic(value, 1)
        return compiled(hidden_states, *args, **kw)

    return call


class CompiledBlocks:
    """Regional compilation: every block of ``transformer.transformer_blocks`` runs one compiled graph.

    The 28 blocks of PixArt-Σ are the same code with different weights; dynamo traces one block
    (weights are graph inputs), so compiling costs one block's trace instead of the whole model's,
    and a restart that compiles from inductor's cache is as much faster. What stays eager is the
    patch embedding, the timestep and caption embeddings and the final layer: a few kernels per step.
    The text length is marked dynamic (trimmed prompts share the graph); the first block's input
    (a transposed view out of the patch embedding) is made contiguous so every block sees the
    same strides. One graph per batch size and image size, as with ``compile_forward``.
    """

    def __init__(self, transformer: Any, mode: str = "default"):
        self.blocks = list(transformer.transformer_blocks)
        self.eager = False
        for block in self.blocks:
            block.forward = self._wrap(block.forward, _compile(block.forward, mode))

    def _wrap(self, eager: Any, compiled: Any) -> Any:
        import torch

        def call(hidden_states: Any, *args: Any, **kw: Any) -> Any:
            if self.eager:
                return eager(hidden_states, *args, **kw)
            text = kw.get("encoder_hidden_states")
            if text is not None and text.ndim == 3:
                torch._dynamo.mark_dynamic(text, 1)
            mask = kw.get("encoder_attention_mask")
            if mask is not None and mask.ndim >= 2:
                # Same length as the text: may be tied to its symbol rather than get its own.
                torch._dynamo.maybe_mark_dynamic(mask, mask.ndim - 1)
            return compiled(hidden_states.contiguous(), *args, **kw)

        return call

    def remove(self) -> None:
        """Give the blocks their own (eager) forward back."""
        for block in self.blocks:
            block.__dict__.pop("forward", None)


class VaeDecode:
    """The worker's ``vae.decode``: tiled above ``tile_above`` pixels, else one piece, compiled when asked.

    diffusers' ``enable_tiling`` is all or nothing for a VAE; tiling blends overlapping tiles,
    which changes the pixels slightly, so sizes that fit in memory keep the plain one-piece decode.
    With ``compile_mode``, one-piece decodes run a compiled ``vae.decoder`` (2.3× faster on an
    H200: its GroupNorm/SiLU chains fuse), one image at a time so that one graph per image size
    serves every ``num_images_per_prompt``; tiled decodes (odd tile shapes) stay eager.
    """

    def __init__(self, vae: Any, tile_above: int, compile_mode: str | None = None):
        self.vae = vae
        self.tile_above = tile_above
        self.scale = 2 ** (len(vae.config.block_out_channels) - 1)  # latent -> pixels (8 for SDXL's VAE)
        self.tiled = 0  # decodes that ran tiled
        self.last: tuple[int, int, bool] | None = None  # (width, height, tiled) of the last decode, in pixels
        self.eager = False  # True: the compiled decoder is bypassed (a reference for it)
        self._decoder_forward = vae.decoder.forward
        self._compiled = _compile(self._decoder_forward, compile_mode) if compile_mode else None
        self._use_compiled = False
        self._forward = self._decoder  # the one bound method installed, so remove() can recognise it
        self.install()

    def __call__(self, z: Any, *args: Any, **kw: Any) -> Any:
        tile = z.shape[-1] * z.shape[-2] * self.scale**2 > self.tile_above
        self.vae.use_tiling = tile
        self.tiled += tile
        self.last = (int(z.shape[-1]) * self.scale, int(z.shape[-2]) * self.scale, tile)
        self._use_compiled = self._compiled is not None and not tile and not self.eager
        try:
            return type(self.vae).decode(self.vae, z, *args, **kw)
        finally:
            self._use_compiled = False

    def _decoder(self, sample: Any, *args: Any, **kw: Any) -> Any:
        if not self._use_compiled or self._compiled is None:
            return self._decoder_forward(sample, *args, **kw)
        if sample.shape[0] == 1:
            return self._compiled(sample, *args, **kw)
        import torch

        return torch.cat([self._compiled(sample[i : i + 1], *args, **kw) for i in range(sample.shape[0])])

    def install(self) -> None:
        self.vae.decode = self
        if self._compiled is not None:
            self.vae.decoder.forward = self._forward

    def remove(self) -> None:
        """The VAE's own ``decode`` and decoder again (its ``use_tiling`` flag decides); what others
        installed on them (offload hooks) stays."""
        if self.vae.__dict__.get("decode") is self:
            del self.vae.decode
        if self.vae.decoder.__dict__.get("forward") is self._forward:
            del self.vae.decoder.forward


class Accelerator:
    """The per-pipeline state: prompt cache, compiled transformer, fast-mode controller, VAE tiling."""

    ATTRIBUTE = "_pixq_accel"

    def __init__(self, pipe: Any, options: AccelOptions | None = None):
        self.pipe = pipe
        self.options = options or AccelOptions()
        self.cache = PromptCache(self.options.prompt_cache)
        previous = getattr(pipe, self.ATTRIBUTE, None)
        # A second accelerator on one pipeline replaces the first instead of wrapping it.
        forward: Any = (
            previous.eager_forward if isinstance(previous, Accelerator) else pipe.transformer.forward
        )
        if isinstance(previous, Accelerator):
            if previous.blocks is not None:
                previous.blocks.remove()
            previous.vae_decode.remove()
        vae_mode = None
        if self.options.compile and self.options.compile_vae:
            # No CUDA graphs for the VAE: its per-image outputs must outlive the next replay.
            vae_mode = "max-autotune-no-cudagraphs" if "max-autotune" in self.options.compile_mode else "default"
        self.vae_decode: VaeDecode = VaeDecode(pipe.vae, self.options.vae_tile_above, vae_mode)
        self.eager_forward: Any = forward
        self.blocks: CompiledBlocks | None = None
        before_call = None
        if self.options.compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile scope must be one of {', '.join(COMPILE_SCOPES)} "
                             f"(got {self.options.compile_scope!r})")
        if self.options.compile:
            if self.options.compile_scope == "blocks":
                self.blocks = CompiledBlocks(pipe.transformer, self.options.compile_mode)
            else:
                forward = compile_forward(forward, self.options.compile_mode)
            if self.options.compile_mode in ("reduce-overhead", "max-autotune"):  # CUDA-graph trees
                before_call = _cudagraph_step_begin
        self.controller = StepController.install(pipe.transformer, forward, before_call=before_call)
        setattr(pipe, self.ATTRIBUTE, self)

    @classmethod
    def of(cls, pipe: Any) -> Accelerator:
        """The pipeline's accelerator; a plain one (no compile) is attached on first use."""
        accel = getattr(pipe, cls.ATTRIBUTE, None)
        return accel if isinstance(accel, Accelerator) else cls(pipe)

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


def _cudagraph_step_begin() -> None:
    import torch

    torch.compiler.cudagraph_mark_step_begin()
