#!/usr/bin/env bash
# Move the test environment's lock forward, in one command:
#   bash scripts/lock.sh [PYTEST ARGS]     then review `git diff requirements/` and commit the lock
# 1. a fresh venv (PIXQ_LOCK_VENV, default .venv-lock) that pip resolves to the newest versions the two
#    pyproject.toml ranges allow (scripts/setup.sh test with PIXQ_UNLOCKED=1);
# 2. mypy over the code and the not-slow test tier in that venv (what a newer release breaks shows here, not in
#    the next unrelated CI run);
# 3. only if both pass: requirements/lock-py<X.Y>.txt rewritten from that venv (scripts/lockfile.py write) and
#    checked against the ranges. Nothing is written when a step fails (exit status of the failing step).
# For another Python, run it with PYTHON=python3.X. Takes about 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PIXQ_LOCK_VENV:-.venv-lock}
rm -rf "$VENV"
PIXQ_VENV="$VENV" PIXQ_UNLOCKED=1 bash scripts/setup.sh test
. "$VENV/bin/activate"
LOCK=$(python scripts/lockfile.py path)
echo "==> mypy with the newest versions"
python -m mypy producer/pixq worker/pixq
echo "==> the not-slow tier with the newest versions"
PIXQ_UNLOCKED=1 python -m pytest -m "not slow" -q -p no:cacheprovider "$@"
python scripts/lockfile.py write "$LOCK"
python scripts/lockfile.py check "$LOCK"
echo "==> wrote $LOCK: $(python scripts/lockfile.py versions "$LOCK")"
git --no-pager diff --stat -- "$LOCK" 2>/dev/null || true
