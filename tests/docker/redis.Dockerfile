# Redis for tests/test_docker.py's compose run, where redis:7.4-alpine cannot be pulled (no
# registry): Debian bookworm's redis-server (7.0) on the base image `make image` imported, run
# like the official image (user redis, data in /data, config mounted by the compose file).
ARG BASE_IMAGE=ldmserve-base:bookworm
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data /usr/local/etc/redis \
    && chown redis:redis /data
USER redis
WORKDIR /data
CMD ["redis-server", "/usr/local/etc/redis/redis.conf"]
