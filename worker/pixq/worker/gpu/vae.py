"""The worker's VAE decode: tiled only above a size, one piece (compiled with ``--compile``) below it."""

from __future__ import annotations

from typing import Any

from pixq.worker.gpu.aot import Graph
from pixq.worker.gpu.compile import compile_fn
from pixq.worker.gpu.routing import CompileGate

# Decodes above this many pixels run tiled: a 2048² decode in one piece peaks at 8.7 GiB (fits a 24 GB
# card), a native 4096² one would need ~35 GiB.
VAE_TILE_ABOVE = 2048 * 2048


class VaeDecode:
    """The worker's ``vae.decode``: tiled above ``tile_above`` pixels, else one piece, compiled when asked.

    diffusers' ``enable_tiling`` is all or nothing for a VAE; tiling blends overlapping tiles,
    which changes the pixels slightly, so sizes that fit in memory keep the plain one-piece decode.
    With ``compile_mode``, one-piece decodes run a compiled ``vae.decoder`` (2.3× faster on an
    H200: its GroupNorm/SiLU chains fuse), one image at a time so that one graph per image size
    serves every ``num_images_per_prompt``; tiled decodes (odd tile shapes) stay eager.
    ``graphs`` (image size in latent cells -> an AOT graph of the decoder, ``pixq compile``) go first;
    ``gate`` decides whether a size without one may be compiled (``pixq.worker.gpu.routing``).
    """

    def __init__(self, vae: Any, tile_above: int, compile_mode: str | None = None,
                 gate: CompileGate | None = None):
        self.vae = vae
        self.tile_above = tile_above
        self.scale = 2 ** (len(vae.config.block_out_channels) - 1)  # latent -> pixels (8 for SDXL's VAE)
        self.tiled = 0  # decodes that ran tiled
        self.last: tuple[int, int, bool] | None = None  # (width, height, tiled) of the last decode, in pixels
        self.eager = False  # True: the compiled decoder is bypassed (a reference for it)
        self._decoder_forward = vae.decoder.forward
        self._compiled = compile_fn(self._decoder_forward, compile_mode) if compile_mode else None
        self._use_compiled = False
        self._one_piece = False
        self.gate = gate or CompileGate()
        self.graphs: dict[tuple[int, int], list[Graph]] = {}
        self._forward = self._decoder  # the one bound method installed, so remove() can recognise it
        self.install()

    def __call__(self, z: Any, *args: Any, **kw: Any) -> Any:
        tile = z.shape[-1] * z.shape[-2] * self.scale**2 > self.tile_above
        self.vae.use_tiling = tile
        self.tiled += tile
        self.last = (int(z.shape[-1]) * self.scale, int(z.shape[-2]) * self.scale, tile)
        self._one_piece = not tile and not self.eager
        self._use_compiled = self._compiled is not None and self._one_piece
        try:
            return type(self.vae).decode(self.vae, z, *args, **kw)
        finally:
            self._use_compiled = self._one_piece = False

    def _decoder(self, sample: Any, *args: Any, **kw: Any) -> Any:
        size = (int(sample.shape[-2]), int(sample.shape[-1]))
        graphs = self.graphs.get(size, []) if self._one_piece and not args and not kw else []
        for graph in graphs:
            if graph.accepts([sample[:1]]):
                return self._per_image(graph, sample)
        if not self._use_compiled or self._compiled is None:
            if self.graphs and self._one_piece:
                self.gate.ran_eager(("vae", *size))
            return self._decoder_forward(sample, *args, **kw)
        if not self.gate.may_compile(("vae", *size)):
            self.gate.ran_eager(("vae", *size))
            return self._decoder_forward(sample, *args, **kw)
        return self.gate.run(self._per_image, self._compiled, sample, *args, **kw)

    @staticmethod
    def _per_image(fn: Any, sample: Any, *args: Any, **kw: Any) -> Any:
        if sample.shape[0] == 1:
            return fn(sample, *args, **kw)
        import torch

        return torch.cat([fn(sample[i : i + 1], *args, **kw) for i in range(sample.shape[0])])

    def use_graphs(self, graphs: dict[tuple[int, int], list[Graph]]) -> None:
        """Decode one-piece images of these latent sizes with these AOT graphs."""
        self.graphs.update(graphs)
        self.install()

    def install(self) -> None:
        self.vae.decode = self
        if self._compiled is not None or self.graphs:
            self.vae.decoder.forward = self._forward

    def remove(self) -> None:
        """The VAE's own ``decode`` and decoder again (its ``use_tiling`` flag decides); what others
        installed on them (offload hooks) stays."""
        if self.vae.__dict__.get("decode") is self:
            del self.vae.decode
        if self.vae.decoder.__dict__.get("forward") is self._forward:
            del self.vae.decoder.forward
