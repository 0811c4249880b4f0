"""GPU throughput benchmark: the model card's plain pipeline vs the worker, in process and through the queue.

One run measures, on one device and on the same saved model:

card        the model card's plain ``PixArtSigmaPipeline`` (fp16, eager, batch 1): the reference
inprocess   ``pixq.worker.gpu.render`` on ``load_pipeline(...)`` with the levers (bf16, compile, warm-up, prompt
            cache, text trimming), exact and fast mode; the component breakdown; the output
            difference (card vs exact, exact vs fast) on fixed prompts and seeds; and the in-process
            job path (two threads, render under a lock, PNG encode and S3 put beside it)
queue       the same jobs end to end: real Redis, a real ``pixq worker`` started through the CLI, real
            SeaweedFS S3; cold start to the first finished job, streams, an idle single job
coldstart   a worker with an empty compile cache (cold start, cold cache)
twok        the 2K architecture (sample size 256, interpolation scale 4, VAE tiling) at 2048² and 4096²
offload     ``--offload`` (enable_model_cpu_offload) renders
levers, scopes, attention, encode, coldsplit, multigpu, twokqueue, vae: single levers and splits (their
            modules' docstrings)

Layout: this module is the CLI and the loop; each phase is a module of benchmarks/phases/ (run(ctx)),
benchmarks/context.py holds what they share (arguments, model, results), benchmarks/services.py the
queue's services, benchmarks/inproc.py the in-process render helpers, benchmarks/report.py the table
and the plot. Adding a phase: benchmarks/NOTES.md.

    python -m benchmarks.bench --out OUT [--tiny] [--phases build,card,inprocess,queue] [--images 12]

``--tiny`` runs everything on the CPU with the tiny test model (to check the harness, not to time).
Results go to OUT/results.json after each phase; a table is printed last.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from benchmarks.context import COMPILE_NONE, GPU_MODEL, Context, environment
from benchmarks.measure import free_cuda
from benchmarks.phases import phase as run_phase
from benchmarks.report import plot, table

log = logging.getLogger("bench")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    p.add_argument("--tiny", action="store_true", help="CPU, the tiny test model, 256²")
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--phases", default="build,card,inprocess,queue")
    p.add_argument("--compile-modes", default="default", help="comma list; 'none' for eager")
    p.add_argument("--compile-scope", default="model", choices=("blocks", "model"))
    p.add_argument("--twok-backends", default="default", help="comma list of SDPA backends for exact 2048²: "
                   "default, cudnn, flash, efficient")
    p.add_argument("--queue-variants", default="", help="comma list of SCOPE:ENCODE_THREADS, one queue run each "
                   "(e.g. blocks:0,blocks:1,model:0)")
    p.add_argument("--compile-cache", type=Path, default=Path("/tmp/pixq-bench/inductor"))
    p.add_argument("--twok-compile", default=COMPILE_NONE)
    p.add_argument("--twok-images", type=int, default=2)
    p.add_argument("--coldsplit-starts", default="cold_cache,warm_cache,warm_cache_exact_warmup_only")
    p.add_argument("--twok-tile-above", type=int, default=0, help="the 2K phase's VAE tiling threshold (pixels)")
    p.add_argument("--twok-queue-images", type=int, default=6)
    p.add_argument("--native-modes", default="fast", help="comma list: modes rendered at 4096² natively")
    p.add_argument("--vae-compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--fidelity", type=int, default=4)
    p.add_argument("--deadline-s", type=float, default=540, help="optional phases are skipped past this")
    p.add_argument("--worker-timeout-s", type=float, default=420)
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--keep-logs", action="store_true", help="service and worker logs under OUT")
    p.add_argument("--gpu-counts", default="1,2", help="multigpu: comma list of GPU counts (clipped to those visible)")
    p.add_argument("--multigpu-modes", default="exact", help="multigpu: comma list of modes streamed at each count")
    p.add_argument("--kill-child", action="store_true", help="multigpu: kill -9 one child mid-stream at the largest")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        device, size = "cpu", 256
        model_dir = args.model_dir or Path("/tmp/pixq-bench/tiny-model")
    else:
        device, size = "cuda:0", 1024
        model_dir = args.model_dir or Path(GPU_MODEL)
    ctx = Context(args, args.out, device, size, model_dir.resolve())
    previous = args.out / "results.json"
    if previous.exists():
        ctx.results = json.loads(previous.read_text())
    ctx.results["env"] = environment(ctx)
    phases = [ph for ph in args.phases.split(",") if ph]
    try:
        for phase in phases:
            if ctx.elapsed() > args.deadline_s and phase not in ("build",):
                ctx.results.setdefault("skipped", []).append(phase)
                continue
            log.info("== phase %s (%.0f s in)", phase, ctx.elapsed())
            try:
                run_phase(phase)(ctx)
            except Exception as exc:
                traceback.print_exc()
                ctx.results.setdefault("errors", {})[phase] = f"{type(exc).__name__}: {exc}"
                free_cuda()
            ctx.results.setdefault("phase_s", {})[phase] = ctx.elapsed()
            ctx.save()
    finally:
        for svc in reversed(ctx.services):
            svc.stop()
        ctx.save()
    plot(ctx.results, args.out / "throughput.png")
    print(json.dumps({k: v for k, v in ctx.results.items() if k in ("errors", "skipped", "phase_s")}, default=str))
    print(table(ctx.results))
    return 1 if ctx.results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
