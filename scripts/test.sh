#!/usr/bin/env bash
# Set up, then run the whole test suite against real redis-server, SeaweedFS and worker processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
exec python -m pytest "$@"
