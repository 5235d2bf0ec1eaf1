#!/usr/bin/env bash
# The Dockerfile's Python layers, checked without Docker.
#
# Why: machines without a Docker engine (CI here) cannot build the image, yet most of what can
# break in it is the Python side: the pinned torch must exist for the image's Python and be
# built for the base image's CUDA, `pip install ".[s3]"` from only the files the Dockerfile copies
# must give a working `ldmserve`, and the entrypoint's commands must run. This script repeats
# those steps in a throw-away venv made with the base image's Python version (3.10 on
# ubuntu22.04), then runs `ldmserve up` from it (CPU; the CUDA torch wheel runs without a GPU),
# serves one job and runs the HEALTHCHECK command. It downloads torch's CUDA wheels (~3 GB).
#
#   bash scripts/check_image_deps.sh            # PY=python3.10 by default
#   PY=/path/to/python3.10 bash scripts/check_image_deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PY:-python3.10}
torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
cuda_image=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
cuda_want=$(sed -E 's/.*:([0-9]+\.[0-9]+).*/\1/' <<<"$cuda_image")
work=$(mktemp -d)
up_pid=
trap '[ -z "$up_pid" ] || kill "$up_pid" 2>/dev/null; rm -rf "$work"' EXIT
echo "Dockerfile: torch $torch_version on $cuda_image (CUDA $cuda_want), python: $("$py" --version)"

# Build stage: the same commands, the same copied files.
"$py" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip install -q --no-cache-dir)
"${pip[@]}" --upgrade pip
"${pip[@]}" "torch==$torch_version"
mkdir "$work/src"
cp -r pyproject.toml README.md model service "$work/src/"
(cd "$work/src" && "${pip[@]}" ".[s3]" && "$work/venv/bin/python" -c "import service.settings, model")
cuda_got=$("$work/venv/bin/python" -c "import torch; print(torch.version.cuda or 'none')")
echo "installed torch $("$work/venv/bin/python" -c 'import torch; print(torch.__version__)') built for CUDA $cuda_got"
[[ $cuda_got == "$cuda_want"* ]] || { echo "torch is built for CUDA $cuda_got, the base image is $cuda_want" >&2; exit 1; }

# Runtime: the entrypoint with the demo model, one job, the HEALTHCHECK command.
port=$("$work/venv/bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
export LDMSERVE_PORT=$port LDMSERVE_HOST=127.0.0.1
(cd "$work" && exec "$work/venv/bin/ldmserve" up --port "$port" --data-dir "$work/data") >"$work/up.log" 2>&1 &
up_pid=$!
"$work/venv/bin/python" - "$port" <<'EOF'
import json, sys, time, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"


def get(path: str) -> bytes:
    with urllib.request.urlopen(base + path, timeout=10) as r:
        return r.read()


deadline = time.monotonic() + 180
while True:
    try:
        get("/readyz")
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("the service did not become ready in 180 s")
        time.sleep(1)
body = json.dumps({"prompt": "image check", "width": 64, "height": 64, "steps": 4}).encode()
req = urllib.request.Request(base + "/v1/jobs", body, {"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=10) as r:
    job = json.loads(r.read())["id"]
while (state := json.loads(get(f"/v1/jobs/{job}")))["status"] in ("queued", "running"):
    if time.monotonic() > deadline + 120:
        sys.exit(f"job {job} did not finish: {state}")
    time.sleep(0.5)
assert state["status"] == "succeeded", state
png = get(f"/v1/jobs/{job}/images/0")
assert png.startswith(b"\x89PNG"), png[:8]
print(f"job {job} succeeded: {len(png)} PNG bytes")
EOF
"$work/venv/bin/ldmserve" health api && echo "HEALTHCHECK (ldmserve health api): healthy"
kill -INT "$up_pid"
wait "$up_pid" && echo "ldmserve up stopped cleanly on SIGINT"
up_pid=
