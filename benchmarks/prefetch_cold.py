"""A worker's pipeline load from a cold page cache, with and without reading the weights beside the imports.

Scale from zero puts a worker on a node whose page cache may not hold the model: its 11 GB of
safetensors come from the volume. ``load_pipeline`` reads them on threads while it imports
(``pixq.worker.gpu.prefetch``); this times a fresh process's load (imports + weights) after the
kernel's page cache was dropped, alternating the two variants. Root only (it writes
/proc/sys/vm/drop_caches). On a CPU host the model loads in bfloat16 (what fits beside its page cache).

    python -m benchmarks.prefetch_cold --model /tmp/fullmodel [--runs 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CODE = """
import json, sys, time
t = time.perf_counter()
from pixq.worker.gpu.pipeline import load_pipeline
loaded = load_pipeline(sys.argv[1], sys.argv[2], dtype=sys.argv[3], prefetch=sys.argv[4] == "1")
print(json.dumps({"load_s": time.perf_counter() - t, **{k: round(v, 2) for k, v in loaded.phases.items()}}))
"""


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    try:
        drop_caches()
    except OSError as exc:
        print(f"prefetch_cold: cannot drop the page cache ({exc}); run as root", file=sys.stderr)
        return 2
    rows = []
    for run in range(args.runs):
        for prefetch in ("0", "1") if run % 2 == 0 else ("1", "0"):
            drop_caches()
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", CODE, args.model, args.device, args.dtype, prefetch],
                                  capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            row = {"prefetch": prefetch == "1", "process_s": round(time.perf_counter() - t0, 2),
                   **json.loads(done.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(row, flush=True)
    size = sum(f.stat().st_size for f in Path(args.model).rglob("*.safetensors"))
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "model_gb": round(size / 1e9, 2), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
