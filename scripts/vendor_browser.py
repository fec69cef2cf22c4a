"""Copy the browser node's npm files from node_modules/ into browser/vendor/ (no CDN).

    npm ci --no-audit --no-fund && python3 scripts/vendor_browser.py        (./run.sh setup)

The server serves browser/ at /static/, so a file lands at /static/vendor/<package>/<file>.
Only what the page loads is copied (pyodide's runtime, onnxruntime-web's wasm and WebGPU
bundles, the @noble packages' ES modules, the zstd codecs, uPlot). Writes
browser/vendor/manifest.json: every package's version and the import map the pages use.
Stdlib only; idempotent (a file is copied again only when its size or mtime changed).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = ROOT / "node_modules"
VENDOR = ROOT / "browser" / "vendor"
URL = "/static/vendor"

# package -> (source folder inside the package, file patterns); "**/*.js" keeps sub-folders.
FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "pyodide": ("", ("pyodide.mjs", "pyodide.js", "pyodide.asm.js", "pyodide.asm.wasm",
                     "python_stdlib.zip", "pyodide-lock.json")),
    "onnxruntime-web": ("dist", ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs",
                                 "ort-wasm-simd-threaded.wasm", "ort.min.mjs",
                                 "ort-wasm-simd-threaded.jsep.mjs",
                                 "ort-wasm-simd-threaded.jsep.wasm")),
    "@noble/hashes": ("", ("**/*.js",)),
    "@noble/curves": ("", ("**/*.js",)),
    "@noble/ciphers": ("", ("**/*.js",)),
    "@noble/post-quantum": ("", ("**/*.js",)),
    "fzstd": ("esm", ("index.mjs",)),
    "@bokuweb/zstd-wasm": ("dist/web", ("**/*.js", "zstd.wasm")),
    "uplot": ("dist", ("uPlot.esm.js", "uPlot.min.css")),
}

IMPORT_MAP = {
    "@noble/hashes/": f"{URL}/@noble/hashes/",
    "@noble/curves/": f"{URL}/@noble/curves/",
    "@noble/ciphers/": f"{URL}/@noble/ciphers/",
    "@noble/post-quantum/": f"{URL}/@noble/post-quantum/",
    "fzstd": f"{URL}/fzstd/index.mjs",
    "@bokuweb/zstd-wasm": f"{URL}/@bokuweb/zstd-wasm/index.web.js",
    "onnxruntime-web": f"{URL}/onnxruntime-web/ort.wasm.min.mjs",
    "onnxruntime-web/webgpu": f"{URL}/onnxruntime-web/ort.min.mjs",
    "uplot": f"{URL}/uplot/uPlot.esm.js",
}

# @bokuweb/zstd-wasm's ESM build imports "./module" without an extension: fine for bundlers,
# a 404 in a browser. Add ".js" to such relative specifiers while copying.
EXTENSIONLESS = re.compile(r"""(\bfrom\s*|\bimport\s*\(?\s*)(['"])(\.{1,2}/[^'"]+?)(?<!\.js)\2""")


def _fix_imports(text: str, folder: Path) -> str:
    """"./x" -> "./x.js", or "./x/index.js" when x is a folder next to the importer."""

    def fix(m: re.Match[str]) -> str:
        spec = m[3] + ("/index.js" if (folder / m[3]).is_dir() else ".js")
        return f"{m[1]}{m[2]}{spec}{m[2]}"

    return EXTENSIONLESS.sub(fix, text)


def _sources(package: str) -> list[tuple[Path, Path]]:
    sub, patterns = FILES[package]
    base = NODE_MODULES / package / sub if sub else NODE_MODULES / package
    if not base.is_dir():
        raise SystemExit(f"vendor_browser: {base} is missing; run `npm ci` first")
    found: list[tuple[Path, Path]] = []
    for pattern in patterns:
        matches = sorted(p for p in base.glob(pattern)
                         if p.is_file() and "src" not in p.relative_to(base).parts[:-1])
        if not matches:
            raise SystemExit(f"vendor_browser: {package}: nothing matches {pattern!r} in {base}")
        found += [(p, p.relative_to(base)) for p in matches]
    return found


def _copy(src: Path, dst: Path, *, rewrite: bool) -> bool:
    st = src.stat()
    if dst.exists() and not rewrite:
        dt = dst.stat()
        if dt.st_size == st.st_size and int(dt.st_mtime) == int(st.st_mtime):
            return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    if rewrite:
        text = _fix_imports(src.read_text(encoding="utf-8"), src.parent)
        if dst.exists() and dst.read_text(encoding="utf-8") == text:
            return False
        dst.write_text(text, encoding="utf-8")
    else:
        shutil.copy2(src, dst)
    return True


def vendor() -> dict[str, object]:
    manifest: dict[str, object] = {"packages": {}, "imports": IMPORT_MAP}
    copied = 0
    for package in FILES:
        meta = json.loads((NODE_MODULES / package / "package.json").read_text(encoding="utf-8"))
        files = []
        for src, rel in _sources(package):
            rewrite = package == "@bokuweb/zstd-wasm" and src.suffix == ".js"
            copied += _copy(src, VENDOR / package / rel, rewrite=rewrite)
            files.append(rel.as_posix())
        manifest["packages"][package] = {"version": meta["version"], "files": len(files)}  # type: ignore[index]
    (VENDOR / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n",
                                          encoding="utf-8")
    print(f"vendor_browser: {len(FILES)} packages in {VENDOR.relative_to(ROOT)} "
          f"({copied} files copied)")
    return manifest


if __name__ == "__main__":
    vendor()
    sys.exit(0)
