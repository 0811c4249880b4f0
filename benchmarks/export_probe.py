"""Probe: why torch.export of the PixArt transformer with dynamic rows/text fails on CUDA (issue 14)."""

from __future__ import annotations

import sys
import time
import traceback
from typing import Any

import torch
from pixq.worker.gpu.aot import GraphSpec, example_inputs, transformer_call
from torch.export import Dim

from benchmarks.fullsize import TRANSFORMER_1024, build_transformer


def shapes(ep: torch.export.ExportedProgram) -> str:
    out = []
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in ("hidden_states", "encoder_hidden_states",
                                                      "encoder_attention_mask", "timestep"):
            out.append(f"{node.name}={list(node.meta['val'].shape)}")
    return " ".join(out) + f" ranges={ {str(k): str(v) for k, v in ep.range_constraints.items()} }"


def attempt(label: str, module: torch.nn.Module, args: tuple, dyn: Any, ctx: Any = None) -> object:
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), (ctx if ctx is not None else torch.no_grad()):
            ep = torch.export.export(module, args, dynamic_shapes=dyn, strict=False)
        print(f"[{label}] OK {time.perf_counter() - t0:.1f}s {shapes(ep)}", flush=True)
        return ep
    except Exception as exc:
        msg = str(exc)
        print(f"[{label}] FAIL {type(exc).__name__}: {msg[:3000]}", flush=True)
        return msg


def main() -> int:
    tr = build_transformer(TRANSFORMER_1024, "cuda", torch.bfloat16)
    module = transformer_call(tr)
    spec = GraphSpec("transformer", 1024, 1024, 8)
    args, dyn = example_inputs(spec, module, 8, 4, 4096)
    res = attempt("named", module, args, dyn)
    if isinstance(res, str):
        from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes
        try:
            fixed = refine_dynamic_shapes_from_suggested_fixes(res, dyn)
            print("refined:", fixed, flush=True)
            attempt("refined", module, args, fixed)
        except Exception:
            traceback.print_exc()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        attempt(f"sdpa={backend.name}", module, args, dyn, sdpa_kernel([backend]))
    auto = {k: {d: Dim.AUTO for d in v} for k, v in dyn.items()}
    attempt("auto", module, args, auto)
    return 0


if __name__ == "__main__":
    sys.exit(main())
