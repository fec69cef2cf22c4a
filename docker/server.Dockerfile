# DAA Prime server: the coordinator, the page a contributor opens (with its vendored npm
# assets: Pyodide, ONNX Runtime Web, ...) and the ONNX export of the train step (the `onnx`
# extra). Build from the repository root, after `./run.sh setup` (npm ci + vendor_browser.py
# fill browser/vendor/, which git ignores):
#   docker build -f docker/server.Dockerfile -t daa-prime-server .
# ./run.sh images builds it with Docker, or with Buildah from a Debian base made by mmdebstrap
# (BASE: any Debian-like image with python3 >= 3.11 and its venv module).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG TORCH_VERSION=2.13.0
# a wheel index for torch (PyTorch's CPU builds by default: PyPI's Linux torch is the CUDA
# build); torch wheels put in docker/wheels/ are preferred (./run.sh images puts the build
# machine's local CPU wheel there)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

SHELL ["/bin/sh", "-eu", "-c"]
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 HOME=/home/daa

RUN python3 -m venv /opt/venv \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin daa \
 && mkdir -p /data && chown daa:daa /data

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
COPY server ./server
COPY browser ./browser
COPY docker/healthcheck.py ./docker/healthcheck.py
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && test -f browser/vendor/manifest.json \
      || { echo "browser/vendor/ is empty: run ./run.sh setup (npm ci + scripts/vendor_browser.py) first" >&2; exit 1; } \
 && pip install -e ".[onnx]" \
 && rm -rf build

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8470
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "/app/docker/healthcheck.py", "server"]
CMD ["python", "-m", "server", "--host", "0.0.0.0", "--data-dir", "/data"]
