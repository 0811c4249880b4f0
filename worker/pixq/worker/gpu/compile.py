"""``torch.compile`` for the transformer and the VAE decoder: modes, scopes and inductor's on-disk cache.

* ``compile_forward``: the transformer's whole forward as one graph (``compile_scope="model"``);
* ``CompiledBlocks``: regional compilation, one graph that all 28 transformer blocks share
  (``compile_scope="blocks"``);
* ``compile_fn``: the one set of ``torch.compile`` options both use, and ``VaeDecode`` too
  (fullgraph, static shapes except the text length, which callers mark dynamic so trimmed
  prompts share one graph);
* ``configure_compile_cache``: inductor's FX-graph, AOT-autograd and Triton caches in one folder,
  so a restart compiles from cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
# "model": the whole transformer forward as one graph (the default: fastest through the queue);
# "blocks": each transformer block compiled, one graph shared by all 28 (regional compilation):
#   compiles in seconds, renders as fast alone, but ~9 % slower beside the upload thread (docs/performance.md).
COMPILE_SCOPES = ("blocks", "model")
# Modes whose graphs replay through CUDA-graph trees (each step must be marked: ``cudagraph_step_begin``).
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


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


def compile_fn(fn: Any, mode: str) -> Any:
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
    """``torch.compile`` one transformer forward: one static graph per image size and row count (the
    router lets only one image's rows and the full batch's through: pixq.worker.gpu.routing)."""
    import torch

    compiled = compile_fn(forward, mode)

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
    same strides. One graph per image size for one image, as with ``compile_forward``; calls of several
    images (batches) run the eager blocks.
    """

    def __init__(self, transformer: Any, mode: str = "default"):
        self.blocks = list(transformer.transformer_blocks)
        self.eager = False
        for block in self.blocks:
            block.forward = self._wrap(block.forward, compile_fn(block.forward, mode))

    def _wrap(self, eager: Any, compiled: Any) -> Any:
        import torch

        def call(hidden_states: Any, *args: Any, **kw: Any) -> Any:
            if self.eager or hidden_states.shape[0] > 2:
                return eager(hidden_states, *args, **kw)
            text = kw.get("encoder_hidden_states")
            if text is not None and text.ndim == 3:
                torch._dynamo.mark_dynamic(text, 1)
            mask = kw.get("encoder_attention_mask")
            if mask is not None and mask.ndim >= 2:
                # Same length as the text: may be tied to its symbol rather than get its own.
                torch._dynamo.maybe_mark_dynamic(mask, mask.ndim - 1)
            hidden_states = hidden_states.contiguous()
            return compiled(hidden_states, *args, **kw)

        return call

    def remove(self) -> None:
        """Give the blocks their own (eager) forward back."""
        for block in self.blocks:
            block.__dict__.pop("forward", None)


def cudagraph_step_begin() -> None:
    """Before each transformer call of a CUDA-graph mode: the previous step's outputs may be overwritten."""
    import torch

    torch.compiler.cudagraph_mark_step_begin()
