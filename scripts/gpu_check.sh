#!/usr/bin/env bash
# The native node's CUDA path in under 5 minutes; prints ONE JSON line last (bench/gpu_check.py):
# device name, tokens/s and MFU of the zoo's flavours, bf16-vs-fp32 loss parity, one outer sync.
#   scripts/gpu_check.sh            on a machine with a CUDA device (exit 1 without one)
#   scripts/gpu_check.sh --dry      the same code on the CPU with tiny sizes (also
#                                   DAA_GPU_CHECK_DRY=1); tests/test_gpu_check.py runs this
# In the CUDA node image: docker run --gpus all daa-prime-node-cuda scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec timeout 300 "$PY" -m bench.gpu_check "$@"
