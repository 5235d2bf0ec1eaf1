#!/usr/bin/env bash
# A Docker engine for `make image` and `make test-docker` on a Debian host (CI: run as root).
#
# Installs what is missing (docker.io, debootstrap for the local base image, Debian's
# docker-compose unless the compose plugin is there) and starts dockerd when none answers.
# dockerd gets no default bridge and writes no iptables rules: builds and containers here use
# the host network (loopback), so the host's own network is left as it is. Images and build
# cache stay in /var/lib/docker between runs.
set -euo pipefail

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
  need+=(docker-compose)
fi
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "start_docker: run as root to install ${need[*]}" >&2; exit 1; }
  echo "start_docker: apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -q -o DPkg::Lock::Timeout=300 update >/dev/null
  apt-get -q -o DPkg::Lock::Timeout=300 install -y "${need[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  log=${DOCKERD_LOG:-/tmp/dockerd.log}
  echo "start_docker: starting dockerd (log: $log)"
  setsid nohup dockerd --bridge=none --iptables=false --ip6tables=false \
    </dev/null >"$log" 2>&1 &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { tail -30 "$log" >&2; exit 1; }
fi
echo "start_docker: engine $(docker version --format '{{.Server.Version}}')," \
  "compose: $(docker compose version --short 2>/dev/null || docker-compose version --short)"
