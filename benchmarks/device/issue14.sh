#!/usr/bin/env bash
# Issue 14's device runs (one H200): what each call of docs/performance.md's cold-start runs did.
#   bash benchmarks/device/issue14.sh compile   # kit, models, pixq compile of both sizes (--no-small: 1024 only),
#                                               # then the start-up profile
#   bash benchmarks/device/issue14.sh starts    # the worker starts on those sets (needs weed: the .kit/s3 call first)
#   bash benchmarks/device/issue14.sh lean      # the starts in a venv of the worker image's packages only
#                                               # (benchmarks/leanenv.py), on sets carried in .sets/*; if the AOT
#                                               # packages do not load there, in the host's env with bytecode
#   bash benchmarks/device/issue14.sh host      # the host's env with bytecode, no profile: the quickest starts
# NO_PROFILE=1 skips the start-up profiles. The compile call's sets stay in /root/kit/sets-all for the next calls
# while the machine is warm (and come back as tar parts for a later machine: carry them as .sets).
# Everything comes back as at most 8 files: the sets as 15 MiB tar parts, the rest in one tgz.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .kit/py/wheels/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD:$PWD/producer:$PWD/worker PATH=$PWD/.kit/py/bin:/root/kit:$PATH PYTHONUNBUFFERED=1
t0=$(date +%s)
left() { echo $(( ${1} - ($(date +%s) - t0) )); }
mkdir -p "$OUT/r"
# Where carried or earlier sets are: .sets (a carry), /root/kit/sets (copied in by the .kit/s3 call), and
# /root/kit/sets-all (this machine's compile call).
SET_DIRS=(.sets /root/kit/sets /root/kit/sets-all)
sets=(); for d in "${SET_DIRS[@]}"; do [ -d "$d" ] && sets+=(--sets-from "$d"); done
pack() { (cd "$OUT" && tar czf logs.tgz r && rm -rf r); }
host_bytecode() {  # what pip does at install: the host's modules' bytecode written once
  env -u PYTHONDONTWRITEBYTECODE python3 -c "from benchmarks.leanenv import IMPORTS; exec(IMPORTS)"
}
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader | tee "$OUT/r/gpu.txt"
mode=$1; shift
case "$mode" in
  compile)
    python3 -m compileall -q -j 0 /tmp/site >/dev/null 2>&1
    # pixq compile refuses packages that crash a bare loader (loadcheck; run k's did): first the compiler whose
    # packages load bare (benchmarks/device/aot_link_probe.py), unless KEEP_CXX=1. The H200 host presets
    # CXX=/opt/gcc/bin/g++, whose toolchain has only libstdc++.a: its packages carry a static libstdc++ and
    # crash the loader (run k); a preset CXX is therefore probed like the others, not trusted.
    if [ -z "${KEEP_CXX:-}" ]; then
      timeout 300 python3 -m benchmarks.device.aot_link_probe --device cuda:0 --out "$OUT/r/link" --pick \
        --pick-file /tmp/cxx default /usr/bin/g++-13 /opt/gcc/bin/g++ clang++ 2>&1 | tail -6 || true
      [ -s /tmp/cxx ] || { pack; exit 5; }
      export CXX; CXX=$(cat /tmp/cxx); echo "CXX=$CXX"
    fi
    timeout "$(left 530)" python3 -m benchmarks.coldstart --out "$OUT/r/c" --phases compile --deadline-s "$(left 520)" "$@" \
      2>&1 | tail -25
    if [ -d "$OUT/r/c/sets" ]; then
      # kept on the machine for the next calls while it stays warm, and sent back as tar parts
      rm -rf /root/kit/sets-all && mkdir -p /root/kit && cp -r "$OUT/r/c/sets" /root/kit/sets-all
      (cd "$OUT/r/c" && tar cf - sets | split -b 15m - "$OUT/sets.tar."); rm -rf "$OUT/r/c/sets"
    fi
    [ -z "${NO_PROFILE:-}" ] && [ "$(left 580)" -gt 120 ] && timeout "$(left 580)" python3 -m benchmarks.startup_profile --runs 1 --out "$OUT/r/p" 2>&1 | tail -30
    ;;
  starts)
    python3 -m compileall -q -j 0 /tmp/site >/dev/null 2>&1
    timeout "$(left 575)" python3 -m benchmarks.coldstart --out "$OUT/r/s" --phases starts --deadline-s "$(left 560)" "$@" \
      2>&1 | tail -40
    ;;
  lean)
    # GPU memory every half second through the run (which worker held how much: the AOT one with its two
    # runners against today's compiled one), stopped before the logs are packed
    nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 500 > "$OUT/r/gpu-mem.csv" 2>&1 &
    smi=$!; trap 'kill "$smi" 2>/dev/null' EXIT  # also on an early exit below
    # The image's start: a venv of the worker's dependency closure with bytecode (benchmarks/leanenv.py). If the
    # AOT packages do not load there, the host's own environment with its bytecode written once instead.
    lean=$(python3 -m benchmarks.leanenv --hardlink /tmp/lean) || exit 4
    python3 -c "from pathlib import Path; from benchmarks.fullsize import ensure_model; ensure_model(Path('/tmp/pixq-coldstart/model'), 'cuda:0')" 2>&1 | tail -1
    mkdir -p /tmp/art && for d in "${SET_DIRS[@]}"; do [ -d "$d" ] && cp -r "$d"/* /tmp/art/; done
    probe="import pixq.worker.gpu.pipeline as p; l = p.load_pipeline('/tmp/pixq-coldstart/model', 'cuda:0', p.PipelineOptions(artefacts='/tmp/art')); assert l.artefacts; print('probe ok', l.phases)"
    if PYTHONPATH=$PWD:$PWD/producer:$PWD/worker timeout 120 "$lean" -X faulthandler -c "$probe" > "$OUT/r/probe.log" 2>&1; then
      py=$lean; export PYTHONPATH=$PWD:$PWD/producer:$PWD/worker; echo "env: lean venv"
    else
      tail -25 "$OUT/r/probe.log"; py=python3; echo "env: the host's, bytecode written once"
      host_bytecode
    fi
    [ -z "${NO_PROFILE:-}" ] && timeout 100 "$py" -m benchmarks.startup_profile --runs 2 --probes torch,torch+cuda,t5,diffusers_pipeline,queue_side,worker_imports \
      --out "$OUT/r/p" 2>&1 | tail -20
    timeout "$(left 575)" "$py" -m benchmarks.coldstart --out "$OUT/r/s" --phases compile,starts "${sets[@]}" \
      --deadline-s "$(left 560)" "$@" 2>&1 | tail -40
    kill "$smi" 2>/dev/null
    ;;
  host)
    # The host's environment with its bytecode written once (what pip does at install), on carried sets: the
    # AOT worker and today's compiled worker in one run (run j).
    host_bytecode
    python3 -m benchmarks.coldstart --out "$OUT/r/s" --phases starts "${sets[@]}" "$@" 2>&1 | tail -30
    ;;
esac
pack
ls -la "$OUT"
