#!/usr/bin/env bash
# The main job end to end: set up, start Redis + SeaweedFS + a worker on loopback, submit a prompt,
# wait, print the S3 key and a presigned URL, save the image under ./out, stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/pixq demo "${@:-A small cactus with a happy face in the Sahara desert.}"
