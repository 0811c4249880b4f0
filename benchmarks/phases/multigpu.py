"""multigpu[MODE]: throughput through the queue with one worker process per GPU, at 1, 2, 4 and 8 GPUs.

Per GPU count (``--gpu-counts``, clipped to the GPUs visible): ``pixq worker --gpus 0,…,n-1`` (the supervisor, one
child per GPU) started from nothing, the seconds from its start until every child said it serves, a warm-up of two
jobs per GPU, then per mode (``--multigpu-modes``; the first one's figures at the top level, the others under
``modes``) a stream of ``--images`` × n unique prompts; images/s and the efficiency per GPU against one GPU.
With ``--kill-child``, at the largest count, one child is killed (-9) mid-stream: the supervisor restarts it, its
job is reclaimed, and the stream's other jobs go on (the record of each job and the restart are in the results).
The host's CPU use over each stream comes from /proc/stat.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

from benchmarks.context import Context
from benchmarks.services import client_for, log_dir, queue_stream, services, submit, worker_args


def _cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole host since boot."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _gpu_workers(ctx: Context, gpus: str, compile_mode: str, log_name: str) -> Any:
    """``pixq worker --gpus GPUS`` (the supervisor, one child per GPU); returns once all announced."""
    from pixq.wire import WORKER_KEY_PREFIX

    from tests.services import Service, pixq_argv

    env = services(ctx)
    want = len(gpus.split(","))
    argv = pixq_argv("worker", "--model", str(ctx.model_dir), "--gpus", gpus,
                     *worker_args(ctx, compile_mode, ctx.args.compile_cache))
    started = time.monotonic()
    svc = Service(f"workers {gpus}", argv, log_dir(ctx) / f"{log_name}.log", env=env).start()
    client = client_for(env)

    def presences() -> list[dict[str, Any]]:
        keys = client.conn.scan_iter(WORKER_KEY_PREFIX + "*")
        return [json.loads(client.conn.get(k) or "{}") for k in keys]

    def announced() -> bool:
        return len([p for p in presences() if str(p.get("name", "")).startswith("gpu") and p.get("serving")]) >= want

    svc.wait_until(announced, ctx.args.worker_timeout_s)
    return svc, client, time.monotonic() - started, presences


def _kill_one_child(presences: Any, delay_s: float, out: dict[str, Any]) -> threading.Thread:
    def kill() -> None:
        time.sleep(delay_s)
        victim = next((p for p in presences() if str(p.get("name", "")).startswith("gpu1")), None)
        if victim and victim.get("pid"):
            os.kill(int(victim["pid"]), signal.SIGKILL)
            out.update(killed=victim["name"], pid=victim["pid"], at_s=delay_s)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def phase_multigpu(ctx: Context, compile_mode: str) -> None:
    """Throughput with one worker process per GPU at each count (issue 5: 1 and 2; issue 28: up to 8)."""
    import torch

    visible = torch.cuda.device_count()
    counts = [n for n in (int(c) for c in ctx.args.gpu_counts.split(",")) if 1 <= n <= visible] or [1]
    res: dict[str, Any] = {"gpus_visible": visible, "counts": counts}
    ctx.results[f"multigpu[{compile_mode}]"] = res
    images = ctx.args.images
    for n in counts:
        gpus = ",".join(str(i) for i in range(n))
        svc, client, ready_s, presences = _gpu_workers(ctx, gpus, compile_mode, f"workers-{n}")
        try:
            entry: dict[str, Any] = {"all_ready_s": ready_s}
            warm = [submit(client, ctx, 200 + i, "exact") for i in range(2 * n)]
            for job in warm:
                client.wait(job.id, timeout_s=600, poll_s=0.02)
            killing: dict[str, Any] = {}
            killer = (_kill_one_child(presences, 5.0, killing)
                      if ctx.args.kill_child and n == counts[-1] and n > 1 else None)
            ctx.args.images = images * n  # a burst that keeps every GPU busy for the same time
            for k, mode in enumerate(ctx.args.multigpu_modes.split(",")):
                busy0, total0 = _cpu_busy()
                stream = queue_stream(ctx, client, mode, offset=1000 * n + 100_000 * k)
                busy1, total1 = _cpu_busy()
                stream["host_cpu_busy_cores"] = (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1)
                if k == 0:
                    entry.update(stream)
                else:
                    entry.setdefault("modes", {})[mode] = stream
            ctx.args.images = images
            entry["workers"] = sorted({client.status(j.id).worker or "" for j in warm})
            if killer is not None:
                killer.join()
                entry["kill"] = killing
            res[f"{n}_gpu"] = entry
        finally:
            ctx.args.images = images
            client.close()
            svc.stop(timeout_s=60)
        ctx.save()
    one = res.get("1_gpu")
    for n in counts[1:]:
        if one and res.get(f"{n}_gpu"):
            rate = res[f"{n}_gpu"]["steady_images_per_s"]
            res[f"{n}_gpu"]["scaling"] = rate / one["steady_images_per_s"]
            res[f"{n}_gpu"]["efficiency"] = res[f"{n}_gpu"]["scaling"] / n
            print(f"multigpu: {n} GPUs {rate:.3f} img/s, {res[f'{n}_gpu']['scaling']:.2f}x one GPU "
                  f"({res[f'{n}_gpu']['efficiency']:.1%} per GPU), ready {res[f'{n}_gpu']['all_ready_s']:.1f} s",
                  flush=True)


def run(ctx: Context) -> None:
    for mode in ctx.compile_modes:
        phase_multigpu(ctx, mode)
