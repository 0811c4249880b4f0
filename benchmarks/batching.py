"""Micro-batching benchmark (issue 13): the 512² model card vs the queue with batching on and off.

One run, one device, the full-size random-weight architecture (``benchmarks.fullsize``):

Two checkpoints of the architecture: the 512 one (``TRANSFORMER_512``: a 512² job renders at 512²) and
the 1024 one (on which a 512² job renders at a 1024² bin and is resized: never time "512²" on it).

card      the model card's plain pipeline (fp16, eager, batch 1): 512² on the 512 checkpoint, 1024² on the
          1024 one
queue     ``pixq worker --compile --warmup 512x512`` on the 512 checkpoint (real Redis, SeaweedFS, Celery),
          the per-size default batch policy: a burst of unique-prompt 512² jobs, exact then fast, with
          batching on and off (the same jobs made incompatible: each its own guidance scale, 4.5 + i·1e-6,
          so every job renders alone with the same graphs); batch invariance (4 jobs alone, then the same 4
          in one batch, pixels compared); a mixed stream (512² and 768×512, exact and fast, random order);
          idle single jobs. Then ``pixq worker --compile --warmup 1024x1024`` on the 1024 checkpoint: a
          1024² exact burst and idle single jobs (no regression: one image per call there)
profile   in process, 512 checkpoint: seconds per image by batch size, torch profiler of one render alone
          and of a batch of 8, VAE decode per image vs batched

    python3 -m benchmarks.batching --out OUT [--tiny] [--phases build,card,queue,profile]

``--tiny`` runs it on the CPU with the tiny model at 128²/256² and a few jobs (checks the harness only).
Results: OUT/results.json after each phase; a short table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.measure import free_cuda, image_diff, summary, sync

WORDS = ("red", "blue", "quiet", "stormy", "ancient", "glass", "forest", "harbor", "neon", "marble", "desert",
         "violin", "lantern", "orchid", "comet", "bridge", "tiger", "paper", "copper", "island")


def prompt(i: int) -> str:
    """A unique prompt per index (a repeated prompt would hit the worker's embedding cache)."""
    rng = random.Random(i)
    return f"job {i}: a " + " ".join(rng.choice(WORDS) for _ in range(12)) + ", detailed illustration"


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tiny = bool(args.tiny)
        self.device = "cpu" if self.tiny else "cuda:0"
        self.small = 128 if self.tiny else 512
        self.large = 256 if self.tiny else 1024
        self.model_dir = Path(args.model_dir).resolve()  # the 1024 checkpoint
        self.small_model = Path(args.model_dir + "-512").resolve() if not self.tiny else self.model_dir
        self.results: dict[str, Any] = {}
        self.services: list[Any] = []
        self.env: dict[str, str] = {}
        self.started = time.perf_counter()
        self.next_index = 0

    def index(self) -> int:
        self.next_index += 1
        return self.next_index

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))

    def left_s(self) -> float:
        return self.args.deadline_s - (time.perf_counter() - self.started)


# -- card ---------------------------------------------------------------------------------------------


def phase_card(b: Bench) -> None:
    import torch
    from diffusers import PixArtSigmaPipeline

    dtype = torch.float16 if b.device.startswith("cuda") else torch.float32
    res: dict[str, Any] = {"dtype": str(dtype)}
    for size, n, model in ((b.small, b.args.card_images, b.small_model),
                           (b.large, max(3, b.args.card_images // 2), b.model_dir)):
        pipe = PixArtSigmaPipeline.from_pretrained(model, torch_dtype=dtype).to(b.device)
        pipe.set_progress_bar_config(disable=True)
        pipe(prompt(-1), width=size, height=size, generator=torch.Generator("cpu").manual_seed(0))  # warm
        times = []
        for i in range(n):
            sync(b.device)
            t0 = time.perf_counter()
            pipe(prompt(10_000 + i), width=size, height=size, generator=torch.Generator("cpu").manual_seed(i))
            sync(b.device)
            times.append(time.perf_counter() - t0)
        res[str(size)] = summary(times)
        del pipe
        free_cuda()
    b.results["card"] = res


# -- queue --------------------------------------------------------------------------------------------


def _services(b: Bench) -> dict[str, str]:
    from benchmarks.services import start_stack

    if not b.env:
        b.env = start_stack(Path("/tmp/pixq-batching") / f"services-{os.getpid()}", b.model_dir, b.services)
    return b.env


@contextlib.contextmanager
def _worker(b: Bench, model: Path, size: int, extra: tuple[str, ...], log_name: str) -> Iterator[tuple[Any, float]]:
    from pixq.client import Client
    from pixq.settings import Settings

    from tests.services import start_worker

    # Dynamo logs why it recompiles (run a: every new batch size compiled new graphs on the GPU).
    env = {**_services(b), "TORCH_LOGS": "recompiles"}
    log_path = Path("/tmp/pixq-batching") / f"{log_name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    args = ("--warmup", f"{size}x{size}", "--no-defer-warmup",
            "--compile-cache", str(b.args.compile_cache)) + (() if b.tiny else ("--compile",)) + extra
    t0 = time.perf_counter()
    svc = start_worker(env, str(model), log_path, device=b.device, extra=args, timeout_s=b.args.worker_timeout_s)
    start_s = time.perf_counter() - t0
    client = Client(Settings.from_env(env))
    try:
        yield client, start_s
    except Exception:
        print(f"--- {log_path} (tail)\n{svc.log_tail(60)}", file=sys.stderr)
        raise
    finally:
        client.close()
        svc.stop()
        with contextlib.suppress(OSError):
            (b.out / f"{log_name}.log").write_text("\n".join(log_path.read_text(errors="replace").splitlines()[-300:]))


def _submit(client: Any, b: Bench, size: tuple[int, int], mode: str = "exact", **extra: Any) -> Any:
    i = extra.pop("index", None)
    i = b.index() if i is None else i
    model = extra.pop("model", b.small_model)
    return client.submit(extra.pop("prompt", prompt(i)), seed=extra.pop("seed", 1000 + i), width=size[0],
                         height=size[1], mode=mode, model_name=str(model), **extra)


def _burst(client: Any, b: Bench, kinds: list[tuple[tuple[int, int], str, dict[str, Any]]]) -> dict[str, Any]:
    """Submit every job at once, wait for all; throughput, waits, batch sizes."""
    jobs = [_submit(client, b, size, mode, **dict(extra)) for size, mode, extra in kinds]
    records = [client.wait(j.id, timeout_s=600, poll_s=0.02) for j in jobs]
    created = min(r.created_at for r in records)
    finished = sorted(r.finished_at for r in records)
    n = len(records)
    latency = [r.finished_at - r.created_at for r in records]
    # When its render began: the end of the render is the record's finish less the store; approximate the
    # render's start as finished - store - render; store is small against a render, so report both bounds.
    render_started = [r.finished_at - r.render.render_s - r.created_at for r in records if r.render]
    batch_jobs = [r.render.batch_jobs for r in records if r.render]
    return {
        "n": n, "states": sorted({r.state.value for r in records}),
        "images_per_s": n / (finished[-1] - created),
        "s_per_image": (finished[-1] - created) / n,
        "latency_max_s": max(latency), "latency_p50_s": summary(latency)["p50_s"],
        "render_start_wait_max_s": max(render_started) if render_started else None,
        "batch_jobs_mean": sum(batch_jobs) / len(batch_jobs) if batch_jobs else None,
        "batch_jobs_hist": {str(k): batch_jobs.count(k) for k in sorted(set(batch_jobs))},
        "render_s_p50": summary([r.render.render_s for r in records if r.render]).get("p50_s"),
    }


def _images(client: Any, record: Any) -> list[Any]:
    from PIL import Image

    s3 = client.s3()
    return [Image.open(io.BytesIO(s3.get_object(Bucket=im.bucket, Key=im.key)["Body"].read())).convert("RGB")
            for im in record.images]


def _invariance(client: Any, b: Bench, n: int = 4) -> dict[str, Any]:
    """The same n jobs alone (idle worker, one at a time), then together behind a blocker."""
    base = [b.index() for _ in range(n)]
    alone = []
    for i in base:
        r = _submit(client, b, (b.small, b.small), index=i).wait(timeout_s=600, poll_s=0.01)
        alone.append(r)
    blocker = _submit(client, b, (b.small, b.small), guidance_scale=4.25, num_inference_steps=60)  # alone
    together = [_submit(client, b, (b.small, b.small), index=i) for i in base]
    blocker.wait(timeout_s=600)
    batched = [j.wait(timeout_s=600, poll_s=0.01) for j in together]
    diffs = [image_diff(_images(client, a)[0], _images(client, t)[0]) for a, t in zip(alone, batched, strict=True)]
    return {"alone_batch_jobs": [r.render.batch_jobs for r in alone if r.render],
            "together_batch_jobs": [r.render.batch_jobs for r in batched if r.render],
            "max_abs": max(d["max_abs"] for d in diffs), "min_psnr_db": min(d["psnr_db"] for d in diffs),
            "diffs": diffs}


def _idle(client: Any, b: Bench, size: tuple[int, int], rounds: int, **extra: Any) -> list[dict[str, Any]]:
    rows = []
    for _ in range(rounds):
        time.sleep(1.0)
        r = _submit(client, b, size, **extra).wait(timeout_s=600, poll_s=0.005)
        rows.append({"latency_s": r.finished_at - r.created_at, "render_s": r.render.render_s if r.render else None,
                     "overhead_s": r.finished_at - r.created_at - (r.render.render_s if r.render else 0)})
    return rows


def phase_queue(b: Bench) -> None:
    res: dict[str, Any] = {}
    b.results["queue"] = res
    n = b.args.jobs
    small = (b.small, b.small)
    wide = (b.small * 3 // 2, b.small)  # 768×512: its own bin of the 512 checkpoint
    policy = (() if b.args.max_batch == 0 else ("--max-batch", str(b.args.max_batch))) \
        + (("--compile-batches",) if b.args.compile_batches else ())
    if b.args.only_large:
        _large(b, res, policy)
        return
    with _worker(b, b.small_model, b.small, policy, "worker-512") as (client, start_s):
        res["worker_512_start_s"] = start_s
        t0 = time.perf_counter()
        _burst(client, b, [(small, "fast", {}) for _ in range(4)])  # untimed: first batches
        _burst(client, b, [(small, "exact", {}) for _ in range(4)])
        res["untimed_warm_s"] = time.perf_counter() - t0
        b.save()
        for mode in ("exact", "fast"):
            res[f"{mode}_on"] = _burst(client, b, [(small, mode, {}) for _ in range(n)])
            if b.args.long_burst:  # steady state: the lone first job and the last partial batch matter less
                res[f"{mode}_on_{b.args.long_burst}"] = _burst(client, b, [(small, mode, {})
                                                                        for _ in range(b.args.long_burst)])
            if b.args.skip_off:
                continue
            # Off: every job its own guidance scale, so no two share a call (same graphs, same work).
            res[f"{mode}_off"] = _burst(client, b, [(small, mode, {"guidance_scale": 4.5 + k * 1e-6})
                                                    for k in range(n)])
            b.save()
        res["invariance"] = _invariance(client, b)
        b.save()
        rng = random.Random(7)
        choices: list[tuple[tuple[int, int], str, dict[str, Any]]] = [
            (small, "exact", {}), (small, "fast", {}), (wide, "exact", {}), (wide, "fast", {})]
        kinds = [rng.choice(choices) for _ in range(b.args.mixed)]
        res["mixed"] = {**_burst(client, b, kinds),
                        "kinds": {k: sum(1 for s, m, _ in kinds if f"{s[0]}x{s[1]}/{m}" == k)
                                  for k in sorted({f"{s[0]}x{s[1]}/{m}" for s, m, _ in kinds})}}
        res["idle_small"] = _idle(client, b, small, 3)
        b.save()
    if b.left_s() < 200:
        res["large_skipped"] = f"{b.left_s():.0f} s left"
        return
    _large(b, res, policy)


def _large(b: Bench, res: dict[str, Any], policy: tuple[str, ...]) -> None:
    large = (b.large, b.large)
    with _worker(b, b.model_dir, b.large, policy, "worker-1024") as (client, start_s):
        res["worker_1024_start_s"] = start_s
        _submit(client, b, large, model=b.model_dir).wait(timeout_s=600)  # untimed: first job
        res["large_exact"] = _burst(client, b, [(large, "exact", {"model": b.model_dir})
                                                for _ in range(b.args.large_jobs)])
        res["idle_large"] = _idle(client, b, large, 3, model=b.model_dir)
    b.save()


# -- profile ------------------------------------------------------------------------------------------


def phase_profile(b: Bench) -> None:
    import torch
    from pixq.schema import JobRequest
    from pixq.worker.gpu.batch import BatchPolicy, render_batch
    from pixq.worker.gpu.pipeline import PipelineOptions, load_pipeline
    from pixq.worker.gpu.speedups import SpeedupOptions
    from torch.profiler import ProfilerActivity, profile

    res: dict[str, Any] = {}
    b.results["profile"] = res
    if b.left_s() < 100:
        res["skipped"] = f"{b.left_s():.0f} s left"
        return
    loaded = load_pipeline(str(b.small_model), b.device, PipelineOptions(
        speedups=SpeedupOptions(compile=not b.tiny, compile_batches=b.args.compile_batches),
        compile_cache=str(b.args.compile_cache), warmup=[(b.small, b.small)], warmup_modes=("exact",),
        batch=BatchPolicy(max_batch=8)))

    def requests(k: int) -> list[Any]:
        return [JobRequest.model_validate({"prompt": prompt(b.index()), "seed": i, "width": b.small,
                                           "height": b.small, "model_name": str(b.small_model)}) for i in range(k)]

    sizes = tuple(int(k) for k in b.args.profile_sizes.split(",") if k) if not b.tiny else (1, 2, 4)
    per_image = {}
    for k in sizes:
        render_batch(loaded, requests(k))  # a new batch size: its first call (allocations)
        times = []
        for _ in range(2):
            sync(b.device)
            t0 = time.perf_counter()
            render_batch(loaded, requests(k))
            sync(b.device)
            times.append(time.perf_counter() - t0)
        per_image[str(k)] = min(times) / k
        if b.left_s() < 60:
            break
    res["render_s_per_image_by_batch"] = per_image
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.device.startswith("cuda") else [])
    for k in (1, 8):
        reqs = requests(k)
        sync(b.device)
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            render_batch(loaded, reqs)
            sync(b.device)
        wall = time.perf_counter() - t0
        events = prof.key_averages()
        key = "device_time_total" if b.device.startswith("cuda") else "cpu_time_total"
        top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:25]
        gpu_total = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6
        res[f"batch{k}"] = {
            "wall_s": wall, "gpu_busy_s": gpu_total if b.device.startswith("cuda") else None,
            "top": [{"name": e.key[:80], "count": e.count, "cpu_total_ms": e.cpu_time_total / 1e3,
                     "self_cpu_ms": e.self_cpu_time_total / 1e3,
                     "device_total_ms": getattr(e, "device_time_total", 0) / 1e3,
                     "self_device_ms": getattr(e, "self_device_time_total", 0) / 1e3} for e in top],
        }
        (b.out / f"profile-batch{k}.txt").write_text(
            events.table(sort_by="self_device_time_total" if b.device.startswith("cuda") else "self_cpu_time_total",
                         row_limit=40))
    # VAE: one decode per image (the compiled decoder's way) vs one batched eager decode.
    vae = loaded.pipe.vae
    latents = torch.randn(4, 4, b.small // 8, b.small // 8, device=b.device, dtype=vae.dtype)
    vae_res = {}
    with torch.inference_mode():
        for name, run in (("per_image", lambda: vae.decode(latents / vae.config.scaling_factor)),):
            run()
            sync(b.device)
            t0 = time.perf_counter()
            run()
            sync(b.device)
            vae_res[name] = (time.perf_counter() - t0) / 4
        speedups = loaded.speedups
        if speedups is not None:
            with speedups.eager():
                vae.decode(latents / vae.config.scaling_factor)
                sync(b.device)
                t0 = time.perf_counter()
                vae.decode(latents / vae.config.scaling_factor)
                sync(b.device)
                vae_res["batched_eager"] = (time.perf_counter() - t0) / 4
    res["vae_s_per_image_batch4"] = vae_res
    b.save()


# -- main ---------------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    lines = []
    card = results.get("card", {})
    q = results.get("queue", {})
    for size in ("512", "1024", "128", "256"):
        if size in card:
            lines.append(f"card {size}: p50 {card[size]['p50_s']:.3f} s/image")
    small_card = next((card[s]["p50_s"] for s in ("512", "128") if s in card), None)
    large_card = next((card[s]["p50_s"] for s in ("1024", "256") if s in card), None)
    keys = [k for k in q if k.startswith(("exact_on", "exact_off", "fast_on", "fast_off"))]
    for key in keys + ["mixed", "large_exact"]:
        if key in q:
            r = q[key]
            ref = large_card if key == "large_exact" else small_card
            ratio = f" = {1 / r['s_per_image'] / (1 / ref):.2f}x card" if ref and key != "mixed" else ""
            lines.append(f"queue {key}: {r['images_per_s']:.2f} img/s ({r['s_per_image']:.3f} s/img){ratio}; "
                         f"batch mean {r['batch_jobs_mean']}, max latency {r['latency_max_s']:.2f} s")
    if "invariance" in q:
        lines.append(f"invariance: max |d| {q['invariance']['max_abs']}, min PSNR {q['invariance']['min_psnr_db']:.1f}")
    for key in ("idle_large", "idle_small"):
        if key in q:
            lines.append(f"{key}: overhead " + ", ".join(f"{r['overhead_s'] * 1000:.0f} ms" for r in q[key]))
    p = results.get("profile", {})
    if "render_s_per_image_by_batch" in p:
        lines.append("render s/image by batch: " + ", ".join(f"{k}: {v:.3f}"
                                                             for k, v in p["render_s_per_image_by_batch"].items()))
    for k in ("batch1", "batch8"):
        if k in p:
            lines.append(f"profile {k}: wall {p[k]['wall_s']:.3f} s, GPU busy {p[k]['gpu_busy_s']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--model-dir", default="/tmp/pixq-batching/model")
    parser.add_argument("--compile-cache", default="/tmp/pixq-batching/inductor")
    parser.add_argument("--phases", default="build,card,queue,profile")
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=0,
                        help="the workers' --max-batch (default 0: the per-size default policy)")
    parser.add_argument("--compile-batches", action="store_true", help="the workers' --compile-batches")
    parser.add_argument("--skip-off", action="store_true", help="no batching-off bursts")
    parser.add_argument("--only-large", action="store_true", help="queue: only the 1024 checkpoint's worker")
    parser.add_argument("--long-burst", type=int, default=0, help="also a burst of this many jobs per mode")
    parser.add_argument("--profile-sizes", default="1,2,4,8,16", help="batch sizes timed in the profile phase")
    parser.add_argument("--mixed", type=int, default=48)
    parser.add_argument("--large-jobs", type=int, default=12)
    parser.add_argument("--card-images", type=int, default=8)
    parser.add_argument("--deadline-s", type=float, default=560)
    parser.add_argument("--worker-timeout-s", type=float, default=420)
    args = parser.parse_args(argv)
    b = Bench(args)
    try:
        for phase in args.phases.split(","):
            t0 = time.perf_counter()
            if phase == "build":
                from benchmarks.fullsize import ensure_model, ensure_model_512

                b.results["build"] = ensure_model(b.model_dir, b.device, tiny=b.tiny)[1]
                if not b.tiny:
                    b.results["build"].update(ensure_model_512(b.model_dir, b.small_model, b.device)[1])
            else:
                {"card": phase_card, "queue": phase_queue, "profile": phase_profile}[phase](b)
            b.results.setdefault("phase_s", {})[phase] = time.perf_counter() - t0
            b.save()
            print(f"phase {phase}: {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        for svc in b.services:
            svc.stop()
        b.save()
        print(table(b.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
