"""Scratch folders for benchmarks: removed when the process ends, kept when it fails.

A benchmark's servers and nodes write their data and logs under one temporary folder. It is
worth keeping only when something went wrong (the error names the folder); otherwise runs
and the tests that drive benchmarks would leave one folder each in /tmp, hundreds a day.
`scratch(prefix)` makes the folder and registers it: at exit it is removed unless an
exception reached the top of the program (its logs are then kept and named on stderr) or
DAA_KEEP_TMP=1 is set.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import TracebackType

_made: list[Path] = []
_failed = False
_hook = sys.excepthook


def _note_failure(kind: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
    global _failed
    _failed = True
    _hook(kind, exc, tb)


def _clean() -> None:
    if _failed or os.environ.get("DAA_KEEP_TMP") == "1":
        for path in _made:
            if path.exists():
                print(f"kept {path} (logs and data of the failed run)", file=sys.stderr)
        return
    for path in _made:
        shutil.rmtree(path, ignore_errors=True)


def scratch(prefix: str) -> Path:
    """A new temporary folder named `prefix`..., removed at exit unless the program failed."""
    global _hook
    if not _made:
        atexit.register(_clean)
        if sys.excepthook is not _note_failure:
            _hook, sys.excepthook = sys.excepthook, _note_failure
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _made.append(path)
    return path
