#!/usr/bin/env bash
# Issue 29's device runs (one H100 or H200): worker starts from a cold and a warm page cache, with and without the
# weights' prefetch (worker/pixq/worker/ops/prefetch.py), against today's worker in the same run.
#   bash benchmarks/device/issue29.sh [VARIANTS]     # carry .kit/py and .kit/s3 (and .sets if a set was kept)
# VARIANTS (benchmarks/coldcache.py): comma-separated MODE-CACHE, MODE in off (today's worker), weights, all;
# CACHE cold (drop_caches first) or warm; "pair": two prefetching workers started together from a cold cache;
# "importtime": python -X importtime of the worker's imports, cold then warm.
# The first call on a machine builds the full-size model (random weights, benchmarks/fullsize.py) and runs
# `pixq compile` for 1024² (about 4 minutes); a later call while the machine is warm reuses both, and a carried
# .sets folder (the tar parts this script returns, unpacked) skips the compile on a fresh machine.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .kit/py/wheels/*.whl || exit 3
mkdir -p /root/kit && { [ -x /root/kit/weed ] || xz -dc .kit/s3/weed.xz > /root/kit/weed; } && chmod +x /root/kit/weed || exit 3
export PYTHONPATH=/tmp/site:$PWD:$PWD/producer:$PWD/worker PATH=$PWD/.kit/py/bin:/root/kit:$PATH PYTHONUNBUFFERED=1
export CXX=/usr/bin/g++-13  # the host's preset CXX has no shared libstdc++ (issue 14, run k)
variants=${1:-off-cold,weights-cold,weights-warm,all-cold,pair,off-warm}
t0=$(date +%s)
B=${BUDGET_S:-600}  # the call's limit: the steps below end inside it
left() { echo $(( ${1} - 600 + B - ($(date +%s) - t0) )); }
W=/tmp/pixq-coldstart
mkdir -p "$OUT/r"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader | tee "$OUT/r/gpu.txt"
nproc; free -g | head -2; df -h /tmp | tail -1; cat /sys/block/*/queue/scheduler 2>/dev/null | head -3
if [ ! -f /root/kit/bytecode-done ]; then  # what pip does at install: the modules' bytecode written once
  python3 -m compileall -q -j 0 /tmp/site >/dev/null 2>&1
  env -u PYTHONDONTWRITEBYTECODE python3 -c "from benchmarks.leanenv import IMPORTS; exec(IMPORTS)" && touch /root/kit/bytecode-done
fi
[ -d .sets ] && [ ! -d "$W/artefacts" ] && mkdir -p "$W/artefacts" && cp -r .sets/* "$W/artefacts/"
if ! ls "$W"/artefacts/*/manifest.json >/dev/null 2>&1; then
  timeout "$(left 420)" python3 -m benchmarks.coldstart --out "$OUT/r/c" --phases compile --no-small \
    --deadline-s "$(left 410)" 2>&1 | tail -6
  (cd "$W" && tar cf - artefacts | split -b 15m - "$OUT/sets.tar.")
  rm -rf "$OUT/r/c/sets"
else
  python3 -c "from pathlib import Path; from benchmarks.fullsize import ensure_model; print(ensure_model(Path('$W/model'), 'cuda:0'))"
fi
case ",$variants," in *,importtime,*)
  variants=$(echo "$variants" | sed 's/,*importtime,*/,/; s/^,//; s/,$//')
  code="from benchmarks.leanenv import IMPORTS; exec(IMPORTS)"
  for cache in cold warm; do
    [ $cache = cold ] && { sync; echo 3 > /proc/sys/vm/drop_caches; }
    s=$EPOCHREALTIME; python3 -X importtime -c "$code" 2> "$OUT/r/importtime-$cache.txt"; e=$EPOCHREALTIME
    echo "imports $cache: $(awk "BEGIN {print $e - $s}") s"
  done
  gzip "$OUT"/r/importtime-*.txt ;;
esac
[ -n "$variants" ] && timeout "$(left 590)" python3 -m benchmarks.coldcache --out "$OUT/r/cc" --variants "$variants" \
  --stream "${STREAM:-8}" --deadline-s "$(left 580)" 2>&1 | tail -40
cp "$OUT/r/cc/results.json" "$OUT/coldcache.json" 2>/dev/null
(cd "$OUT" && tar czf logs.tgz r && rm -rf r)
ls -la "$OUT"
