"""Ahead-of-time compiled graphs (AOTInductor) of the transformer's forward and the VAE decoder.

``torch.compile`` re-traces the model with dynamo on every start (14–20 s for the transformer and
the VAE decoder of PixArt-Σ on an H200, even from a warm inductor cache). AOTInductor does the
tracing (``torch.export``) and the code generation once, at ``pixq compile``, and writes a ``.pt2``
package of compiled kernels: a worker loads it with ``aoti_load_package`` (no dynamo, no inductor)
and binds the model's own weights to it (``load_constants(..., user_managed=True)``), so the
package holds code only (``aot_inductor.package_constants_in_so=False``) and the weights stay in
the model's safetensors, once in memory.

One package per image size and component: the transformer with a dynamic batch (1 ..
``max_rows``: exact mode's CFG rows, fast mode's conditional rows, several images or jobs per call)
and a dynamic text length (trimmed prompts, 1 .. 300 tokens); the VAE decoder with a dynamic batch.
A call whose shape or dtypes the graph was not built for is not sent to it (``Graph.accepts``):
the caller runs its eager forward instead.

Calls on a GPU (``InFlight``): the loader's ``run`` holds the GIL from start to end, and its model
container, with one runner, first waits for the previous call's kernels to finish. So a worker's job
threads (PNG encoding, the upload, progress writes) stood still while the GPU thread rendered, and two
jobs of a stream finished together, each after about twice its render (H200 run l, 2026-12-01); and the
GPU idled while each call's kernels were launched. Each graph gets two runners (call k waits only for
call k-2), and before a call the GPU thread waits for that call's event itself, with the GIL released,
so the container never blocks holding it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_TEXT = 300  # PixArt-Σ's T5 token budget
# Package files hold kernels only; the weights are bound from the loaded model at start.
INDUCTOR_CONFIGS: dict[str, Any] = {"aot_inductor.package_constants_in_so": False}
GPU_RUNNERS = 2  # model instances per package on a GPU: a call launches while the previous one runs
ALIGN = 16  # bytes: the alignment inductor assumes for every input (an unaligned one is copied, with a warning)


def transformer_call(transformer: Any) -> Any:
    """A module whose forward is the transformer's, by position (what ``torch.export`` traces).

    It calls the class's forward, so whatever the worker installed on the instance (the step
    controller) is not traced; parameter names get the prefix ``transformer.``.
    """
    import torch

    class TransformerCall(torch.nn.Module):
        def __init__(self, module: Any):
            super().__init__()
            self.transformer = module

        def forward(self, hidden_states: Any, encoder_hidden_states: Any, encoder_attention_mask: Any,
                    timestep: Any) -> Any:
            return type(self.transformer).forward(
                self.transformer, hidden_states, encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask, timestep=timestep,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
            )[0]

    return TransformerCall(transformer).eval()


def decoder_call(decoder: Any) -> Any:
    """A module whose forward is the VAE decoder's (prefix ``decoder.``)."""
    import torch

    class DecoderCall(torch.nn.Module):
        def __init__(self, module: Any):
            super().__init__()
            self.decoder = module

        def forward(self, sample: Any) -> Any:
            return type(self.decoder).forward(self.decoder, sample)

    return DecoderCall(decoder).eval()


@dataclass(frozen=True)
class GraphSpec:
    """What one package was built for: component, image size in latent cells, batch and text ranges."""

    component: str  # "transformer" | "vae"
    width: int  # pixels
    height: int
    max_rows: int
    max_text: int = MAX_TEXT
    rows: int = 0  # 0: a dynamic row count (1 .. max_rows); else exactly this many (see build_artefacts)
    min_rows: int = 1  # what the exported graph accepts (read back from the export)
    min_text: int = 1
    batch: int = 1  # images of the full batch the workers' policy gives this size (the transformer's rows)

    @property
    def name(self) -> str:
        return f"{self.component}-{self.width}x{self.height}" + (f"-r{self.rows}" if self.rows else "")


def _param_device_dtype(module: Any) -> tuple[Any, Any]:
    param = next(module.parameters())
    return param.device, param.dtype


def example_inputs(spec: GraphSpec, module: Any, vae_scale: int, latent_channels: int,
                   caption_channels: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inputs of the shapes and dtypes the worker's pipeline passes, and their dynamic dimensions."""
    import torch
    from torch.export import Dim

    device, dtype = _param_device_dtype(module)
    h, w = spec.height // vae_scale, spec.width // vae_scale
    rows = spec.rows or (2 if spec.max_rows >= 2 else 1)  # dynamic: an example above 1 (not specialised to 1)
    batch: Any = Dim("rows", min=1, max=max(spec.max_rows, 2)) if not spec.rows else Dim.STATIC
    if spec.component == "vae":
        sample = torch.randn(rows, latent_channels, h, w, device=device, dtype=dtype)
        return (sample,), {"sample": {0: batch}}
    # AUTO: export keeps the text length symbolic where the code allows (a named range fails on CUDA:
    # SDPA's guards on it are not provable over the range); the range it kept is read back after export.
    text = Dim.AUTO
    tokens = min(32, spec.max_text)
    args = (
        torch.randn(rows, latent_channels, h, w, device=device, dtype=dtype),
        torch.randn(rows, tokens, caption_channels, device=device, dtype=dtype),
        torch.ones(rows, tokens, device=device, dtype=torch.int64),  # the tokenizer's mask, as T5 gets it
        # The timesteps as the worker's router passes them to every graph: float32 for every sampler.
        torch.full((rows,), 500.0, device=device, dtype=torch.float32),
    )
    shapes = {"hidden_states": {0: batch}, "encoder_hidden_states": {0: batch, 1: text},
              "encoder_attention_mask": {0: batch, 1: text}, "timestep": {0: batch}}
    return args, shapes


def build_graph(module: Any, args: tuple[Any, ...], dynamic: dict[str, Any], path: Path) -> dict[str, Any]:
    """``torch.export`` + AOTInductor-compile ``module`` for ``args`` into the package at ``path``.

    Returns what the manifest records: seconds taken, the constants the package needs (name,
    shape, dtype) and the example inputs' dtypes.
    """
    import torch
    import torch._inductor

    t0 = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
    export_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    ranges = _input_ranges(exported)
    torch._inductor.aoti_compile_and_package(exported, package_path=str(path), inductor_configs=INDUCTOR_CONFIGS)
    state = _constants(module)
    lifted = {name: value for name, value in exported.constants.items() if name not in state}
    if lifted:  # constants that are neither parameters nor buffers: the model cannot bind them
        raise RuntimeError(f"graph needs constants the model does not name: {', '.join(sorted(lifted))}")
    return {
        **ranges,
        "export_s": round(export_s, 2), "compile_s": round(time.perf_counter() - t1, 2),
        "inputs": [str(a.dtype).removeprefix("torch.") for a in args],
        "constants": {name: [list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in state.items()},
    }


def _input_ranges(exported: Any) -> dict[str, int]:
    """The row and text-length ranges the exported graph holds (its first input's dim 0, second's dim 1)."""
    placeholders = [n for n in exported.graph.nodes if n.op == "placeholder" and n.name in exported.graph_signature
                    .user_inputs]
    out: dict[str, int] = {}
    for name, index, dim in (("rows", 0, 0), ("text", 1, 1)):
        if len(placeholders) <= index:
            continue
        size = placeholders[index].meta["val"].shape[dim]
        if isinstance(size, int):
            lo = hi = size
        else:
            bound = exported.range_constraints.get(size.node.expr)
            lo, hi = 1, 1 << 30
            if bound is not None:
                lo = _finite(bound.lower, lo)
                hi = _finite(bound.upper, hi)
        out[f"min_{name}"], out[f"max_{name}"] = lo, hi
    return out


def _finite(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):  # int_oo / sympy infinity
        return default


def _constants(module: Any) -> dict[str, Any]:
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(dict(module.named_buffers(remove_duplicate=False)))
    return named


def load_package(path: Path, device_index: int, runners: int = 1) -> Any:
    """``aoti_load_package`` without its device check: the package's runner, callable like it.

    ``aoti_load_package`` first compares the package's device information with this machine's and only
    warns on a mismatch; to get the CPU's vector ISA for that, inductor compiles and loads ten probe
    libraries, each in a child Python (on torch 2.11 each child imports torch): the 47.8 s of the first
    H200 start with artefacts, for a warning. Our set's key already names the GPU kind, the CPU's vector
    extensions and the versions (``artefacts.ArtefactKey``), so the loader is made directly, as
    ``load_package`` does itself for packages it cannot read the metadata of. 4-8 ms a package on a CPU
    (``aoti_load_package``: 2.2 s for the first). ``runners``: model instances in the package's container
    (the module docstring says why a GPU gets two).
    """
    import torch

    try:
        from torch._inductor.package.package import AOTICompiledModel
    except ImportError:  # another torch layout: the documented entry point, with its check
        import torch._inductor

        return torch._inductor.aoti_load_package(str(path), device_index=device_index)
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, runners, device_index)
    return AOTICompiledModel(loader)


def aligned(tensor: Any) -> Any:
    """``tensor`` contiguous and at an ``ALIGN``-byte address (a slice such as fast mode's conditional half
    of the timesteps starts mid-storage): what the package reads without copying it itself."""
    tensor = tensor.contiguous()
    return tensor if tensor.data_ptr() % ALIGN == 0 else tensor.clone()


class InFlight:
    """The events of a graph's last calls on a GPU: before call k, the wait for call k - ``runners`` (the
    runner the container would otherwise wait for while holding the GIL); ``make_event`` gives a
    recorded-later event (``torch.cuda.Event``), whose ``synchronize`` releases the GIL."""

    def __init__(self, runners: int, make_event: Callable[[], Any]):
        self.runners = runners
        self.make_event = make_event
        self.events: deque[Any] = deque()

    def before_call(self) -> None:
        while len(self.events) >= self.runners:
            self.events.popleft().synchronize()

    def after_call(self) -> None:
        event = self.make_event()
        event.record()
        self.events.append(event)


class Graph:
    """One loaded package, bound to the loaded model's own weights; callable like the eager forward."""

    def __init__(self, spec: GraphSpec, compiled: Any, input_dtypes: list[str], device: Any):
        self.spec = spec
        self.compiled = compiled
        self.input_dtypes = input_dtypes
        self.device = device
        self.calls = 0
        self.timings: dict[str, float] = {}  # seconds: "package" (load_package), "bind" (load_constants)
        self.in_flight: InFlight | None = None  # on a GPU
        if getattr(device, "type", "cpu") == "cuda":
            import torch

            self.in_flight = InFlight(GPU_RUNNERS, torch.cuda.Event)

    @classmethod
    def load(cls, spec: GraphSpec, path: Path, module: Any, recorded: dict[str, Any]) -> Graph:
        """Load ``path`` and bind ``module``'s tensors (no copy). ``recorded`` is the manifest entry:
        every constant must exist in the model with the recorded shape and dtype, or this raises."""
        state = _constants(module)
        needed: dict[str, list[Any]] = recorded["constants"]
        wrong = [name for name, (shape, dtype) in needed.items()
                 if name not in state or list(state[name].shape) != shape
                 or str(state[name].dtype).removeprefix("torch.") != dtype]
        if wrong:
            raise ValueError(f"{spec.name}: the model's weights do not match the graph ({len(wrong)} constants, "
                             f"e.g. {wrong[0]})")
        device, _ = _param_device_dtype(module)
        index = device.index if device.type == "cuda" and device.index is not None else -1
        t0 = time.perf_counter()
        compiled = load_package(path, index, GPU_RUNNERS if index >= 0 else 1)
        t1 = time.perf_counter()
        fqns = compiled.get_constant_fqns()
        missing = [name for name in fqns if name not in state]
        if missing:
            raise ValueError(f"{spec.name}: the graph needs {missing[0]}, which the model lacks")
        compiled.load_constants({name: state[name] for name in fqns}, check_full_update=True, user_managed=True)
        graph = cls(spec, compiled, list(recorded["inputs"]), device)
        graph.timings = {"package": t1 - t0, "bind": time.perf_counter() - t1}
        return graph

    def accepts(self, tensors: list[Any], text_dim: int | None = None) -> bool:
        """Whether these inputs are of the shapes and dtypes the graph was built for."""
        first, spec = tensors[0], self.spec
        if not (spec.rows or spec.min_rows) <= first.shape[0] <= (spec.rows or spec.max_rows):
            return False
        if first.device != self.device:
            return False
        if text_dim is not None and not spec.min_text <= tensors[1].shape[text_dim] <= spec.max_text:
            return False
        return [str(t.dtype).removeprefix("torch.") for t in tensors] == self.input_dtypes

    def __call__(self, *tensors: Any) -> Any:
        self.calls += 1
        # The package reads its inputs with the strides it was built for (contiguous), aligned.
        inputs = [aligned(t) for t in tensors]
        if self.in_flight is None:
            return self.compiled(*inputs)
        self.in_flight.before_call()
        out = self.compiled(*inputs)
        self.in_flight.after_call()
        return out
