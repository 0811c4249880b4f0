#!/usr/bin/env bash
# Everything pixart-queue needs on a fresh Debian/Ubuntu machine, into ./.venv (idempotent).
#   bash scripts/setup.sh [test|demo]     (default: test)
#     demo: redis-server (apt, when missing); PyTorch first, so no resolver picks another build; the project and
#           its worker with the local stack (SeaweedFS, Flower): what `pixq demo` / `pixq up` run.
#     test: that, plus the [dev,api] extras and Chromium with its driver (apt, for the Flower browser test only).
# Versions come from requirements/lock-py<X.Y>.txt, the set the suite last passed with (pip constraints; made by
# scripts/lock.sh, which is how the lock moves forward). A Python with no lock gets the newest versions the
# pyproject ranges allow, with a warning: that combination is untested.
#   PIXQ_UNLOCKED=1   ignore the lock (scripts/lock.sh does, to re-resolve)
#   PIXQ_VENV=DIR     the venv to fill (default .venv)
#   PIXQ_SETUP_PLAN=1 print what would be installed, change nothing (tests/test_lock.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-test}
case "$PROFILE" in test|demo) ;; *) echo "setup.sh: unknown profile '$PROFILE' (test or demo)" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}
VENV=${PIXQ_VENV:-.venv}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
LOCK="requirements/lock-py$PYVER.txt"
CONSTRAINTS=()
if [ "${PIXQ_UNLOCKED:-}" = 1 ]; then
  LOCK=""
elif [ -f "$LOCK" ]; then
  CONSTRAINTS=(-c "$LOCK")
else
  echo "==> warning: no $LOCK: installing the newest versions within the pyproject ranges (an untested set)" >&2
  LOCK=""
fi
TORCH=${PIXQ_TORCH_VERSION:-$( [ -n "$LOCK" ] && sed -n 's/^torch==//p' "$LOCK" || true)}
TORCH=${TORCH:-2.13.0}
APT=(redis-server); SPECS=(-e . -e "./worker[stack]")
if [ "$PROFILE" = test ]; then APT+=(chromium chromium-driver); SPECS=(-e ".[dev,api]" -e "./worker[stack]"); fi

if [ "${PIXQ_SETUP_PLAN:-}" = 1 ]; then
  echo "profile: $PROFILE"; echo "apt: ${APT[*]}"; echo "lock: ${LOCK:-none}"; echo "torch: $TORCH"
  echo "pip: ${SPECS[*]}"; exit 0
fi

missing=()
for pkg in "${APT[@]}"; do
  case "$pkg" in chromium-driver) cmd=chromedriver ;; *) cmd=$pkg ;; esac
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]} (apt)"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
quiet() { grep -vE "is ignored|^\s*$" || true; }
python -m pip install -q --upgrade pip "${CONSTRAINTS[@]}" 2>&1 | quiet
if ! python -c "import torch" 2>/dev/null; then
  echo "==> installing torch $TORCH"
  python -m pip install -q "torch==$TORCH" 2>&1 | quiet
fi
echo "==> installing ${SPECS[*]}${LOCK:+ (versions from $LOCK)}"
# setuptools warns that the worker's editable install uses a meta path finder ("careful with folders ... with the
# same name as your package"): none here is named pixq (the code lives in producer/ and worker/), so that block is
# dropped; any other warning still shows.
python -m pip install -q "${CONSTRAINTS[@]}" "${SPECS[@]}" 2>&1 \
  | sed '/BuildBackendWarning: Editable installation/,/with strategy, WheelFile/d' | quiet
python -c "import torch, diffusers, celery, redis, boto3" \
  || { echo "setup.sh: the environment does not import (see pip's output above)" >&2; exit 1; }
echo "==> ready ($PROFILE, Python $PYVER, ${LOCK:-unlocked}): $(python scripts/lockfile.py installed)"
