"""bench.scratch: a benchmark's temporary folder goes at exit, and stays when the run failed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAKE = "from bench.scratch import scratch; p = scratch('daa-test-scratch-'); " \
       "(p / 'server.log').write_text('x'); print(p, flush=True); "


def _run(code: str, **env: str) -> tuple[Path, str]:
    out = subprocess.run([sys.executable, "-c", MAKE + code], capture_output=True, text=True,
                         cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env}, timeout=60)
    return Path(out.stdout.strip().splitlines()[0]), out.stderr


def test_removed_after_a_run_that_ends_normally() -> None:
    path, err = _run("pass")
    assert not path.exists(), err


def test_kept_and_named_after_a_run_that_fails() -> None:
    path, err = _run("raise RuntimeError('the bench failed')")
    try:
        assert (path / "server.log").exists()
        assert f"kept {path}" in err
        assert "RuntimeError: the bench failed" in err
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_kept_when_asked() -> None:
    path, _ = _run("pass", DAA_KEEP_TMP="1")
    try:
        assert path.exists()
    finally:
        shutil.rmtree(path, ignore_errors=True)
