"""A new artefact set's packages, loaded in a fresh Python before ``pixq compile`` puts the set in place.

Why a child process: on the H200 host (2026-12-01, run k), AOTInductor's loader died of SIGSEGV inside the
packages' own code. The fault was in ``torch::aot_inductor::parse_device_str``, in a ``std::regex`` whose
``regex_traits`` reached a null locale facet; the package's ``wrapper.so`` carried its own copy of libstdc++
(4,413 exported ``std::`` symbols and no ``libstdc++.so.6`` among its NEEDED entries). It died that way in a
bare ``python -c`` and in a venv of the worker image's packages, yet loaded inside a host worker that had
imported more first. A crash cannot be caught in the process it happens in, and a worker that segfaults at
start restarts into the same crash, so each package is loaded here in a child process, bare, the way a
worker's loader does (``aot.load_package``). If the child dies, the set is refused with one line naming the
package and the signal, and nothing is put in place.

The cause on that host (run l): its environment presets ``CXX=/opt/gcc/bin/g++`` (inductor honours ``CXX``),
a toolchain with ``libstdc++.a`` and no ``libstdc++.so``, so the linker took the static library into every
package. ``check_compiler`` asks the compiler for its shared libstdc++ before anything is compiled, so such a
host fails in a second with the fix named, not after minutes of compiling.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

CODE = """
import sys
from pathlib import Path
index = int(sys.argv[1])
if index >= 0:
    import torch
    torch.zeros(1, device=f"cuda:{index}")  # the CUDA context a worker has before it loads its set
from pixq.worker.gpu.aot import load_package
for name in sys.argv[2:]:
    print("loading", name, flush=True)
    load_package(Path(name), index)
print("loaded", flush=True)
"""


class LoadCheckError(RuntimeError):
    """A package of the new set does not load in a fresh process."""


def device_index(device: str) -> int:
    """``cuda:N`` -> N, ``cuda`` -> 0, anything else (the CPU) -> -1: the loader's device index."""
    if not device.startswith("cuda"):
        return -1
    _, _, index = device.partition(":")
    return int(index) if index else 0


def check_compiler() -> str:
    """The C++ compiler inductor will use (its own search: ``CXX``, else ``g++``, config overrides included),
    if it links libstdc++ as a shared library; else :class:`LoadCheckError`."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        cxx = get_cpp_compiler()
    except InvalidCxxCompiler:
        raise LoadCheckError("no C++ compiler (CXX, else g++): AOTInductor needs one to build the packages") from None
    found = shutil.which(cxx) or cxx  # inductor's search ran it (``--version``): a name on PATH, or a path
    try:
        answer = subprocess.run([found, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                                timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LoadCheckError(f"the C++ compiler {cxx} does not answer -print-file-name ({exc})") from None
    if not (os.path.isabs(answer) and os.path.exists(answer)):
        raise LoadCheckError(f"the C++ compiler {cxx} has no shared libstdc++ (-print-file-name=libstdc++.so finds "
                             "none): packages it links carry their own libstdc++ and crash AOTInductor's loader; "
                             "set CXX to a compiler with one (e.g. /usr/bin/g++)")
    return found


def check_loads(paths: list[Path], device: str, timeout_s: float = 600.0) -> float:
    """Load every package in ``paths`` in one fresh Python; its seconds, or :class:`LoadCheckError`."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        done = subprocess.run([sys.executable, "-c", CODE, str(device_index(device)), *map(str, paths)],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise LoadCheckError(f"loading the new packages in a fresh process took over {timeout_s:.0f} s") from None
    if done.returncode == 0 and done.stdout.rstrip().endswith("loaded"):
        return time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("loading ")]
    package = Path(lines[-1].removeprefix("loading ")).name if lines else "the first package"
    if done.returncode < 0:
        try:
            why = signal.Signals(-done.returncode).name
        except ValueError:
            why = f"signal {-done.returncode}"
        raise LoadCheckError(f"{package} crashes AOTInductor's loader in a fresh process ({why}); the set is not "
                             "used: see docs/performance.md, 'A set that crashes the loader'")
    tail = [line for line in done.stderr.strip().splitlines() if line.strip()]
    raise LoadCheckError(f"{package} does not load in a fresh process (exit {done.returncode}: "
                         f"{tail[-1][:300] if tail else 'no message'})")
