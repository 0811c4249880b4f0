#!/usr/bin/env bash
# Issue 28's run on one host with several GPUs (nvidia-h100-x8 / nvidia-h200-x8; x4 or x2 for a partial run):
# `pixq worker --gpus 0..n-1` at 1, 2, 4 and 8 GPUs through Redis, Celery and SeaweedFS, full-size 1024 model with
# random weights, exact and fast streams of unique prompts, each count started from nothing (the seconds until every
# child serves), the host's CPU use per stream, and one child killed -9 mid-stream at the largest count.
#   device run, carry [".kit/py", ".kit/s3"] (bash benchmarks/device/make-kit.sh builds them):
#   bash benchmarks/device/issue28.sh [COUNTS]     # default 1,2,4,8; results.json and logs under $OUT
# Not scripted yet: the 512 checkpoint with batching at each count (benchmarks/batching.py has the one-GPU run).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .kit/py/wheels/*.whl || exit 3
mkdir -p /root/kit && xz -dc .kit/s3/weed.xz > /root/kit/weed && chmod +x /root/kit/weed || exit 3
export PYTHONPATH=/tmp/site:$PWD:$PWD/producer:$PWD/worker PATH=$PWD/.kit/py/bin:/root/kit:$PATH PYTHONUNBUFFERED=1
export CXX=/usr/bin/g++-13  # the host's preset CXX has no shared libstdc++ (docs/performance.md, run k)
env -u PYTHONDONTWRITEBYTECODE python3 -c "from benchmarks.leanenv import IMPORTS; exec(IMPORTS)"  # bytecode, as the image
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
python3 -m benchmarks.bench --out "$OUT" --phases build,multigpu --compile-modes default \
  --gpu-counts "${1:-1,2,4,8}" --multigpu-modes exact,fast --kill-child --images 12 --keep-logs \
  --worker-timeout-s 420 --deadline-s 3000 2>&1 | tail -40
(cd "$OUT" && tar czf logs.tgz logs 2>/dev/null && rm -rf logs) || true
