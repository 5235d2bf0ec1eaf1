#!/usr/bin/env bash
# `make image`: build ldmserve:latest from the project's Dockerfile.
#
# Why a script: the same Dockerfile has to build on GPU nodes (CUDA base image and CUDA torch
# from the registries, the Dockerfile's defaults) and on machines that reach package indexes but
# no container registry (CI here): there the base image is a Debian bookworm rootfs made with
# debootstrap and `docker import`ed, and torch is the pinned local CPU wheel. Both are cached:
# the base image is imported once (tag LOCAL_BASE), the wheel copied once, the layers reused.
#
#   make image                          # IMAGE_BASE=auto: the CUDA base if it can be had, else local
#   make image IMAGE_BASE=cuda          # the Dockerfile's defaults (GPU nodes)
#   make image IMAGE_BASE=local         # local Debian base + CPU torch
#   make image IMAGE=ldmserve:0.1.0     # another tag
#
# Builds use --network host (no bridge network; apt and pip traffic leaves from the host).
set -euo pipefail
cd "$(dirname "$0")/.."

image=${IMAGE:-ldmserve:latest}
mode=${IMAGE_BASE:-auto}
local_base=${LOCAL_BASE:-ldmserve-base:bookworm}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Pinned like the Dockerfile's CUDA torch; the `+cpu` local version matches only the CPU wheel.
cpu_torch=${CPU_TORCH_VERSION:-2.13.0+cpu}
py=${PY:-python3}
cuda_base=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
start=$(date +%s)

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if [ "$mode" = auto ]; then
  if have_image "$cuda_base" || docker pull "$cuda_base" >/dev/null 2>&1; then
    mode=cuda
  else
    echo "build_image: cannot get $cuda_base (no registry?): building on a local $suite base, CPU torch"
    mode=local
  fi
fi

# The legacy builder where BuildKit's CLI plugin (buildx) is missing; it needs no frontend image.
if [ -z "${DOCKER_BUILDKIT:-}" ] && ! docker buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=0
fi

# The host pip's CA bundle, for a build stage behind the same TLS-inspecting proxy.
ca=${PIP_CERT:-$("$py" -m pip config get global.cert 2>/dev/null || true)}
if [ -n "$ca" ] && [ -f "$ca" ]; then
  cmp -s "$ca" deploy/pip/ca.crt || cp "$ca" deploy/pip/ca.crt
  printf '[global]\ncert = /pip/ca.crt\n' >deploy/pip/pip.conf
else
  rm -f deploy/pip/ca.crt deploy/pip/pip.conf
fi

build_args=()
case "$mode" in
  cuda) ;;
  local)
    if ! have_image "$local_base"; then
      command -v debootstrap >/dev/null || {
        echo "build_image: debootstrap not found (apt-get install -y debootstrap)" >&2
        exit 1
      }
      rootfs=$(mktemp -d)
      trap 'rm -rf "$rootfs"' EXIT
      echo "build_image: debootstrap $suite ($mirror) -> $local_base"
      debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
        tail -20 "$rootfs.log" >&2
        exit 1
      }
      rm -f "$rootfs.log"
      # Security and point-release updates too, as in Debian's own images.
      cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
EOF
      # As in Debian's own images: packages installed in a build never start their services.
      printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
      chmod 755 "$rootfs/usr/sbin/policy-rc.d"
      rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
      tar -C "$rootfs" --numeric-owner -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' - "$local_base" >/dev/null
      rm -rf "$rootfs"
      trap - EXIT
    fi
    # The CPU wheel, from wherever this machine's pip finds it (here: a local find-links folder;
    # elsewhere e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), for the base's
    # Python (3.11 on bookworm).
    shopt -s nullglob
    wanted=(deploy/pip/torch-"$cpu_torch"-*.whl)
    if [ ${#wanted[@]} -eq 0 ]; then
      rm -f deploy/pip/torch-*.whl
      "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
        --implementation cp --abi cp311 --platform manylinux_2_28_x86_64 \
        --dest deploy/pip "torch==$cpu_torch"
    fi
    build_args=(--build-arg "BASE_IMAGE=$local_base" --build-arg "TORCH_VERSION=$cpu_torch")
    ;;
  *)
    echo "build_image: IMAGE_BASE must be auto, cuda or local, not '$mode'" >&2
    exit 2
    ;;
esac

echo "build_image: docker build ($mode) -> $image"
# The build stage gets a tag of its own (${image%%:*}-build:$mode) so the layers it caches (torch,
# the dependencies) outlive a rebuild; the images a rebuild replaces (untagged, with this label)
# are pruned, so repeated builds on one machine do not fill its disk.
label=org.ldmserve.image-build=1
docker build --network host "${build_args[@]}" --label "$label" --target build \
  -t "${image%%:*}-build:$mode" .
docker build --network host "${build_args[@]}" --label "$label" -t "$image" .
docker image prune -f --filter "label=$label" >/dev/null
size=$(docker image inspect -f '{{.Size}}' "$image")
echo "build_image: $image ($mode) $(awk -v b="$size" 'BEGIN { printf "%.2f GB", b / 1e9 }')" \
  "in $(($(date +%s) - start)) s"
