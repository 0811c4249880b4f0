"""Which start-up change a worker dies of on the GPU: load the pipeline with its artefact set in fresh processes.

Run g (2026-12-01) loaded the 1024 set fine; run h's worker (lean venv, no GC during the start, first
kernels on the CUDA-init thread) died without a line right after its weights loaded. Each variant runs
``load_pipeline`` as the worker does, with ``faulthandler`` on, and prints its exit code and last lines.

    python3 -m benchmarks.device.aot_load_probe MODEL ARTEFACTS LEAN_PYTHON
"""

from __future__ import annotations

import os
import subprocess
import sys

CODE = """
import faulthandler, gc, sys, time
faulthandler.enable()
model, root, gc_off, kernels = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
if gc_off:
    gc.disable()
import pixq.worker.gpu.pipeline as p
if not kernels:
    p.first_kernels = lambda *a: None
t = time.perf_counter()
loaded = p.load_pipeline(model, "cuda:0", p.PipelineOptions(artefacts=root))
phases = {k: round(v, 2) for k, v in loaded.phases.items()}
print("OK", loaded.artefacts is not None, phases, round(time.perf_counter() - t, 1))
"""


def main() -> int:
    model, root, lean = sys.argv[1:4]
    variants = [("lean gc-off kernels", lean, "1", "1"), ("lean gc-on kernels", lean, "0", "1"),
                ("lean gc-off no-kernels", lean, "1", "0"), ("image gc-off kernels", "python3", "1", "1")]
    for label, python, gc_off, kernels in variants:
        repo = os.getcwd()
        paths = [repo, f"{repo}/producer", f"{repo}/worker"] + ([] if python == lean else ["/tmp/site"])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        done = subprocess.run([python, "-X", "faulthandler", "-c", CODE, model, root, gc_off, kernels],
                              capture_output=True, text=True, timeout=150, env=env)
        tail = [line for line in (done.stdout + done.stderr).splitlines()
                if not line.startswith(("Loading", "  deprecate")) and "Warning" not in line][-14:]
        print(f"== {label}: rc {done.returncode}")
        print("\n".join(tail), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
