#!/usr/bin/env bash
# Where AOTInductor's package loader dies (2026-12-01, run k): a package of the 512 set (carried in .probe/s512)
# loaded in a bare process, with a SIGSEGV handler that prints the native stack (segv_backtrace.c), symbolised
# with addr2line; then the same after the imports a worker does first.
#   bash benchmarks/device/aot_crash_probe.sh      (carry [".probe", ".kit/py"])
set -u
export PYTHONPATH=/tmp/site:$PWD:$PWD/producer:$PWD/worker
[ -d /tmp/site/diffusers ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .kit/py/wheels/*.whl
gcc -shared -fPIC -O0 -o /tmp/segv.so benchmarks/device/segv_backtrace.c || exit 3
set_dir=.probe/s512
symbolise() {  # lines "lib(+0xOFF)[addr]" or "lib(sym+0xOFF)[addr]" -> function and source line
  grep -E '^/' "$1" | head -30 | while IFS= read -r l; do
    lib=${l%%(*}; off=$(sed -n 's/.*(+\(0x[0-9a-f]*\)).*/\1/p' <<<"$l")
    if [ -n "$off" ]; then echo "  $(basename "$lib") $off $(addr2line -f -C -e "$lib" "$off" 2>/dev/null | head -1 | cut -c1-150)"
    else echo "  $(basename "$lib") $(sed -n 's/.*(\(.*\)).*/\1/p' <<<"$l" | cut -c1-150)"; fi
  done
}
try() {  # label, pre-code, package
  local code="
import torch
$2
torch.zeros(1, device='cuda')
print('loading', flush=True)
l = torch._C._aoti.AOTIModelPackageLoader('$3', 'model', False, 1, 0)
print('ok', flush=True)"
  LD_PRELOAD=/tmp/segv.so timeout 90 python3 -c "$code" > /tmp/probe.out 2>&1; rc=$?
  echo "== $1: rc $rc $(grep -E '^(ok|loading)' /tmp/probe.out | tail -1)"
  [ $rc -ne 0 ] && { grep -m1 segv_backtrace /tmp/probe.out; symbolise /tmp/probe.out; }
}
try "bare vae" "" $set_dir/vae-512x512.pt2
try "bare transformer r1" "" $set_dir/transformer-512x512-r1.pt2
try "after diffusers' pipeline import" "from diffusers import PixArtSigmaPipeline" $set_dir/vae-512x512.pt2
try "after the worker's imports" "import pixq.worker.gpu.pipeline, pixq.worker.gpu.artefacts, pixq.worker.ops.serve" $set_dir/vae-512x512.pt2
echo "== LD_DEBUG=files, bare vae (last lines)"
LD_DEBUG=files timeout 90 python3 -c "
import torch; torch.zeros(1, device='cuda'); torch._C._aoti.AOTIModelPackageLoader('$set_dir/vae-512x512.pt2', 'model', False, 1, 0)" 2>&1 | grep -v "^$" | tail -8 | cut -c1-200
ulimit -s; ls /tmp | grep -i -E "aoti|torchinductor" | head
