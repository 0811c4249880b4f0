#!/usr/bin/env bash
# Build docker/Dockerfile.worker and docker/Dockerfile.producer here, without a Docker engine or a
# registry: buildah (chroot isolation) on a Debian bookworm base made with debootstrap.
#
#   bash scripts/build-images.sh            # -> localhost/pixq-worker:smoke, localhost/pixq-producer:smoke
#
# The Dockerfiles are the ones a user's `docker build` takes; only build arguments differ:
#   - CUDA_IMAGE / PYTHON_IMAGE = the local base (python3 3.11, venv, tini, ca-certificates), since
#     no registry is reachable to pull nvidia/cuda or python:3.12-slim;
#   - the CPU build of torch (TORCH_VERSION=X+cpu): from a wheel directory on this machine when one
#     holds it (pip's find-links, PIXQ_TORCH_WHEEL_DIR), bound into the build; else from PyTorch's
#     CPU index. The multi-GB CUDA wheels stay the Dockerfile's default.
# Caches, kept between runs (PIXQ_IMAGE_CACHE, default ~/.cache/pixq-images): the base's rootfs
# tarball; buildah's storage keeps the base image and the build's layers (--layers). (The
# Dockerfiles' pip cache mounts work with Docker's BuildKit; buildah 1.28 keeps nothing in them
# between runs.) Layers unused for 3 days are dropped at the end of each run. Reclaim it all with
# `buildah rmi --all && rm -rf ~/.cache/pixq-images /var/tmp/buildah-cache`.
# Prints "size IMAGE BYTES" for each image built.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${PIXQ_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pixq-images}
TAG=${PIXQ_IMAGE_TAG:-smoke}
TORCH_VERSION=${PIXQ_TORCH_VERSION:-2.13.0}
MIRROR=${PIXQ_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
# What both Dockerfiles expect of their base: python3 with venv and pip's wheel (`python` for the
# producer's build stage), tini (the worker's PID 1), CA certificates (HTTPS to PyPI, S3), useradd.
PACKAGES=python3,python3-venv,python-is-python3,tini,ca-certificates,passwd
BASE_KEY=$(printf '%s %s %s' "$SUITE" "$PACKAGES" "$MIRROR" | sha256sum | cut -c1-12)
BASE=localhost/pixq-base:$SUITE-$BASE_KEY
export BUILDAH_ISOLATION=chroot
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
START=$SECONDS

say() { echo "==> [$((SECONDS - START)) s] $*"; }

if ! command -v buildah >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
  say "installing buildah and debootstrap (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends buildah debootstrap >/dev/null
fi

mkdir -p "$CACHE"
# One build at a time on this machine: the cache and the tags are shared.
exec 9>"$CACHE/lock"
flock 9

# -- the base: Debian from its own packages, imported as an image -----------------------------
tarball=$CACHE/base-$SUITE-$BASE_KEY.tar
if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  if [ ! -s "$tarball" ]; then
    say "debootstrap $SUITE (minbase + $PACKAGES)"
    rootfs=$CACHE/rootfs.tmp
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log" >&2; echo "error: debootstrap failed (log: $CACHE/debootstrap.log)" >&2; exit 1; }
    # Like the official slim images: no package lists or downloaded .debs in the layer.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
      "$rootfs"/var/log/* "$rootfs"/tmp/*
    tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  say "importing $tarball as $BASE"
  ctr=$(buildah from scratch)
  mnt=$(buildah mount "$ctr")
  tar --numeric-owner -C "$mnt" -xpf "$tarball"
  buildah umount "$ctr" >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd /bin/bash "$ctr"
  buildah commit --rm -q "$ctr" "$BASE" >/dev/null
fi

# -- torch for the CPU --------------------------------------------------------------------------
torch_args=(--build-arg "TORCH_VERSION=$TORCH_VERSION+cpu")
wheel_dirs=${PIXQ_TORCH_WHEEL_DIR:-}
wheel_dirs+=" ${PIP_FIND_LINKS:-} $(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | tr '\n' ' ')"
wheel_dir=""
for dir in $wheel_dirs; do
  dir=${dir#file://}
  if compgen -G "$dir/torch-$TORCH_VERSION+cpu-cp311-*.whl" >/dev/null; then wheel_dir=$dir; break; fi
done
if [ -n "$wheel_dir" ]; then
  say "torch $TORCH_VERSION+cpu from $wheel_dir"
  torch_args+=(--volume "$wheel_dir:/wheels:ro" --build-arg TORCH_FIND_LINKS=/wheels)
else
  say "torch $TORCH_VERSION+cpu from PyTorch's CPU index"
  torch_args+=(--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)
fi

# HTTPS from inside the build trusts what this machine trusts (a TLS-inspecting proxy's CA, say):
# the host's bundle is bound over the base's for the build's RUN steps only, never committed.
ca_bundle=${PIXQ_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
net_args=()
[ -s "$ca_bundle" ] && net_args+=(--volume "$ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro")

# -- the images ----------------------------------------------------------------------------------
# The build context: the files git sees (tracked or not ignored), all with one mtime, so that the
# layer cache follows their content only (a fresh clone would miss it on every file's new mtime).
# .dockerignore then applies to it as to any context.
context=.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  context=$CACHE/context
  rm -rf "$context" && mkdir -p "$context"
  git ls-files -z --cached --others --exclude-standard \
    | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -C "$context" -xf -
  find "$context" -exec touch -h -d @0 {} +
fi
image_id() { buildah images --noheading --no-trunc --format '{{.ID}}' "$1" 2>/dev/null || true; }
build() {  # NAME DOCKERFILE BUILD-ARGS...
  local name=$1 file=$2 old
  shift 2
  old=$(image_id "localhost/$name:$TAG")
  say "building localhost/$name:$TAG from $file"
  buildah build --layers --format docker --network host -f "$context/$file" -t "localhost/$name:$TAG" \
    "${net_args[@]}" "$@" "$context" \
    >"$CACHE/$name.log" 2>&1 \
    || { tail -30 "$CACHE/$name.log" >&2; echo "error: building $file failed (log: $CACHE/$name.log)" >&2; exit 1; }
  echo "    $(grep -c 'Using cache' "$CACHE/$name.log" || true) steps from the layer cache"
  if [ -n "$old" ] && [ "$old" != "$(image_id "localhost/$name:$TAG")" ]; then
    buildah rmi "$old" >/dev/null 2>&1 || true  # the previous build of this tag
  fi
}
build pixq-worker docker/Dockerfile.worker --build-arg "CUDA_IMAGE=$BASE" "${torch_args[@]}"
build pixq-producer docker/Dockerfile.producer --build-arg "PYTHON_IMAGE=$BASE"

# Layers of earlier builds (the layer cache's leaves) that have not been used for a while; a
# chain goes one layer per pass.
for _ in 1 2 3 4 5 6 7 8 9 10; do
  stale=$(buildah images --all --quiet --filter dangling=true --filter "until=${PIXQ_IMAGE_CACHE_HOURS:-72}h")
  [ -n "$stale" ] || break
  # shellcheck disable=SC2086 # one id per word
  buildah rmi $stale >/dev/null 2>&1 || break
done

# An image's size: its unpacked filesystem, as `docker images` reports it.
for name in pixq-worker pixq-producer; do
  ctr=$(buildah from --pull-never "localhost/$name:$TAG")
  echo "size localhost/$name:$TAG $(du -sxb "$(buildah mount "$ctr")" | cut -f1)"
  buildah rm "$ctr" >/dev/null
done
say "done"
