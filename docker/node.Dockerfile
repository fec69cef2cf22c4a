# DAA Prime native node (`python -m native_node join`). One Dockerfile, two images:
#   CPU:  docker build -f docker/node.Dockerfile -t daa-prime-node-cpu .
#   CUDA: docker build -f docker/node.Dockerfile --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
#           -t daa-prime-node-cuda .     (PyPI's Linux torch wheels carry their CUDA runtime;
#         the host needs only the NVIDIA driver: docker run --gpus all ...)
# ./run.sh images [--gpu] builds them with Docker, or with Buildah from a Debian base made by
# mmdebstrap (BASE: any Debian-like image with python3 >= 3.11 and its venv module).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG TORCH_VERSION=2.13.0
# a wheel index for torch (PyTorch's CPU builds by default); torch wheels put in
# docker/wheels/ are preferred (./run.sh images puts the build machine's CPU wheel there)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

SHELL ["/bin/sh", "-eu", "-c"]
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 HOME=/home/daa \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DAA_COORDINATOR=server:8470 DAA_STATE_DIR=/home/daa/node

RUN python3 -m venv /opt/venv \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin daa

# the pip_cert build secret (optional): a CA bundle for pip where a proxy re-signs TLS
RUN --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}" \
    pip install --find-links /tmp/wheels "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY ml ./ml
COPY transport ./transport
COPY native_node ./native_node
COPY bench/__init__.py bench/gpu_check.py ./bench/
COPY scripts/gpu_check.sh ./scripts/gpu_check.sh
COPY docker/healthcheck.py ./docker/healthcheck.py
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && pip install -e . && rm -rf build

USER 10001:10001
# healthy while the coordinator lists this node's identity as connected
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/app/docker/healthcheck.py", "node"]
CMD ["sh", "-c", "exec python -m native_node join --coordinator \"$DAA_COORDINATOR\" --state-dir \"$DAA_STATE_DIR\" --quiet"]
