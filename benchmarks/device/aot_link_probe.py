"""Which C++ compiler gives AOTInductor packages that load in a bare process (issue 14, after run k).

Run k's packages, built on the H200 host, carried their own copy of libstdc++ and crashed the loader
(benchmarks/results/2026-12-01-k-aot-crash-native-stack.txt). For each compiler given (``default``: what inductor
picks with ``CXX`` unset), this builds one small package of the same kinds of ops (convolution, matmul, SDPA) in a
fresh Python, through a wrapper that records every compile and link line, then reports the package's
``wrapper.so``: its NEEDED libraries, how many ``std::locale`` symbols it defines, and whether a bare process
loads it (``pixq.worker.gpu.loadcheck``, the check ``pixq compile`` runs).

    python3 -m benchmarks.device.aot_link_probe --device cuda:0 --out DIR default /usr/bin/g++-13 /opt/gcc/bin/g++
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

BUILD = """
import sys, torch, torch._inductor
device, path = sys.argv[1], sys.argv[2]

class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.proj = torch.nn.Linear(8, 72 * 2)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)
        q = self.proj(h).view(h.shape[0], -1, 2, 72).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)

dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
m = M().to(device, dtype).eval()
with torch.no_grad():
    ep = torch.export.export(m, (torch.randn(1, 4, 16, 16, device=device, dtype=dtype),))
torch._inductor.aoti_compile_and_package(ep, package_path=path,
                                         inductor_configs={"aot_inductor.package_constants_in_so": False})
"""


def elf_report(so: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    if shutil.which("readelf"):
        dyn = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True).stdout
        out["needed"] = [line.split("[")[1].rstrip("]") for line in dyn.splitlines() if "(NEEDED)" in line]
    if shutil.which("nm"):
        syms = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True, text=True).stdout
        out["std_locale_defined"] = sum("_ZNSt6locale" in line for line in syms.splitlines())
        out["std_defined"] = sum(" _ZNSt" in line or " _ZNKSt" in line for line in syms.splitlines())
    return out


def probe(cxx: str, device: str, out: Path, index: int) -> dict[str, object]:
    from pixq.worker.gpu.loadcheck import LoadCheckError, check_loads

    work = out / f"{index}-{Path(cxx).name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    real = shutil.which("g++") if cxx == "default" else cxx
    lines = work / "compiler-lines.txt"
    wrapper = work / "cxx"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {lines}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "CXX": str(wrapper), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
    package = work / "probe.pt2"
    t0 = time.perf_counter()
    built = subprocess.run([sys.executable, "-c", BUILD, device, str(package)], capture_output=True, text=True,
                           env=env, timeout=400)
    result: dict[str, object] = {"cxx": cxx, "real": real, "build_s": round(time.perf_counter() - t0, 1),
                                 "build_rc": built.returncode}
    if built.returncode != 0:
        result["build_error"] = (built.stderr.strip().splitlines() or ["?"])[-1][:300]
        return result
    with zipfile.ZipFile(package) as z:
        so_name = next(n for n in z.namelist() if n.endswith("wrapper.so"))
        z.extract(so_name, work / "x")
    result.update(elf_report(work / "x" / so_name))
    links = [line for line in lines.read_text().splitlines() if "wrapper.so" in line] if lines.exists() else []
    result["link_line"] = links[-1][-1500:] if links else None
    try:
        result["bare_load_s"] = round(check_loads([package], device), 1)
        result["bare_load"] = "ok"
    except LoadCheckError as exc:
        result["bare_load"] = str(exc)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "aot-link-probe")))
    p.add_argument("--pick", action="store_true",
                   help="stop at the first compiler whose package loads bare and write its path to --pick-file")
    p.add_argument("--pick-file", type=Path, help="with --pick: where the chosen compiler's path goes")
    p.add_argument("compilers", nargs="*", default=["default"])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for index, cxx in enumerate(args.compilers):
        if cxx != "default" and not shutil.which(cxx):
            results.append({"cxx": cxx, "build_error": "not found"})
            continue
        results.append(probe(cxx, args.device, args.out, index))
        r = results[-1]
        print(f"{cxx:28s} build {r.get('build_rc')} {r.get('build_s')} s  needed {r.get('needed')}  "
              f"std::locale defined {r.get('std_locale_defined')}  "
              f"bare load: {r.get('bare_load') or r.get('build_error')}", flush=True)
        if args.pick and r.get("bare_load") == "ok":
            if args.pick_file:
                args.pick_file.write_text(str(r["real"]))
            break
    (args.out / "aot-link-probe.json").write_text(json.dumps(results, indent=2))
    if args.pick and not any(r.get("bare_load") == "ok" for r in results):
        print("aot_link_probe: no compiler gave a package that loads in a bare process", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
