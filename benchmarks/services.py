"""The queue's services for the phases that go through it: Redis and SeaweedFS on loopback (once a run), a
real ``pixq worker`` started through the CLI, job submission and the stream/idle measurements."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.context import COMPILE_NONE, PROMPTS, Context
from benchmarks.measure import gpu_sampler, summary


def start_stack(root: Path, model_dir: Path | str, started: list[Any]) -> dict[str, str]:
    """Redis and SeaweedFS on loopback under ``root`` (appended to ``started`` for the caller to stop);
    returns the environment a worker and a client need. Every benchmark that goes through the queue
    starts its services here."""
    from tests.services import start_redis, start_seaweedfs

    svc, redis_url = start_redis(root / "redis")
    started.append(svc)
    svc, endpoint = start_seaweedfs(root / "s3", bucket="pixq-bench")
    started.append(svc)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIXQ_", "AWS_"))}
    env.update(endpoint.env())
    env.update({"PIXQ_REDIS_URL": redis_url, "PIXQ_MODEL": str(model_dir), "PIXQ_S3_PREFIX": "bench",
                "PYTHONUNBUFFERED": "1"})
    # boto3 in this process (the in-process job path, image checks) reads its credentials from the environment.
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    return env


def services(ctx: Context) -> dict[str, str]:
    """Redis and SeaweedFS on loopback, started once per run."""
    if ctx.env is None:
        ctx.env = start_stack(log_dir(ctx) / f"services-{os.getpid()}", ctx.model_dir, ctx.services)
    return ctx.env


def client_for(env: dict[str, str]) -> Any:
    from pixq.client import Client
    from pixq.settings import Settings

    return Client(Settings.from_env(env))


def worker_args(ctx: Context, compile_mode: str, cache_dir: Path) -> tuple[str, ...]:
    args = ["--warmup", f"{ctx.size}x{ctx.size}", "--compile-cache", str(cache_dir)]
    if compile_mode == COMPILE_NONE:
        args.append("--no-compile")
    else:
        args += ["--compile", "--compile-mode", compile_mode, "--compile-scope", ctx.args.compile_scope]
    return tuple(args)


def submit(client: Any, ctx: Context, index: int, mode: str) -> Any:
    req = ctx.request(index, mode)
    return client.submit(req.prompt, seed=req.seed, width=req.width, height=req.height, mode=mode,
                         model_name=req.model_name)


@contextlib.contextmanager
def serving_worker(
    ctx: Context, compile_mode: str, cache_dir: Path, log_name: str, extra: tuple[str, ...] = (),
    info: dict[str, Any] | None = None,
) -> Iterator[tuple[Any, Any, float]]:
    """Submit one job, start ``pixq worker``; yields (client, first job record, cold start s).

    ``info``, when given, receives the worker's presence record and the start time.
    """
    from pixq.wire import WORKER_KEY_PREFIX

    from tests.services import start_worker

    env = services(ctx)
    client = client_for(env)
    log_path = log_dir(ctx) / f"{log_name}.log"
    t0 = time.time()
    first = submit(client, ctx, len(PROMPTS) - 3, "exact")
    svc = start_worker(env, str(ctx.model_dir), log_path, device=ctx.device,
                       extra=worker_args(ctx, compile_mode, cache_dir) + extra, timeout_s=ctx.args.worker_timeout_s)
    try:
        record = client.wait(first.id, timeout_s=ctx.args.worker_timeout_s, poll_s=0.02)
        if info is not None:
            info["t0"] = t0
            for key in client.conn.scan_iter(WORKER_KEY_PREFIX + "*"):
                presence = json.loads(client.conn.get(key) or "{}")
                if presence.get("pid") == svc.pid:
                    info.update(presence)
        yield client, record, record.finished_at - t0
    except Exception:
        print(f"--- {log_path} (tail)\n{svc.log_tail(40)}", file=sys.stderr)
        raise
    finally:
        svc.stop()


def log_dir(ctx: Context) -> Path:
    path = ctx.out / "logs" if ctx.args.keep_logs else Path("/tmp/pixq-bench/logs")
    path.mkdir(parents=True, exist_ok=True)
    return path


def queue_stream(ctx: Context, client: Any, mode: str, offset: int) -> dict[str, Any]:
    jobs = []
    with gpu_sampler() as gpu:
        for i in range(ctx.args.images):
            jobs.append(submit(client, ctx, offset + i, mode))
        records = [client.wait(job.id, timeout_s=600, poll_s=0.02) for job in jobs]
    states = sorted({r.state.value for r in records})
    finished = sorted(r.finished_at for r in records)
    first_created = min(r.created_at for r in records)
    n = len(records)
    service = [r.finished_at - r.started_at for r in records if r.started_at]
    return {
        "n": n, "states": states, "mode_recorded": sorted({str(r.request.mode.value) for r in records}),
        "images_per_s": n / (finished[-1] - first_created),
        "steady_images_per_s": (n - 1) / (finished[-1] - finished[0]) if n > 1 else None,
        "service_p50_s": summary(service).get("p50_s"), "service_p95_s": summary(service).get("p95_s"),
        **gpu.result(),
    }


def idle_single_jobs(ctx: Context, client: Any, rounds: int, modes: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per round: 1 s with nothing queued or rendering, then one job per mode, each waited for."""
    idle = []
    for i in range(rounds):
        time.sleep(1.0)
        for mode in modes:
            job = submit(client, ctx, 100 + i, mode)
            record = client.wait(job.id, timeout_s=600, poll_s=0.005)
            idle.append({"mode": mode, "latency_s": record.finished_at - record.created_at,
                         "queue_wait_s": record.started_at - record.created_at,
                         "service_s": record.finished_at - record.started_at,
                         "bytes": sum(im.size_bytes for im in record.images)})
    return idle
