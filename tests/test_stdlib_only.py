"""`shared` must import with the standard library alone: it runs in Pyodide, which has no
numpy, torch, aiohttp, safetensors, scikit-learn, pqcrypto or zstandard.

Each check runs in a fresh interpreter (this process has long since imported numpy & co),
imports `shared` and EVERY module under it (found with pkgutil.walk_packages, so new modules
and subpackages are covered without editing this file), and compares what got imported with
`sys.stdlib_module_names`. A native dependency is fine only when imported lazily, inside the
function that needs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Heavy dependencies named explicitly, so the failure says which one got in, and so a
# module already loaded by site/.pth before our baseline cannot hide from the check.
KNOWN_NATIVE = ("numpy", "torch", "aiohttp", "safetensors", "sklearn", "scipy", "pqcrypto",
                "zstandard", "tqdm")

# Runs in the child. Everything imported before `before` (the interpreter, site, .pth hooks
# such as the editable-install finder) is the baseline; what is imported after it is judged
# (the helpers this script imports are stdlib, so they pass).
PRELUDE = textwrap.dedent("""
    import sys
    before = set(sys.modules)
    import importlib, json, pkgutil, types
""")

IMPORT_ALL = textwrap.dedent("""
    import shared
    imported = ["shared"]
    failed = []
    def _onerror(name):
        failed.append(name)
    for info in pkgutil.walk_packages(shared.__path__, "shared.", onerror=_onerror):
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failed.append(f"{info.name}: {type(exc).__name__}: {exc}")
        else:
            imported.append(info.name)
""")

REPORT = textwrap.dedent("""
    allowed = {"shared", "__main__"} | ALLOWED_EXTRA
    new = set(sys.modules) - before
    tops = {name.partition(".")[0] for name in new}
    offenders = sorted(t for t in tops if t not in sys.stdlib_module_names and t not in allowed)
    loaded = sorted(m for m in KNOWN_NATIVE if m in sys.modules)
    print(json.dumps({"imported": imported, "failed": failed, "offenders": offenders,
                      "known_native_loaded": loaded,
                      "offender_modules": sorted(n for n in new
                                                 if n.partition(".")[0] in offenders)[:5]}))
""")


def run_child(body: str, allowed_extra: tuple[str, ...] = ()) -> dict[str, Any]:
    code = "\n".join((PRELUDE, f"KNOWN_NATIVE = {KNOWN_NATIVE!r}",
                      f"ALLOWED_EXTRA = set({allowed_extra!r})", body, REPORT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def check_report(report: dict[str, Any]) -> None:
    assert not report["failed"], f"modules of shared failed to import: {report['failed']}"
    assert len(report["imported"]) > 1, "walk_packages found no module under shared"
    why = ("importing shared loaded non-stdlib modules: "
           f"{report['offenders'] or report['known_native_loaded']} "
           f"(e.g. {report['offender_modules']}); import them lazily inside the functions "
           "that need them")
    assert not report["offenders"], why
    assert not report["known_native_loaded"], why


def test_every_shared_module_imports_with_the_stdlib_only() -> None:
    report = run_child(IMPORT_ALL)
    check_report(report)
    for name in ("shared.frame", "shared.messages", "shared.vec", "shared.codecs",
                 "shared.outer"):
        assert name in report["imported"]


PYODIDE = textwrap.dedent("""
    sys.modules["_pyodide_core"] = types.ModuleType("_pyodide_core")  # what Pyodide has
""") + IMPORT_ALL + textwrap.dedent("""
    from array import array

    import shared.vec
    from shared.codecs import get_codec
    from shared.outer import OuterConfig, outer_step

    assert shared.vec.IN_BROWSER, "shared.vec did not notice the browser"
    assert shared.vec.numpy_module() is None, "numpy must never be used in the browser"

    theta, grad, mom = array("f", [1, 2, 3]), array("f", [0.5, -0.5, 0]), array("f", [0, 0, 0])
    new_theta, new_mom = outer_step(theta, grad, mom, OuterConfig(lr=0.5, momentum=0.5))
    assert type(new_theta) is array and type(new_mom) is array
    # m' = 0.5 * 0 + g = g; theta' = theta - 0.5 * (g + 0.5 * m') = theta - 0.75 * g
    assert list(new_mom) == [0.5, -0.5, 0.0], list(new_mom)
    assert list(new_theta) == [0.625, 2.375, 3.0], list(new_theta)

    codec = get_codec("raw32")  # lossless: the round trip is exact
    data = codec.encode(new_theta)
    assert isinstance(data, bytes) and len(data) >= 12
    back = codec.decode(data, 3)
    assert type(back) is array and list(back) == list(new_theta)

    from shared.frame import decode_frame, encode_frame
    frame = decode_frame(encode_frame(5, {"round": 1, "text": "caf\u00e9"}, data))
    assert frame.header == {"round": 1, "text": "caf\u00e9"} and frame.payload == data
""")


def test_pyodide_simulation_no_numpy_and_pure_python_paths_work() -> None:
    report = run_child(PYODIDE, allowed_extra=("_pyodide_core",))
    check_report(report)
