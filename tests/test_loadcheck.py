"""A set whose packages crash AOTInductor's loader is refused by ``pixq compile`` (pixq.worker.gpu.loadcheck).

The crash is real: a C++ compiler (``CXX``, which inductor honours) that links a constructor raising SIGSEGV into
every package's ``wrapper.so``, as the H200 host's toolchain gave packages that died in the loader.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pixq.worker.gpu.loadcheck import device_index

from tests.services import pixq_argv
from tests.support import env_without_pixq

CRASH_C = """
#include <signal.h>
__attribute__((constructor)) static void crash_on_load(void) { raise(SIGSEGV); }
"""


def test_the_loader_gets_the_device_index_of_the_workers_device() -> None:
    assert [device_index(d) for d in ("cpu", "cuda", "cuda:0", "cuda:3")] == [-1, 0, 0, 3]


def _crashing_compiler(tmp_path: Path) -> Path:
    cxx = shutil.which("g++") or pytest.fail("g++ is needed: AOTInductor compiles its packages with it")
    crash_o = tmp_path / "crash.o"
    (tmp_path / "crash.c").write_text(CRASH_C)
    subprocess.run([shutil.which("gcc") or cxx, "-c", "-fPIC", "-o", str(crash_o), str(tmp_path / "crash.c")],
                   check=True)
    wrapper = tmp_path / "crashing-g++"
    # Only the package's own library gets the constructor (inductor's ISA probes and the rest link as usual).
    wrapper.write_text(f"""#!/bin/sh
for arg in "$@"; do case "$arg" in *wrapper.so) exec {cxx} "$@" {crash_o} ;; esac; done
exec {cxx} "$@"
""")
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_set_whose_packages_crash_the_loader_is_never_put_in_place(tiny_model: str, tmp_path: Path) -> None:
    root = tmp_path / "artefacts"
    env = env_without_pixq()
    env.update(CXX=str(_crashing_compiler(tmp_path)), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               OMP_NUM_THREADS="2")
    done = subprocess.run(pixq_argv("compile", "--model", tiny_model, "--out", str(root), "--size", "256x256"),
                          capture_output=True, text=True, timeout=1400, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "crashes AOTInductor's loader in a fresh process (SIGSEGV)" in last and ".pt2" in last, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and done.stdout == ""
    # Nothing a worker could load: no set folder, no manifest, no half-built folder left behind.
    assert not root.exists() or not any(root.iterdir())


def _static_only_compiler(tmp_path: Path) -> Path:
    """g++ that answers like the H200 host's /opt/gcc toolchain: no shared libstdc++ on its search path."""
    cxx = shutil.which("g++") or pytest.fail("g++ is needed: AOTInductor compiles its packages with it")
    wrapper = tmp_path / "static-only-g++"
    wrapper.write_text(f"""#!/bin/sh
[ "$1" = "-print-file-name=libstdc++.so" ] && {{ echo libstdc++.so; exit 0; }}
exec {cxx} "$@"
""")
    wrapper.chmod(0o755)
    return wrapper


def test_the_compiler_check_names_a_compiler_without_a_shared_libstdcxx(tmp_path: Path) -> None:
    import torch._inductor.config as inductor_config
    from pixq.worker.gpu.loadcheck import LoadCheckError, check_compiler

    # inductor read CXX when it was imported; its setting is what a fresh `pixq compile` gets from CXX. The
    # config's own patch puts it back (monkeypatch's undo of a config attribute deleted it in an earlier CI run,
    # and later torch.compile tests failed)
    before = inductor_config.cpp.cxx

    def with_cxx(cxx: str) -> Any:
        return inductor_config.patch({"cpp.cxx": (None, cxx)})

    with with_cxx(shutil.which("g++") or "g++"):
        assert check_compiler() == shutil.which("g++")
    with with_cxx(str(_static_only_compiler(tmp_path))), pytest.raises(LoadCheckError, match="has no shared libstdc"):
        check_compiler()
    with with_cxx(str(tmp_path / "no-such-g++")), pytest.raises(LoadCheckError, match="no C\\+\\+ compiler"):
        check_compiler()
    assert inductor_config.cpp.cxx == before


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pixq_compile_stops_before_compiling_with_such_a_compiler(tiny_model: str, tmp_path: Path) -> None:
    root = tmp_path / "artefacts"
    env = env_without_pixq()
    env.update(CXX=str(_static_only_compiler(tmp_path)), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    done = subprocess.run(pixq_argv("compile", "--model", tiny_model, "--out", str(root), "--size", "256x256"),
                          capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "has no shared libstdc++" in last and "static-only-g++" in last, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "compiled " not in done.stderr
    assert not root.exists() or not any(root.iterdir())
