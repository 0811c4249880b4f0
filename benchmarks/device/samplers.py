"""Per-job samplers on a GPU (issue 27): render time per sampler, fast mode's difference from exact, no compile.

One worker-configured pipeline (bf16, compiled transformer and VAE decoder, full batches' static graphs), the
full-size PixArt-Σ architecture with random weights (``benchmarks.fullsize``), warmed up as a worker is: with
the default sampler only. Then, for every sampler:

* ``exact_1024``: one 1024² job at a time (20 steps), unique prompts, seconds per image;
* ``fast_1024``: the same in fast mode, for every sampler (the schema refuses fast mode with the samplers not
  measured yet; here the request is built past it), and ``fast_vs_exact``: the images' difference from exact
  on the same prompts and seeds (PSNR, max |Δ|): what fastmode.MEASURED_DIFFERENCES would record;
* ``batched_512``: jobs of ``--batch`` images per call at 512² (native on the 1024 transformer: the 512
  checkpoint's cost, one load), seconds per image;
* ``compiles``: dynamo's new graphs and the router's eager calls from the first job of each new sampler on:
  both must stay 0 (a worker serving a new sampler compiles nothing).

Writes ``OUT/samplers.json`` and prints a table. ``--tiny`` runs the same on the CPU with the tiny test model
(small sizes, few images, no compile unless ``--compile``): a check that the script runs.

    python -m benchmarks.device.samplers --out "$OUT"            # GPU
    python -m benchmarks.device.samplers --tiny --out /tmp/s      # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.context import GPU_MODEL, PROMPTS
from benchmarks.measure import free_cuda, image_diff, summary, sync


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    p.add_argument("--tiny", action="store_true", help="the tiny test model on the CPU (a check that this runs)")
    p.add_argument("--model-dir", type=Path, default=None, help=f"saved pipeline [default: {GPU_MODEL}; tiny: OUT]")
    p.add_argument("--device", default=None, help="default: cuda:0, or cpu with --tiny")
    p.add_argument("--images", type=int, default=None, help="1024² images per sampler and mode [8; tiny 2]")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=None, help="the large size [1024; tiny 256]")
    p.add_argument("--small", type=int, default=None, help="the batched size [512; tiny 128]")
    p.add_argument("--batch", type=int, default=8, help="images per call at the small size (the worker's default)")
    p.add_argument("--batches", type=int, default=None, help="calls per sampler at the small size [3; tiny 1]")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile as a worker does [default: on, off with --tiny]")
    p.add_argument("--samplers", default="", help="comma-separated names [default: all]")
    return p.parse_args(argv)


def _request(model: str, index: int, size: int, steps: int, scheduler: str, mode: str = "exact",
             native: bool = False) -> Any:
    """A job past the schema's fast-mode rule (measuring that rule's pairs is the point here)."""
    from pixq.schema import JobRequest

    request = JobRequest.model_validate({
        "prompt": f"{PROMPTS[index % len(PROMPTS)]} (variant {index})", "seed": 1000 + index, "width": size,
        "height": size, "model_name": model, "num_inference_steps": steps, "use_resolution_binning": not native,
    })
    return request.model_copy(update={"scheduler": scheduler, "mode": mode})


def _timed(device: str, fn: Any) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from pixq.schema import Scheduler
    from pixq.worker.gpu.batch import render_batch
    from pixq.worker.gpu.pipeline import PipelineOptions, load_pipeline
    from pixq.worker.gpu.render import render
    from pixq.worker.gpu.speedups import SpeedupOptions
    from torch._dynamo.utils import counters

    from benchmarks.fullsize import ensure_model

    device = args.device or ("cpu" if args.tiny else "cuda:0")
    size, small = args.size or (256 if args.tiny else 1024), args.small or (128 if args.tiny else 512)
    images = args.images or (2 if args.tiny else 8)
    batches = args.batches or (1 if args.tiny else 3)
    compiled = (not args.tiny) if args.compile is None else args.compile
    model_dir = args.model_dir or (args.out / "tiny-model" if args.tiny else Path(GPU_MODEL))
    model_dir, build = ensure_model(model_dir, device, tiny=args.tiny)
    model = str(model_dir)
    samplers = [Scheduler(s) for s in args.samplers.split(",") if s] or list(Scheduler)
    loaded = load_pipeline(model, device, PipelineOptions(
        speedups=SpeedupOptions(compile=compiled, compile_batches=compiled), warmup=[(size, size)],
        warmup_modes=("exact", "fast")))
    speedups = loaded.speedups
    assert speedups is not None
    if compiled:  # the small size's full batch runs its static graphs, as a worker's --compile-batches does
        speedups.router.batch_images = args.batch
    # The small size's calls (one image and the full batch) warmed up with the default sampler too, as a worker's
    # --warmup does; natively rendered, so its own graphs.
    with torch.inference_mode():
        for mode in ("exact", "fast"):
            render(loaded, _request(model, 0, small, args.steps, "dpm-solver++", mode, native=True))
        render_batch(loaded, [_request(model, i, small, args.steps, "dpm-solver++", native=True)
                              for i in range(args.batch)])
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu", "torch": torch.__version__,
        "model": "tiny test model" if args.tiny else "full-size PixArt-Σ XL-2, random weights, bf16",
        "compiled": compiled, "size": size, "small": small, "steps": args.steps, "images": images,
        "batch": args.batch, "batches": batches, "build": build, "load_s": loaded.load_s,
        "warmup_s": loaded.warmup_s, "samplers": {},
    }
    counters.clear()
    eager_before = speedups.gate.eager_calls
    offset = 100  # prompts the warm-up never saw: each job encodes its own, as on a serving worker
    for scheduler in samplers:
        name = scheduler.value
        row: dict[str, Any] = {}
        graphs_before = counters["stats"].get("unique_graphs", 0)
        exact_images: list[Any] = []
        for mode in ("exact", "fast"):
            times: list[float] = []
            for i in range(images):
                request = _request(model, offset + i, size, args.steps, name, mode)
                seconds, out = _timed(device, lambda r=request: render(loaded, r))
                times.append(seconds)
                if mode == "exact":
                    exact_images.append(np.asarray(out[0]))
                else:
                    row.setdefault("diffs", []).append(image_diff(out[0], exact_images[i]))
            row[f"{mode}_{size}"] = summary(times)
        diffs = row.pop("diffs")
        row["fast_vs_exact"] = {"psnr_db_min": min(d["psnr_db"] for d in diffs),
                                "max_abs": max(d["max_abs"] for d in diffs),
                                "mean_abs_max": max(d["mean_abs"] for d in diffs)}
        per_image: list[float] = []
        for b in range(batches):
            jobs = [_request(model, offset + 1000 + b * args.batch + i, small, args.steps, name, native=True)
                    for i in range(args.batch)]
            seconds, _ = _timed(device, lambda j=jobs: render_batch(loaded, j))
            per_image.append(seconds / len(jobs))
        row[f"batched_{small}"] = summary(per_image)
        row["compiles"] = {"new_graphs": counters["stats"].get("unique_graphs", 0) - graphs_before}
        result["samplers"][name] = row
        print(json.dumps({"sampler": name, **row}, default=str), flush=True)  # a run cut short keeps what it measured
        offset += 2000
    result["compiles"] = {"new_graphs": counters["stats"].get("unique_graphs", 0),
                          "eager_calls": speedups.gate.eager_calls - eager_before,
                          "batched_eager_calls": speedups.router.batched_eager_calls}
    loaded.pipe = None  # the weights go before the caller's next phase
    free_cuda()
    return result


def table(result: dict[str, Any]) -> str:
    size, small = result["size"], result["small"]
    head = (f"{'sampler':<16} {f'exact {size}² s':>14} {f'fast {size}² s':>13} {'fast/exact':>10} "
            f"{'fast PSNR dB':>12} {'max|Δ|':>7} {f'{small}² batched s/img':>20} {'new graphs':>10}")
    lines = [f"{result['device']}, {result['model']}, {result['steps']} steps, compiled {result['compiled']}", head]
    for name, row in result["samplers"].items():
        exact, fast = row[f"exact_{size}"]["p50_s"], row[f"fast_{size}"]["p50_s"]
        diff = row["fast_vs_exact"]
        lines.append(f"{name:<16} {exact:>14.3f} {fast:>13.3f} {fast / exact:>10.2f} {diff['psnr_db_min']:>12.1f} "
                     f"{diff['max_abs']:>7} {row[f'batched_{small}']['p50_s']:>20.3f} "
                     f"{row['compiles']['new_graphs']:>10}")
    c = result["compiles"]
    lines.append(f"after warm-up with dpm-solver++ only: {c['new_graphs']} new graphs, {c['eager_calls']} eager calls "
                 f"for want of a graph")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = measure(args)
    (args.out / "samplers.json").write_text(json.dumps(result, indent=2, default=str))
    print(table(result))


if __name__ == "__main__":
    main()
