"""queue[MODE] / queue[MODE,VARIANT]: jobs end to end through Redis, a real ``pixq worker`` and S3."""

from __future__ import annotations

from typing import Any

from benchmarks.context import Context
from benchmarks.services import idle_single_jobs, queue_stream, serving_worker


def phase_queue(ctx: Context, compile_mode: str, variant: str = "") -> None:
    """``variant``: "SCOPE:THREADS" (``--compile-scope``, ``--encode-threads``) or "" for the run's own."""
    key = f"queue[{compile_mode}]" if not variant else f"queue[{compile_mode},{variant}]"
    res: dict[str, Any] = {}
    ctx.results[key] = res
    extra: tuple[str, ...] = ()
    if variant:
        scope, threads = variant.split(":")
        extra = ("--compile-scope", scope, "--encode-threads", threads)
    log_name = f"worker-{compile_mode}{variant.replace(':', '-')}"
    with serving_worker(ctx, compile_mode, ctx.args.compile_cache, log_name, extra=extra) as (client, first, cold):
        res["cold_start_warm_cache_s"] = cold
        res["first_job_state"] = first.state.value
        ctx.save()
        res["exact"] = queue_stream(ctx, client, "exact", offset=0)
        res["fast"] = queue_stream(ctx, client, "fast", offset=0)
        res["idle_single_job"] = idle_single_jobs(ctx, client, rounds=3, modes=("exact",))
    ctx.save()


def run(ctx: Context) -> None:
    if ctx.args.queue_variants:
        for mode in ctx.compile_modes:
            for variant in ctx.args.queue_variants.split(","):
                if ctx.elapsed() < ctx.args.deadline_s:
                    phase_queue(ctx, mode, variant)
        return
    for mode in ctx.compile_modes:
        phase_queue(ctx, mode)
