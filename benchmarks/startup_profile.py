"""Where a worker's start-up time goes before it touches the model (issue 14): imports, CUDA, first kernels.

Each probe runs in a fresh interpreter (what a new worker pays), timed from outside; then one cProfile
of the worker's whole import sequence says whether the seconds are the interpreter's own work
(``marshal.loads``, module bodies) or the host's system calls (``stat``, ``open``, ``read``, ``dlopen``:
costly under a sandboxing kernel such as gVisor), and a GIL probe says whether a CUDA context made on
a thread really overlaps the imports on the main thread.

    python3 -m benchmarks.startup_profile --out $OUT          # on the device (kit installed)
    python -m benchmarks.startup_profile --cpu --out /tmp/sp  # the same probes without CUDA
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORKER_IMPORTS = ("import pixq.worker.ops.serve, pixq.worker.jobs.tasks; import torch; "
                  "from diffusers import PixArtSigmaPipeline")
PROBES = {
    "python": "pass",
    "torch": "import torch",
    "torch+cuda": "import torch; torch.empty(1, device='cuda'); torch.cuda.synchronize()",
    "torch+dynamo": "import torch, torch._dynamo",
    "torch+aoti_runner": "import torch; from torch._inductor.package.package import AOTICompiledModel",
    "t5": "import torch; from transformers import T5EncoderModel",
    "diffusers_pipeline": "import torch; from diffusers import PixArtSigmaPipeline",
    "queue_side": "import pixq.worker.ops.serve, pixq.worker.jobs.tasks",
    "worker_imports": WORKER_IMPORTS,
    # What the host charges for the three things an import does: run bytecode, touch new memory, open files.
    "cpu_loop_2e7": "n = 0\nfor i in range(20_000_000): n += i",
    "touch_1GiB": "b = bytearray(1 << 30)",
    "open_read_3000_pyc": ("import glob, torch, os; fs = glob.glob(os.path.dirname(torch.__file__) + '/**/*.pyc', "
                           "recursive=True)[:3000]\nimport time; t = time.perf_counter()\nfor f in fs: open(f, 'rb')"
                           ".read()\nprint(len(fs), time.perf_counter() - t)"),
}
FIRST_KERNELS = """
import time, torch
def timed(fn):
    t = time.perf_counter(); fn(); torch.cuda.synchronize(); return time.perf_counter() - t
out = {'context': timed(lambda: torch.empty(1, device='cuda'))}
bf16 = dict(device='cuda', dtype=torch.bfloat16)
a = torch.randn(256, 256, **bf16)
x, w = torch.randn(1, 4, 32, 32, **bf16), torch.randn(8, 4, 3, 3, **bf16)
q = torch.randn(2, 16, 64, 72, **bf16)
F = torch.nn.functional
for name, fn in (('matmul_bf16', lambda: a @ a), ('conv2d_bf16', lambda: F.conv2d(x, w, padding=1)),
                 ('sdpa_bf16', lambda: F.scaled_dot_product_attention(q, q, q)),
                 ('layernorm', lambda: F.layer_norm(a, (256,))), ('second_matmul', lambda: a @ a)):
    out[name] = timed(fn)
print(out)
"""
# Does the CUDA context's creation on a thread let the main thread run? Count a busy loop's passes
# per second on the main thread, alone and while a thread makes the context.
GIL_PROBE = """
import threading, time, torch
def spin(seconds):
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        n += 1
    return n / seconds
alone = spin(0.5)
done = {}
def init():
    t = time.perf_counter(); torch.empty(1, device='cuda'); torch.cuda.synchronize()
    done['s'] = time.perf_counter() - t
th = threading.Thread(target=init); t0 = time.perf_counter(); th.start()
n = 0
while th.is_alive():
    n += 1
busy = n / (time.perf_counter() - t0)
print({'init_s': done.get('s'), 'main_rate_alone': alone, 'main_rate_during_init': busy, 'ratio': busy / alone})
"""
PROFILE = """
import cProfile, pstats, io, time, json, sys
pr = cProfile.Profile(); t = time.perf_counter(); pr.enable()
exec(sys.argv[1])
pr.disable(); wall = time.perf_counter() - t
st = pstats.Stats(pr); rows = []
for (file, line, fn), (cc, nc, tt, ct, callers) in st.stats.items():
    rows.append((tt, nc, f"{file}:{line}({fn})" if line else fn))
rows.sort(reverse=True)
groups = {}
for tt, nc, name in rows:
    for key in ('posix.stat', 'open_code', "'read' of", 'listdir', 'create_dynamic', 'marshal.loads', 'builtins.exec',
                'builtins.compile', 'fetch__all__', 'exec_dynamic', 'posix.lstat', 'posix.getcwd', 'io.open'):
        if key in name:
            g = groups.setdefault(key, [0.0, 0]); g[0] += tt; g[1] += nc
print(json.dumps({'wall_s': wall, 'modules': len(sys.modules), 'groups': groups,
                  'top': [[round(tt, 3), nc, name[-110:]] for tt, nc, name in rows[:30]]}))
"""


def timed(code: str, env: dict[str, str], runs: int, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    seconds, out = [], ""
    for _ in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, *extra, "-c", code], capture_output=True, text=True, env=env,
                              timeout=300)
        seconds.append(time.perf_counter() - t0)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1:] or [f"rc {done.returncode}"]}
        out = done.stdout.strip()
    return {"s": [round(s, 2) for s in seconds], "min_s": round(min(seconds), 2), "stdout": out[-2000:]}


def host_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                             "cpus": os.cpu_count(), "dont_write_bytecode": sys.flags.dont_write_bytecode,
                             "pycache_prefix": sys.pycache_prefix, "sys_path": sys.path}
    with contextlib.suppress(OSError):
        facts["kernel"] = Path("/proc/version").read_text().strip()[:200]
    for mod in ("torch", "transformers", "diffusers", "celery"):
        try:
            m = __import__(mod)
            folder = Path(m.__file__).parent
            cache = folder / "__pycache__"
            facts[mod] = {"version": getattr(m, "__version__", "?"), "path": str(folder),
                          "pycache": cache.is_dir() and any(cache.iterdir()), "writable": os.access(folder, os.W_OK)}
        except Exception as exc:  # a probe: report and go on
            facts[mod] = repr(exc)[:200]
    with contextlib.suppress(OSError):
        facts["mounts"] = [line for line in Path("/proc/mounts").read_text().splitlines()
                           if any(f" {p} " in line for p in ("/", "/tmp", "/usr", "/root"))][:10]
    return facts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "startup-profile")))
    p.add_argument("--runs", type=int, default=2, help="fresh interpreters per probe (the minimum is reported)")
    p.add_argument("--cpu", action="store_true", help="skip the CUDA probes")
    p.add_argument("--probes", help="comma-separated probe names (default: all)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": host_facts(), "probes": {}}
    for name, code in PROBES.items():
        if (args.cpu and "cuda" in code) or (args.probes and name not in args.probes.split(",")):
            continue
        results["probes"][name] = timed(code, env, args.runs)
        print(f"{name:20s} {results['probes'][name].get('s', results['probes'][name])}", flush=True)
    if not args.cpu:
        results["first_kernels"] = timed(FIRST_KERNELS, env, 1)
        results["gil_during_cuda_init"] = timed(GIL_PROBE, env, 1)
    done = subprocess.run([sys.executable, "-c", PROFILE, WORKER_IMPORTS], capture_output=True, text=True, env=env,
                          timeout=300)
    results["profile"] = json.loads(done.stdout) if done.returncode == 0 else done.stderr[-1500:]
    imp = subprocess.run([sys.executable, "-X", "importtime", "-c", WORKER_IMPORTS], capture_output=True, text=True,
                         env=env, timeout=300)
    (args.out / "importtime.txt").write_text(imp.stderr)
    (args.out / "startup-profile.json").write_text(json.dumps(results, indent=1, default=str))
    for key in ("first_kernels", "gil_during_cuda_init"):
        print(key, results.get(key))
    if isinstance(results["profile"], dict):
        print("profile wall", round(results["profile"]["wall_s"], 2), "modules", results["profile"]["modules"])
        print("groups", {k: [round(v[0], 2), v[1]] for k, v in results["profile"]["groups"].items()})
        for row in results["profile"]["top"][:15]:
            print("  ", row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
