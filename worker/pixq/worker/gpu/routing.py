"""Which code runs one transformer or VAE-decoder call: a prebuilt graph, a ``torch.compile`` graph, or eager.

The rule (docs/performance.md, "No compile on the serving path"): a worker that was told what it
serves (``--warmup`` sizes, or a compiled artefact set) compiles before it says it is ready and
never in front of a waiting job. Once it serves, a call whose shape has an AOT graph
(``pixq compile``) runs that graph; a call whose shape was compiled by ``torch.compile`` before
serving (or by the deferred warm-up between jobs, inside ``CompileGate.warming``) runs that graph;
any other call runs the eager forward, which gives the same result up to the compile tolerance,
instead of compiling for tens of seconds while the caller waits. A worker told nothing (``--compile``
without ``--warmup``) compiles each new shape on first use, as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pixq.worker.gpu.aot import Graph

log = logging.getLogger(__name__)


class CompileGate:
    """Shapes that may go to ``torch.compile``: any before serving; once serving, only those seen before."""

    def __init__(self) -> None:
        self.serving = False
        self.seen: set[tuple[Any, ...]] = set()
        self.eager_calls = 0  # calls that ran eager because their shape had no graph
        self._eager: set[tuple[Any, ...]] = set()
        self._warming = threading.local()

    def may_compile(self, key: tuple[Any, ...]) -> bool:
        if not self.serving or getattr(self._warming, "on", False):
            self.seen.add(key)
            return True
        return key in self.seen

    def ran_eager(self, key: tuple[Any, ...]) -> None:
        if key not in self._eager:  # one line per shape, not per call
            log.info("no compiled graph for %s: running it eagerly (no compile while a job waits)", key)
            self._eager.add(key)
        self.eager_calls += 1

    def compiles_now(self) -> bool:
        """Whether a compiled call on this thread may compile (before serving, or in the deferred warm-up)."""
        return not self.serving or getattr(self._warming, "on", False)

    def run(self, compiled: Any, *args: Any, **kw: Any) -> Any:
        """Call a ``torch.compile`` function; once serving, under dynamo's ``eager_on_recompile`` stance.

        The shape keys of ``may_compile`` do not cover every guard: a seen shape whose inputs differ in
        something else (a slice's storage offset, a dtype) would make dynamo compile again, tens of seconds
        in front of a waiting job (seen on an H200). With the stance such a call runs eager instead.
        The stance is process-wide: calls are serialised by the worker's GPU lock."""
        if self.compiles_now():
            return compiled(*args, **kw)
        import torch

        with torch.compiler.set_stance("eager_on_recompile"):
            return compiled(*args, **kw)

    @contextmanager
    def warming(self) -> Iterator[None]:
        """Inside the block this thread may compile new shapes (the deferred warm-up, between jobs)."""
        self._warming.on = True
        try:
            yield
        finally:
            self._warming.on = False


class ShapeRouter:
    """The transformer's forward for the step controller: AOT graph by image size, else compiled, else eager."""

    def __init__(self, eager: Any, compiled: Any, gate: CompileGate):
        self.eager = eager
        self.compiled = compiled
        self.gate = gate
        # Images of the full batch whose static graphs may be compiled (``compile_batches``); 0: none.
        self.batch_images = 0
        self.batched_eager_calls = 0  # calls of several images that ran eager by policy (not for want of a graph)
        self.graphs: dict[tuple[int, int], list[Graph]] = {}  # (latent height, latent width) -> graphs

    def __call__(self, hidden_states: Any, *args: Any, **kw: Any) -> Any:
        size = (int(hidden_states.shape[-2]), int(hidden_states.shape[-1]))
        graphs = self.graphs.get(size, ())
        timestep = kw.get("timestep")
        steady = float_timestep(timestep)
        if graphs and not args and _plain_conditions(kw.get("added_cond_kwargs")):
            inputs = [hidden_states, kw.get("encoder_hidden_states"), kw.get("encoder_attention_mask")]
            if all(t is not None for t in inputs) and timestep is not None:
                # A set built with integer timesteps still serves the samplers that give integers; one built
                # with float32 ones (aot.example_inputs) serves every sampler.
                for graph in graphs:
                    for t in (timestep, steady):
                        if graph.accepts([*inputs, t], text_dim=1):
                            sample = graph(*inputs, t)
                            return (sample,) if not kw.get("return_dict", True) else _as_output(sample)
        if steady is not None:
            kw = {**kw, "timestep": steady}
        # Rows 1 and 2 (one image, fast / exact) have static graphs of their own. More rows (batched jobs,
        # several images of a prompt) run eager, except a full batch (``batch_images`` images: its guided and
        # its conditional-only rows) when ``compile_batches`` gave one: a static graph each, compiled by the
        # warm-up. A symbolic batch size did not hold on an H200: every new size compiled again.
        rows = int(hidden_states.shape[0])
        if rows > 2 and (self.compiled is None or rows not in (self.batch_images, 2 * self.batch_images)):
            self.batched_eager_calls += 1
            return self.eager(hidden_states, *args, **kw)
        key = ("transformer", rows, *size)
        if self.compiled is not None and self.gate.may_compile(key):
            return self.gate.run(self.compiled, hidden_states, *args, **kw)
        if self.compiled is not None or self.graphs:
            self.gate.ran_eager(key)
        # With the blocks scope the "eager" forward runs the compiled blocks: the same stance applies.
        return self.gate.run(self.eager, hidden_states, *args, **kw)


def float_timestep(timestep: Any) -> Any:
    """The transformer's timesteps as a new contiguous float32 tensor, whatever the sampler gave.

    Samplers differ here: DPM-Solver++, SA-Solver, UniPC and DDIM step on int64 timesteps, the Euler ones on
    float32 (between the trained ones), and each hands the pipeline a view into its own timestep list. A
    compiled graph guards on dtype and layout, so each kind would compile a graph of its own; the transformer
    turns the timestep into float32 first thing (diffusers' ``get_timestep_embedding``), so giving it float32
    always changes no value and keeps one graph for every sampler."""
    if timestep is None or not hasattr(timestep, "dtype"):
        return timestep
    import torch

    return timestep.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def _plain_conditions(added: Any) -> bool:
    """PixArt-Σ passes no resolution/aspect-ratio conditions; the graphs were built that way."""
    return added is None or all(v is None for v in dict(added).values())


def _as_output(sample: Any) -> Any:
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)
