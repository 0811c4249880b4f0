"""coldstart[MODE]: a worker's cold start with an empty compile cache."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from benchmarks.context import Context
from benchmarks.services import serving_worker


def phase_coldstart(ctx: Context, compile_mode: str) -> None:
    cache = Path("/tmp/pixq-bench-cold-cache") / str(time.time_ns())
    with serving_worker(ctx, compile_mode, cache, f"worker-cold-{compile_mode}") as (_client, first, cold):
        ctx.results[f"coldstart[{compile_mode}]"] = {"cold_start_cold_cache_s": cold, "state": first.state.value}
    shutil.rmtree(cache, ignore_errors=True)
    ctx.save()


def run(ctx: Context) -> None:
    for mode in ctx.compile_modes:
        phase_coldstart(ctx, mode)
