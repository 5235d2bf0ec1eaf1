# ldmserve: one image for both roles.
#   docker run ... ldmserve:latest                     -> `ldmserve api` (CMD default, port 8000)
#   docker run --gpus 1 ... ldmserve:latest worker     -> `ldmserve worker` (one per GPU)
# Build from the repository root:  docker build -t ldmserve:latest .   (or `make image`)
# No `# syntax=` line: BuildKit would pull that frontend image from a registry, and the built-in
# frontend (and the legacy builder) handle everything used here.
#
# CUDA (the defaults): torch's PyPI wheels carry their own CUDA 12.8 runtime, cuBLAS and cuDNN
# (the nvidia-*-cu12 pip packages), so the base image only has to be a CUDA 12.8 userland that the
# NVIDIA container toolkit recognises; the `base` flavour avoids shipping a second copy of
# those libraries (the `cudnn-runtime` flavour adds ~3 GB that torch never loads).
# TORCH_VERSION must stay a cu12 wheel: 2.10.0 is the newest torch whose default PyPI wheel is
# built for CUDA 12 (2.11+ default to CUDA 13 and would need a CUDA 13 base and driver).
#
# CPU (`make image` without a registry, see deploy/README.md): BASE_IMAGE is a locally imported
# Debian bookworm rootfs and TORCH_VERSION a local CPU wheel (e.g. 2.13.0+cpu) that `make image`
# puts in deploy/pip/ (the `+cpu` local version matches only that wheel; torch's own
# dependencies still come from the package index). deploy/pip/pip.conf, when `make image` wrote
# one, carries the host's pip CA bundle (a TLS-inspecting proxy); it stays in the build stage.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04

FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.10.0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# deploy/pip holds only a README unless `make image` put a wheel or a pip.conf there. pip
# ignores a PIP_CONFIG_FILE that does not exist.
COPY deploy/pip /pip
ENV PIP_CONFIG_FILE=/pip/pip.conf
# torch first, in its own layer: it is most of the image and changes least often.
RUN pip install --no-cache-dir --find-links /pip "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
# Runtime dependencies (no test extra) and boto3 for s3:// result stores; torch is already
# satisfied above. (DL3013: this is the local project with an extra, pinned by pyproject.toml.)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[s3]" \
    && python -c "import service.settings, model"

FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# The venv's interpreter is a link to the distribution's python3, so the runtime needs it too.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 ldmserve \
    && useradd --system --uid 10001 --gid ldmserve --create-home --home-dir /home/ldmserve ldmserve \
    && mkdir -p /models /cache/huggingface \
    && chown -R ldmserve:ldmserve /cache /home/ldmserve
COPY --from=build /opt/venv /opt/venv
# HF_HOME: a Hugging Face repo id given as the model is downloaded here when the worker starts
# (mount a volume on /cache/huggingface so it is fetched once). Local checkpoints (.safetensors
# files or diffusers folders) go in the /models volume: LDMSERVE_MODEL=/models/<name>.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    LDMSERVE_HOST=0.0.0.0 \
    LDMSERVE_PORT=8000
# Mount points (no VOLUME instruction: it would leave an anonymous volume per container).
# /models            read-only checkpoints
# /cache/huggingface  HF_HOME, writable by uid 10001
USER 10001:10001
WORKDIR /home/ldmserve
EXPOSE 8000
# For the api role. A worker has no HTTP port: compose and k8s override this with
# `ldmserve health worker` (its Redis heartbeat key exists).
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["ldmserve", "health", "api"]
ENTRYPOINT ["ldmserve"]
CMD ["api"]
