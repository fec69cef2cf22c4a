#!/usr/bin/env bash
# One entry point for a fresh machine:
#   ./run.sh demo [N]   set up .venv, then start the server with N (default 2) local nodes
#   ./run.sh test       set up .venv, then lint and run every test
#   ./run.sh setup      only set up .venv
#   ./run.sh images [--gpu]  build the container images (docker/) and smoke-test them
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY="$VENV/bin/python"

setup() {
  if ! command -v python3 >/dev/null; then
    echo "python3 (>= 3.11) is required" >&2; exit 1
  fi
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
  fi
  # torch first, pinned to the CPU build (installing the project first would pull a
  # multi-GB CUDA build); the project itself only asks for torch>=2.4.
  if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "torch==2.13.0"
  fi
  if ! "$PY" -c "import server, native_node, shared, pytest, ruff" 2>/dev/null \
      || [ pyproject.toml -nt "$VENV/.installed" ]; then
    "$PY" -m pip install -q -e ".[dev]"
    touch "$VENV/.installed"
  fi
  # browser node: npm packages (package-lock.json) copied into browser/vendor/ (no CDN)
  if [ -f package.json ]; then
    if ! command -v npm >/dev/null; then
      echo "npm (Node.js >= 20) is required for the browser node's packages:" \
           "apt-get install -y nodejs npm" >&2; exit 1
    fi
    if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
      npm ci --no-audit --no-fund
      touch node_modules
    fi
    if [ ! -f browser/vendor/manifest.json ] || [ node_modules -nt browser/vendor/manifest.json ] \
        || [ scripts/vendor_browser.py -nt browser/vendor/manifest.json ]; then
      "$PY" scripts/vendor_browser.py
    fi
  fi
  # PostgreSQL for `--db postgresql://...` and its store and ledger tests (they skip without
  # it; tests start a throwaway server from these binaries, bench/pgserver.py)
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null \
      && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q postgresql || { apt-get update -q && apt-get install -y -q postgresql; }
  fi
  # headless Chromium for the Playwright tests in e2e/ (they skip without it)
  if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }
  fi
  # coturn + iptables for bench.nat and tests/test_nat.py (NAT routers in network namespaces,
  # a real TURN server), nginx for the reverse-proxy example docs/operator.md gives and
  # tests/test_deploy_doc.py runs (they skip without them)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && { ! command -v turnserver \
      >/dev/null || ! command -v iptables >/dev/null || ! command -v nginx >/dev/null; }; then
    apt-get install -y -q coturn iptables nginx-light \
      || { apt-get update -q && apt-get install -y -q coturn iptables nginx-light; }
  fi
}

cmd="${1:-demo}"
case "$cmd" in
  setup) setup ;;
  demo)
    setup
    exec "$PY" -m server --demo "${2:-2}" "${@:3}" ;;
  test)
    setup
    "$VENV/bin/ruff" check .
    "$VENV/bin/hadolint" docker/*.Dockerfile
    # mypy (about a minute on one core) runs beside the first tests instead of before them;
    # its verdict counts as much as theirs
    "$VENV/bin/mypy" >"$VENV/mypy.log" 2>&1 & mypy_pid=$!
    rc=0
    if [ $# -gt 1 ]; then  # ./run.sh test ARGS: pytest ARGS, in one process
      "$PY" -m pytest -q --durations=30 "${@:2}" || rc=$?
    else
      # tests/ on 2 workers (pytest-xdist; a file's tests stay on one worker; servers take
      # loopback ports from the kernel, namespaces are per test), then the browser suite in
      # one process (a Chromium per test)
      "$PY" -m pytest -q --durations=30 -n 2 --dist loadfile tests || rc=$?
      "$PY" -m pytest -q --durations=30 e2e || rc=$?
    fi
    if ! wait "$mypy_pid"; then cat "$VENV/mypy.log"; echo "mypy failed" >&2; exit 1; fi
    tail -1 "$VENV/mypy.log"
    exit "$rc" ;;
  images)
    setup
    exec "$PY" -m scripts.images "${@:2}" ;;
  *) echo "usage: ./run.sh demo [N] | test | setup | images [--gpu]" >&2; exit 2 ;;
esac
