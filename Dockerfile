# syntax=docker/dockerfile:1
# s4serve: the inference server and the shipped checkpoints (checkpoints/*), as a non-root user.
# One Dockerfile, two images; BASE must be Debian or Ubuntu (apt) with a python3 >= 3.11 package.
#
#   CPU (default):  docker build -t s4serve .
#   CUDA 13:        docker build -t s4serve:cuda \
#                     --build-arg BASE=nvidia/cuda:13.0.1-base-ubuntu24.04 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
#
# The CUDA base needs no CUDA libraries of its own (-base, not -runtime): the torch wheel brings
# them as pip packages; the base sets the environment the NVIDIA container toolkit reads
# (docker run --gpus all). pip settings for the build only (a mirror, find-links, a CA bundle):
# --secret id=pip.conf,src=FILE; they are not kept in the image (scripts/container-smoke does it).
# Files that pip.conf names (a CA bundle, a find-links folder) can be bind-mounted with podman build
# -v; mount them on /srv or /mnt (empty in the base): buildah keeps a mount point it had to create,
# empty, in every RUN's layer, base stage included, and no RUN can delete it while it is mounted.

ARG BASE=debian:bookworm-slim

# ---- runtime base: python3, and the C compiler that builds the fused CPU step (model/csrc) for
# ---- the host's CPU (-march=native) at start-up: 1.3-4.4x the decode throughput of torch ops
# ---- (README, Performance) for ~200 MB; Python's headers, which Triton's launcher (the CUDA image's
# ---- Triton step, S4_TRITON_STEP) and torch.compile's generated C++ (S4_COMPILE_STEP) are compiled
# ---- against at first use (without them the step falls back to torch ops, with a warning); the CA
# ---- certificates a rediss:// session store's server is verified against (redis-py reads the
# ---- system's; -slim has none). Package versions are the base's.
FROM ${BASE} AS base
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 gcc libc6-dev \
       python3-dev ca-certificates \
    && apt-get clean && rm -rf /var/lib/apt/lists/*

# ---- build: a virtual environment with torch and the project (no source tree, no pip cache;
# ---- without the C++ unit-test binaries some torch wheels carry, ~130 MB never run)
FROM base AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && torch=$(/opt/venv/bin/python -c "import importlib.util as u; print(u.find_spec('torch').submodule_search_locations[0])") \
    && rm -rf "$torch/test" "$torch"/bin/test_* "$torch"/bin/*Test
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model model
COPY server server
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    /opt/venv/bin/pip install --no-cache-dir .
# world-readable whatever the build machine's umask made them (safetensors files are often 0600)
COPY checkpoints /opt/s4serve/checkpoints
RUN chmod -R a+rX,go-w /opt/s4serve

# ---- the image
FROM base
LABEL org.opencontainers.image.title="s4serve" \
      org.opencontainers.image.description="S4 state-space models served as verified recurrences (HTTP, SSE, WebSocket)" \
      org.opencontainers.image.licenses="Apache-2.0"
# the user, and its cache folder (S4_RECURRENT_CACHE, S4_CONVERT_CACHE) made here so that a named volume
# mounted on it starts owned by the user (README, "Docker")
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin s4 \
    && install -d -o s4 -g s4 /home/s4/.cache /home/s4/.cache/s4serve
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/s4serve /opt/s4serve
WORKDIR /opt/s4serve
# Every setting is an S4_* variable (README, "Configuration"); these differ from `make serve`:
# listen on all interfaces; the caches are the user's (HOME is /home/s4), named here whatever HOME a
# runtime sets for a numeric USER. The fused step is compiled into the cache folder too, so that a volume
# there keeps it across restarts; where that folder cannot be written (a read-only root, no volume) it is
# compiled into /tmp/s4serve-build instead (model/fused.py), which needs /tmp writable and exec.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    S4_HOST=0.0.0.0 \
    S4_PORT=8000 \
    S4_BUILD_CACHE=/home/s4/.cache/s4serve/build \
    S4_RECURRENT_CACHE=/home/s4/.cache/s4serve/recurrent \
    S4_CONVERT_CACHE=/home/s4/.cache/s4serve/convert
USER 10001:10001
EXPOSE 8000
# /readyz: 503 while the models load and while draining. Loading the shipped models takes seconds.
# server/healthcheck.py asks the address the server listens on: its --host/--port flags (given after the
# image name), else S4_HOST/S4_PORT.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-m", "server.healthcheck"]
# SIGTERM: /readyz 503, running requests finish (S4_DRAIN_TIMEOUT_S, default 10 s), exit 0.
# Give `docker stop` more than that: docker stop -t 30, or stop_grace_period in compose.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "server"]
