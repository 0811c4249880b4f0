"""Issue 29: worker starts from a cold and a warm page cache, with and without the prefetch, in one run.

Each start: (cold) ``sync; echo 3 > /proc/sys/vm/drop_caches``, one exact 1024² job queued, then ``pixq worker``
with the shipped flags (``--artefacts A --compile --warmup 1024x1024``) and ``PIXQ_PREFETCH`` set per variant;
process start -> ready (presence record) -> first image, the start's phases (presence ``start_phases_s``), the
prefetch's own line from the log, the bytes the worker read from the disk (``/proc/PID/io`` read_bytes at
ready) and the disk's sectors read over the start (``/sys/dev/block/M:m/stat`` of the model's device). Then a
fixed-seed image per variant (compared with today's pixel by pixel) and, on the first two, a short stream
(steady exact images/s). ``pair``: two prefetching workers started together on one GPU from a cold cache:
the disk reads the weights once.

Needs the models and the artefact set of ``benchmarks.coldstart --phases compile`` in ``--work`` (issue29.sh
makes them), Redis + SeaweedFS (the kit), root for drop_caches.

    python3 -m benchmarks.coldcache --out $OUT/cc --variants off-cold,weights-cold,all-cold,off-warm,weights-warm,pair
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.coldstart import PROMPTS, Run, client, compare, image_of, services, submit


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def disk_stat(path: Path) -> Path | None:
    """The sysfs stat file of the block device holding ``path`` (its partition's, else the whole disk's)."""
    dev = os.stat(path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    return stat if stat.exists() else None


def sectors_read(stat: Path | None) -> int:
    return int(stat.read_text().split()[2]) if stat is not None else 0


def proc_read_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def presence_of(c: Any, pid: int) -> dict[str, Any]:
    from pixq.wire import WORKER_KEY_PREFIX

    for key in c.conn.scan_iter(WORKER_KEY_PREFIX + "*"):
        seen = json.loads(c.conn.get(key) or "{}")
        if seen.get("pid") == pid:
            return dict(seen)
    return {}


def log_lines(path: Path) -> list[str]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return [line.split("] ", 1)[-1] for line in text.splitlines()
            if re.search(r"prefetch|loaded .* in|compiled artefacts|warm-up|ready", line)][:14]


def start(run: Run, label: str, model: Path, size: int, mode: str, cold: bool, extra: tuple[str, ...],
          workers: int = 1) -> list[Any]:
    """Start ``workers`` workers at once with one exact job each waiting; returns their services and results.
    ``mode``: PIXQ_PREFETCH's value, optionally ``:THREADS:READ_MB`` (PIXQ_PREFETCH_THREADS, _READ_MB)."""
    label = re.sub(r"[^\w.-]", "_", label)
    from tests.services import Service, pixq_argv

    c = client(run)
    if cold:
        drop_caches()
    stat = disk_stat(model / "model_index.json")
    sectors0 = sectors_read(stat)
    t0 = time.time()
    jobs = [submit(run, c, model, size, "exact") for _ in range(workers)]
    mode, threads, read_mb = (mode.split(":") + ["", ""])[:3]
    env = {**run.env, "PIXQ_MODEL": str(model), "PIXQ_PREFETCH": mode, "PIXQ_PREFETCH_THREADS": threads,
           "PIXQ_PREFETCH_READ_MB": read_mb}
    svcs = []
    for i in range(workers):
        argv = pixq_argv("worker", "--model", str(model), "--device", run.device, "--name", f"{label}-{i}",
                         "--warmup", f"{size}x{size}", *extra)
        svcs.append(Service(f"worker {label}-{i}", argv, run.out / f"worker-{label}-{i}.log", env=env).start())
    items: list[dict[str, Any]] = [{} for _ in svcs]
    pending = set(range(workers))
    deadline = time.time() + run.args.worker_timeout_s
    while pending and time.time() < deadline:
        for i in list(pending):
            seen = presence_of(c, svcs[i].pid)
            if seen.get("serving"):
                items[i].update(ready_s=time.time() - t0, proc_read_gb=(proc_read_bytes(svcs[i].pid) or 0) / 1e9,
                                phases=seen.get("start_phases_s"))
                pending.discard(i)
            elif not svcs[i].alive():
                raise SystemExit(f"{label}-{i} exited: {log_lines(svcs[i].log_path)}")
        time.sleep(0.05)
    for job in jobs:
        rec = c.wait(job.id, timeout_s=run.args.worker_timeout_s, poll_s=0.01)
        for item in items:
            if "first_image_s" not in item:
                item.update(first_image_s=rec.finished_at - t0, state=rec.state.value)
                break
    disk_gb = (sectors_read(stat) - sectors0) * 512 / 1e9
    for i, item in enumerate(items):
        item.update(disk_read_gb_all=disk_gb, log=log_lines(svcs[i].log_path))
    return [svcs, items]


def stream(run: Run, model: Path, size: int, n: int) -> dict[str, Any]:
    c = client(run)
    recs = [c.wait(j.id, timeout_s=600, poll_s=0.02) for j in [submit(run, c, model, size, "exact") for _ in range(n)]]
    ends = sorted(r.finished_at for r in recs)
    renders = sorted(r.render.render_s for r in recs if r.render)
    return {"images_per_s": (len(ends) - 1) / (ends[-1] - ends[0]), "render_p50_s": renders[len(renders) // 2],
            "failed": sum(r.state.value != "succeeded" for r in recs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "coldcache-out")))
    p.add_argument("--work", default="/tmp/pixq-coldstart")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--variants", default="off-cold,weights-cold,all-cold,off-warm,weights-warm,pair")
    p.add_argument("--stream", type=int, default=8, help="steady exact jobs on the first two variants")
    p.add_argument("--deadline-s", type=float, default=400)
    p.add_argument("--worker-timeout-s", type=float, default=240)
    p.add_argument("--eager", action="store_true", help="no artefacts, no --compile (the harness on a CPU)")
    args = p.parse_args(argv)
    run = Run(args)
    model = (run.work / "model").resolve()
    size = 256 if args.tiny else 1024
    root = run.work / "artefacts"
    extra: tuple[str, ...] = () if args.eager else (
        "--compile", "--compile-cache", str(run.work / "cache-aot"), "--artefacts", str(root))
    size_gb = sum(f.stat().st_size for f in model.rglob("*.safetensors")) / 1e9
    run.results.update(model_gb=size_gb, date=time.strftime("%Y-%m-%d %H:%M"))
    services(run)
    starts: dict[str, Any] = {}
    run.results["starts"] = starts
    images: dict[str, Any] = {}
    try:
        for n, variant in enumerate(args.variants.split(",")):
            if run.left_s() < 45:
                starts[variant] = {"skipped": "deadline"}
                continue
            mode, _, cache = variant.rpartition("-")
            workers = 2 if variant.startswith("pair") else 1
            if variant.startswith("pair"):
                mode, cache = variant.partition(":")[2].replace("/", ":") or "weights", "cold"
            svcs, items = start(run, variant, model, size, mode, cache == "cold", extra, workers)
            try:
                starts[variant] = items[0] if workers == 1 else {"workers": items}
                if workers == 1:
                    c = client(run)
                    job = submit(run, c, model, size, "exact", prompt=PROMPTS[0], seed=7)
                    images[variant] = {"_images": {"exact": image_of(c, c.wait(job.id, timeout_s=300, poll_s=0.02))}}
                    if n < 2 and args.stream:
                        items[0]["steady_exact"] = stream(run, model, size, args.stream)
            finally:
                for svc in svcs:
                    svc.stop()
            run.save()
            print(variant, json.dumps(starts[variant])[:900], flush=True)
        base = images.get("off-cold") or images.get("off-warm")
        if base:
            run.results["pixels_vs_off"] = {k: compare(v, base) for k, v in images.items()}
    finally:
        run.save()
        for svc in reversed(run.services):
            svc.stop()
    print(table(run.results))
    return 0


def table(results: dict[str, Any]) -> str:
    lines = [f"model {results.get('model_gb', 0):.1f} GB",
             "variant        ready    image   import  cudaw  weights graphs warmup  proc_read disk_read"]
    for label, item in results.get("starts", {}).items():
        for it in item.get("workers", [item]):
            ph = it.get("phases") or {}
            lines.append(f"{label:13s} {it.get('ready_s', 0):6.1f} {it.get('first_image_s', 0):8.1f} "
                         + " ".join(f"{ph.get(k, 0):6.1f}" for k in ("import_s", "cuda_init_wait_s", "weights_s",
                                                                    "graphs_s", "warmup_s"))
                         + f" {it.get('proc_read_gb', 0):8.1f} {it.get('disk_read_gb_all', 0):8.1f}")
            lines += [f"    {line}" for line in it.get("log", []) if "prefetch" in line]
            if "steady_exact" in it:
                lines.append(f"    steady exact {it['steady_exact']}")
    lines.append(f"pixels vs off: {results.get('pixels_vs_off')}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
