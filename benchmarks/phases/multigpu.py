"""multigpu[MODE]: throughput through the queue with one worker process per GPU, 1 GPU then 2."""

from __future__ import annotations

import json
from typing import Any

from benchmarks.context import Context
from benchmarks.services import client_for, log_dir, queue_stream, services, submit, worker_args


def _gpu_workers(ctx: Context, gpus: str, compile_mode: str, log_name: str) -> Any:
    """``pixq worker --gpus GPUS`` (the supervisor, one child per GPU); returns once all announced."""
    from pixq.wire import WORKER_KEY_PREFIX

    from tests.services import Service, pixq_argv

    env = services(ctx)
    want = len(gpus.split(","))
    argv = pixq_argv("worker", "--model", str(ctx.model_dir), "--gpus", gpus,
                     *worker_args(ctx, compile_mode, ctx.args.compile_cache))
    svc = Service(f"workers {gpus}", argv, log_dir(ctx) / f"{log_name}.log", env=env).start()
    client = client_for(env)

    def announced() -> bool:
        keys = client.conn.scan_iter(WORKER_KEY_PREFIX + "*")
        names = [json.loads(client.conn.get(k) or "{}").get("name") for k in keys]
        return len([n for n in names if n and n.startswith("gpu")]) >= want

    svc.wait_until(announced, ctx.args.worker_timeout_s)
    return svc, client


def phase_multigpu(ctx: Context, compile_mode: str) -> None:
    """Throughput through the queue with one worker process per GPU: 1 GPU, then 2 (issue 5)."""
    import torch

    res: dict[str, Any] = {"gpus_visible": torch.cuda.device_count()}
    ctx.results[f"multigpu[{compile_mode}]"] = res
    for gpus in ("0", "0,1")[: max(1, min(2, torch.cuda.device_count()))]:
        svc, client = _gpu_workers(ctx, gpus, compile_mode, f"workers-{gpus.replace(',', '-')}")
        try:
            n_gpus = len(gpus.split(","))
            # Warm every worker (first jobs pick kernels), then a burst that keeps all of them busy.
            warm = [submit(client, ctx, 200 + i, "exact") for i in range(2 * n_gpus)]
            for job in warm:
                client.wait(job.id, timeout_s=600, poll_s=0.02)
            res[f"{n_gpus}_gpu"] = queue_stream(ctx, client, "exact", offset=0)
            res[f"{n_gpus}_gpu"]["workers"] = sorted({client.status(j.id).worker or "" for j in warm})
        finally:
            client.close()
            svc.stop(timeout_s=60)
        ctx.save()
    one, two = res.get("1_gpu"), res.get("2_gpu")
    if one and two:
        res["scaling"] = two["steady_images_per_s"] / one["steady_images_per_s"]
        print(f"multigpu: 1 GPU {one['steady_images_per_s']:.3f} img/s, 2 GPUs {two['steady_images_per_s']:.3f} "
              f"img/s, scaling {res['scaling']:.2f}x", flush=True)


def run(ctx: Context) -> None:
    for mode in ctx.compile_modes:
        phase_multigpu(ctx, mode)
