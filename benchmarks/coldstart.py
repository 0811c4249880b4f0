"""Issue 14: worker cold start with `pixq compile`'s artefacts vs today's compiled worker, through the queue.

One run, everything in the same process tree on one GPU:

1. the full-size 1024 model (benchmarks.fullsize) and a 512 model (the same weights, the 512-MS transformer
   config: sample size 64, interpolation scale 1);
2. ``pixq compile`` of both models (two processes at once), timed;
3. Redis + SeaweedFS, then worker starts, each with one exact job submitted before the process starts
   (process start -> that job succeeded), the first fast job after it (service time), steady exact and
   fast streams of unique prompts, and fixed-seed jobs whose images are compared across workers:
   * ``aot_1024``: ``--compile --compile-cache C --artefacts A --warmup 1024x1024`` (artefacts present);
   * ``aot_512``: the same on the 512 model at 512²;
   * ``today_cold`` / ``today_warm``: ``--compile --compile-cache C2 --warmup 1024x1024`` with an empty
     artefact root (the fallback: the cold-artefact time), then again on the now warm cache (today's
     shipped configuration).

    python3 -m benchmarks.coldstart --out $OUT              # on the device (kit installed, weed on PATH)
    python -m benchmarks.coldstart --tiny --out /tmp/cs     # the harness on a CPU with the tiny model
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "A small cactus with a happy face in the Sahara desert.",
    "An astronaut riding a horse on the moon, photorealistic, 8k.",
    "A bowl of ramen with steam rising, studio lighting, top view.",
    "A watercolor painting of a lighthouse on a cliff at sunset.",
    "Portrait of an old fisherman, dramatic light, film grain.",
    "A city street at night in the rain with neon reflections.",
]


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.device = "cpu" if args.tiny else "cuda:0"
        self.results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
        self.started = time.perf_counter()
        self.services: list[Any] = []
        self.env: dict[str, str] = {}
        self.counter = 0

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))

    def left_s(self) -> float:
        return self.args.deadline_s - (time.perf_counter() - self.started)


def build_models(run: Run) -> tuple[Path, Path]:
    from benchmarks.fullsize import ensure_model

    big, info = ensure_model(run.work / "model", run.device, tiny=run.args.tiny)
    run.results["build"] = info
    small = run.work / "model512"
    if not small.exists():  # same weights, the 512-MS transformer config (or half the tiny one's grid)
        small.mkdir()
        for item in big.iterdir():
            if item.name != "transformer":
                (small / item.name).symlink_to(item)
        (small / "transformer").mkdir()
        for item in (big / "transformer").iterdir():
            if item.name != "config.json":
                (small / "transformer" / item.name).symlink_to(item)
        config = json.loads((big / "transformer" / "config.json").read_text())
        config["sample_size"] //= 2
        config["interpolation_scale"] = max(1, (config.get("interpolation_scale") or 2) // 2)
        (small / "transformer" / "config.json").write_text(json.dumps(config))
    return big, small


def sizes(run: Run) -> tuple[int, int]:
    return (256, 128) if run.args.tiny else (1024, 512)


def compile_all(run: Run, big: Path, small: Path, root: Path) -> None:
    from tests.services import pixq_argv

    size_big, size_small = sizes(run)
    procs = []
    t0 = time.perf_counter()
    for model, size in ((big, size_big), (small, size_small))[: 2 if run.args.small else 1]:
        log = open(run.out / f"compile-{size}.log", "w")  # noqa: SIM115 (closed below)
        argv = pixq_argv("compile", "--model", str(model), "--device", run.device, "--out", str(root),
                         "--size", f"{size}x{size}")
        procs.append((size, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log, time.perf_counter()))
    res: dict[str, Any] = {}
    for size, proc, log, started in procs:
        code = proc.wait(timeout=max(run.left_s(), 10))
        log.close()
        text = (run.out / f"compile-{size}.log").read_text()
        res[f"{size}"] = {"rc": code, "s": time.perf_counter() - started,
                          "lines": [line for line in text.splitlines() if line.startswith(("compiled", "error"))]}
        if code != 0:
            print(text[-3000:], file=sys.stderr)
            raise SystemExit(f"pixq compile {size} failed (rc {code})")
    res["wall_s"] = time.perf_counter() - t0
    manifests = {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/manifest.json")}
    res["sets"] = {name: {"key": m["key"], "build_s": m["build_s"],
                          "graphs": [{k: g[k] for k in ("component", "width", "height", "bytes", "export_s",
                                                        "compile_s")} for g in m["graphs"]]}
                   for name, m in manifests.items()}
    res["package_mb"] = sum(g["bytes"] for m in manifests.values() for g in m["graphs"]) / 1e6
    run.results["compile"] = res
    run.save()


def import_breakdown(run: Run) -> None:
    """Which imports the worker's start pays for (python -X importtime, cumulative, top level)."""
    code = "import pixq.worker.ops.serve, pixq.worker.jobs.tasks; from diffusers import PixArtSigmaPipeline"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          env={**os.environ, **run.env})
    wall = time.perf_counter() - t0
    rows = []
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(3)) <= 2:
            rows.append((int(m.group(2)) / 1e6, m.group(4)))
    rows.sort(reverse=True)
    t1 = time.perf_counter()
    if not run.args.tiny:
        subprocess.run([sys.executable, "-c", "import torch; torch.empty(1, device='cuda')"], check=True)
    run.results["imports"] = {"wall_s": wall, "top_s": rows[:12], "torch_plus_cuda_init_s": time.perf_counter() - t1}
    run.save()


def services(run: Run) -> None:
    from tests.services import start_redis, start_seaweedfs

    svc, redis_url = start_redis(run.work / "redis")
    run.services.append(svc)
    svc, endpoint = start_seaweedfs(run.work / "s3", bucket="pixq-bench")
    run.services.append(svc)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIXQ_", "AWS_"))}
    env.update(endpoint.env())
    env.update({"PIXQ_REDIS_URL": redis_url, "PIXQ_S3_PREFIX": "bench", "PYTHONUNBUFFERED": "1"})
    run.env = env
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})


def client(run: Run) -> Any:
    from pixq.client import Client
    from pixq.settings import Settings

    return Client(Settings.from_env(run.env))


def submit(run: Run, c: Any, model: Path, size: int, mode: str, prompt: str | None = None, seed: int | None = None,
           steps: int | None = None) -> Any:
    run.counter += 1
    text = prompt or f"{PROMPTS[run.counter % len(PROMPTS)]} (variation {run.counter})"
    extra = {"num_inference_steps": steps} if steps else {}
    return c.submit(text, seed=seed if seed is not None else 1000 + run.counter, width=size, height=size, mode=mode,
                    model_name=str(model), **extra)


def image_of(c: Any, record: Any) -> Any:
    import numpy as np
    from PIL import Image

    image = record.images[0]
    body = c.s3().get_object(Bucket=image.bucket, Key=image.key)["Body"].read()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype("int16")


def worker_start(run: Run, label: str, model: Path, size: int, extra: tuple[str, ...], stream: int,
                 fidelity: bool, burst: int = 0) -> dict[str, Any]:
    """Start a worker with one exact job waiting; then first fast job, streams, fidelity jobs."""
    from pixq.wire import WORKER_KEY_PREFIX

    from tests.services import start_worker

    c = client(run)
    steps = 4 if run.args.tiny else None
    t0 = time.time()
    first = submit(run, c, model, size, "exact", steps=steps)
    env = {**run.env, "PIXQ_MODEL": str(model)}
    svc = start_worker(env, str(model), run.out / f"worker-{label}.log", device=run.device,
                       extra=("--warmup", f"{size}x{size}", *extra), timeout_s=run.args.worker_timeout_s)
    item: dict[str, Any] = {}
    try:
        rec = c.wait(first.id, timeout_s=run.args.worker_timeout_s, poll_s=0.01)
        item.update(state=rec.state.value, start_to_first_image_s=rec.finished_at - t0,
                    first_exact_service_s=rec.finished_at - (rec.started_at or rec.finished_at),
                    first_exact_render_s=rec.render.render_s if rec.render else None)
        for key in c.conn.scan_iter(WORKER_KEY_PREFIX + "*"):
            presence = json.loads(c.conn.get(key) or "{}")
            if presence.get("pid") == svc.pid:
                item.update(presence_after_s=presence["started_at"] - t0, artefacts=presence.get("artefacts"),
                            phases=presence.get("start_phases_s"))
        fast = c.wait(submit(run, c, model, size, "fast", steps=steps).id, timeout_s=600, poll_s=0.01)
        item.update(first_fast_service_s=fast.finished_at - (fast.started_at or fast.finished_at),
                    first_fast_render_s=fast.render.render_s if fast.render else None)
        for mode in ("exact", "fast"):
            if stream <= 0 or run.left_s() < 60:
                break
            jobs = [submit(run, c, model, size, mode, steps=steps) for _ in range(stream)]
            recs = [c.wait(j.id, timeout_s=600, poll_s=0.02) for j in jobs]
            ends = sorted(r.finished_at for r in recs)
            renders = sorted(r.render.render_s for r in recs if r.render)
            item[f"steady_{mode}"] = {"images_per_s": (len(ends) - 1) / (ends[-1] - ends[0]),
                                      "render_p50_s": renders[len(renders) // 2],
                                      "failed": sum(r.state.value != "succeeded" for r in recs)}
        for mode in ("exact", "fast"):  # jobs submitted at once: the batch policy's full batches
            if burst <= 0 or run.left_s() < 60:
                break
            t1 = time.time()
            jobs = [submit(run, c, model, size, mode, steps=steps) for _ in range(burst)]
            recs = [c.wait(j.id, timeout_s=600, poll_s=0.02) for j in jobs]
            item[f"burst_{mode}"] = {"jobs": burst, "s_per_image": (max(r.finished_at for r in recs) - t1) / burst,
                                     "failed": sum(r.state.value != "succeeded" for r in recs),
                                     "batch_jobs": sorted({r.render.batch_jobs for r in recs if r.render})}
        if fidelity:
            images = {}
            for i in range(2):
                for mode in ("exact", "fast"):
                    job = submit(run, c, model, size, mode, prompt=PROMPTS[i], seed=7 + i, steps=steps)
                    images[f"{i}/{mode}"] = image_of(c, c.wait(job.id, timeout_s=600, poll_s=0.02))
            item["_images"] = images
        log = (run.out / f"worker-{label}.log").read_text(errors="replace")
        item["log_lines"] = [line.split("] ", 1)[-1] for line in log.splitlines()
                             if re.search(r"compiled artefacts|loaded .* in|warm-up|ready .* after", line)][:12]
    finally:
        svc.stop()
    return item


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in a.get("_images", {}):
        if key in b.get("_images", {}):
            d = abs(a["_images"][key] - b["_images"][key])
            out[key] = {"max": int(d.max()), "mean": float(d.mean())}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "coldstart-out")))
    p.add_argument("--work", default="/tmp/pixq-coldstart")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--stream", type=int, default=12)
    p.add_argument("--deadline-s", type=float, default=560)
    p.add_argument("--worker-timeout-s", type=float, default=300)
    p.add_argument("--small", action=argparse.BooleanOptionalAction, default=True, help="the 512 model too")
    p.add_argument("--skip-today", action="store_true", help="no torch.compile worker (cold and warm cache)")
    p.add_argument("--phases", default="compile,starts",
                   help="compile: build the models and pixq compile them (the sets are copied to OUT/sets); "
                        "starts: the worker starts (on the sets of an earlier compile phase in --work, or "
                        "--sets-from)")
    p.add_argument("--sets-from", type=Path, action="append",
                   help="a root of artefact sets to copy in first (OUT/sets of an earlier run); repeatable")
    p.add_argument("--burst-small", type=int, default=0, help="jobs per mode in a burst on the 512 worker")
    p.add_argument("--fidelity", action=argparse.BooleanOptionalAction, default=True,
                   help="fixed-seed jobs on the AOT and today's 1024 workers, compared pixel by pixel")
    p.add_argument("--today-warm-all", action="store_true", help="today's worker compiles fast mode at start too")
    p.add_argument("--skip-today-warm", action="store_true", help="no second start of today's worker")
    args = p.parse_args(argv)
    phases = set(args.phases.split(","))
    run = Run(args)
    big, small = build_models(run)
    root = run.work / "artefacts"
    empty = run.work / "no-artefacts"
    empty.mkdir(exist_ok=True)
    size_big, size_small = sizes(run)
    try:
        for source in args.sets_from or []:  # sets built by an earlier run: pixq compile finds them up to date
            shutil.copytree(source, root, dirs_exist_ok=True)
        if "compile" in phases:
            compile_all(run, big, small, root)
            if not args.sets_from:
                shutil.copytree(root, run.out / "sets", dirs_exist_ok=True)
        if "starts" not in phases:
            return 0
        services(run)
        import_breakdown(run)
        starts: dict[str, Any] = {}
        run.results["starts"] = starts
        aot = ("--compile", "--compile-cache", str(run.work / "cache-aot"), "--artefacts", str(root))
        starts["aot_1024"] = worker_start(run, "aot-1024", big, size_big, aot, args.stream, args.fidelity)
        run.save()
        if args.small:
            starts["aot_512"] = worker_start(run, "aot-512", small, size_small, aot, 0, False,
                                             burst=args.burst_small)
            run.save()
        if not args.skip_today and run.left_s() > 120:
            today = ("--compile", "--compile-cache", str(run.work / "cache-today"), "--artefacts", str(empty),
                     *(("--no-defer-warmup",) if args.today_warm_all else ()))
            # Cold compile cache = the cold-artefact start; once up it is today's compiled worker (same graphs
            # as from a warm cache): its steady streams and images are the comparison. With --today-warm-all
            # both modes compile before it is ready, so that its fast stream is compiled too (by default fast
            # mode compiles in the first idle second, which a stream submitted at once never leaves it).
            starts["today_cold"] = worker_start(run, "today-cold", big, size_big, today, args.stream, args.fidelity)
            run.results["aot_vs_today_pixels"] = compare(starts["aot_1024"], starts["today_cold"])
            run.save()
            if run.left_s() > 60 and not args.skip_today_warm:
                starts["today_warm"] = worker_start(run, "today-warm", big, size_big, today, 0, False)
    finally:
        for item in run.results.get("starts", {}).values():
            item.pop("_images", None)
        run.save()
        for svc in reversed(run.services):
            svc.stop()
    print(table(run.results))
    return 0


def table(results: dict[str, Any]) -> str:
    lines = [f"compile: {json.dumps({k: v for k, v in results.get('compile', {}).items() if k != 'sets'})[:600]}",
             f"imports: {json.dumps(results.get('imports', {}))[:600]}"]
    for label, item in results.get("starts", {}).items():
        lines.append(f"{label:11s} start->image {item.get('start_to_first_image_s', 0):6.1f} s  presence "
                     f"{item.get('presence_after_s', 0):6.1f} s  first exact {item.get('first_exact_service_s', 0):.2f}"
                     f" s  first fast {item.get('first_fast_service_s', 0):.2f} s  artefacts {item.get('artefacts')}")
        lines.append(f"            phases {item.get('phases')}")
        for mode in ("exact", "fast"):
            for kind in ("steady", "burst"):
                if f"{kind}_{mode}" in item:
                    lines.append(f"            {kind} {mode}: {item[f'{kind}_{mode}']}")
    lines.append(f"pixels aot vs today: {results.get('aot_vs_today_pixels')}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
