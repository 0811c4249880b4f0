#!/usr/bin/env bash
# Everything pixart-queue needs on a fresh Debian/Ubuntu machine, into ./.venv (idempotent).
#   redis-server from apt when missing; PyTorch first (so no resolver picks another build);
#   then the project with its worker, stack (SeaweedFS, Flower) and dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "==> installing redis-server (apt)"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi

if ! command -v chromium >/dev/null 2>&1; then
  echo "==> installing chromium (apt, for the Flower browser test)"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! python -c "import torch" 2>/dev/null; then
  echo "==> installing torch ${PIXQ_TORCH_VERSION:-2.13.0}"
  python -m pip install -q "torch==${PIXQ_TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "is ignored" || true
fi
echo "==> installing pixart-queue[dev,api] + pixart-queue-worker[stack] (editable)"
# setuptools warns that the worker's editable install uses a meta path finder ("careful with folders ... with the
# same name as your package"): none here is named pixq (the code lives in producer/ and worker/), so that block is
# dropped; any other warning still shows. (project.license is an SPDX string: no license deprecation any more.)
python -m pip install -q -e ".[dev,api]" -e "./worker[stack]" 2>&1 \
  | sed '/BuildBackendWarning: Editable installation/,/with strategy, WheelFile/d' | grep -vE "is ignored|^\s*$" || true
python -c "import torch, diffusers, celery, redis, boto3; print('==> ready: torch', torch.__version__, '| diffusers', diffusers.__version__)"
