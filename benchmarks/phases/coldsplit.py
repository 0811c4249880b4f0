"""coldsplit: worker cold starts split: cold compile cache, warm cache, warm cache with exact warm-up only."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.context import Context
from benchmarks.services import services, serving_worker, submit


def phase_coldsplit(ctx: Context) -> None:
    """Worker cold starts: cold compile cache, warm cache, warm cache with only exact mode warmed up."""
    import subprocess

    env = services(ctx)
    res: dict[str, Any] = {}
    ctx.results["coldsplit"] = res
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, diffusers, transformers, celery, pixq.worker.ops.serve; "
                    "torch.cuda.init() if torch.cuda.is_available() else None"], env=env, check=True)
    res["imports_and_cuda_init_s"] = time.perf_counter() - t0
    cache = Path("/tmp/pixq-bench-split-cache") / str(time.time_ns())
    starts = (("cold_cache", ()), ("warm_cache", ()), ("warm_cache_exact_warmup_only", ("--warmup-mode", "exact")))
    for label, extra in starts:
        if label not in ctx.args.coldsplit_starts.split(","):
            continue
        if ctx.elapsed() > ctx.args.deadline_s:
            res[label] = "skipped: deadline"
            continue
        info: dict[str, Any] = {}
        with serving_worker(ctx, "default", cache, f"worker-{label}", extra=extra, info=info) as (client, first, cold):
            item: dict[str, Any] = {"cold_start_s": cold, "state": first.state.value,
                                    "first_job_service_s": first.finished_at - (first.started_at or 0)}
            if "started_at" in info:
                item.update(load_s=info.get("load_s"), presence_after_s=info["started_at"] - info["t0"])
            job = submit(client, ctx, 3, "fast")
            rec = client.wait(job.id, timeout_s=600, poll_s=0.02)
            item["first_fast_job_latency_s"] = rec.finished_at - rec.created_at
            res[label] = item
        ctx.save()
    # Later phases start from the cache warmed here instead of compiling again.
    shutil.rmtree(ctx.args.compile_cache, ignore_errors=True)
    ctx.args.compile_cache.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(cache, ctx.args.compile_cache)


def run(ctx: Context) -> None:
    phase_coldsplit(ctx)
