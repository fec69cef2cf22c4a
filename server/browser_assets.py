"""What a browser node loads: the `shared` package as a zip, its pages and vendored npm files.

    GET /pkg/shared.zip            the repo's `shared/` package (sources + testdata), zipped in
                                   memory once per process; Pyodide unpacks it
                                   (`pyodide.unpackArchive(buf, "zip")`) and imports `shared`.
                                   ETag / X-Content-SHA256 = SHA-256 of the zip; Cache-Control
                                   no-cache (revalidate: a new deploy is seen at once).
    GET /pkg/testdata/{name}.json  the golden vectors inside that zip (frames.json, codecs.json)
    GET /static/node/{path}        browser/node/: the browser node's pages and ES modules
    GET /static/vendor/{path}      browser/vendor/: npm files copied there by
                                   scripts/vendor_browser.py (./run.sh setup)
    GET /static/worker/{node|vendor}/{path}
                                   the same files for module Web Workers, which get no import
                                   map: bare specifiers (`@noble/hashes/sha2.js`, `fzstd`) are
                                   rewritten through the pages' import map (manifest.json) to
                                   URLs under /static/worker/ (browser/node/participant_worker.js)

Every response here is cross-origin isolated: COOP `same-origin`, COEP `require-corp` and
CORP `same-origin`, so that pages get `crossOriginIsolated === true` (SharedArrayBuffer, hence
ONNX Runtime Web's wasm threads). These routes are more specific than the app's
`add_static("/static/", ...)`; aiohttp >= 3.10 resolves the longest prefix first, and
registering them before that static route makes older versions agree.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from aiohttp import web

routes = web.RouteTableDef()

ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = ROOT / "shared"
NODE_DIR = ROOT / "browser" / "node"
VENDOR_DIR = ROOT / "browser" / "vendor"

ISOLATION = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".zip": "application/zip",
    ".py": "text/x-python; charset=utf-8",
    ".map": "application/json",
}
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same tree gives the same bytes


@dataclass(frozen=True, slots=True)
class SharedZip:
    data: bytes  # the zip file
    sha256: str  # hex digest of `data`
    testdata: dict[str, bytes]  # golden vector files by name


def build_shared_zip(source: Path = SHARED_DIR) -> SharedZip:
    """Zip `source` (a package folder) as `<name>/...`: sources and data files, no caches.
    Deterministic: sorted entries, fixed dates and modes."""
    buf = io.BytesIO()
    testdata: dict[str, bytes] = {}
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source.parent)
            if (not path.is_file() or "__pycache__" in rel.parts
                    or path.suffix in (".pyc", ".pyo") or path.name.startswith(".")):
                continue
            data = path.read_bytes()
            info = zipfile.ZipInfo(rel.as_posix(), date_time=ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
            if rel.parent.name == "testdata" and path.suffix == ".json":
                testdata[path.name] = data
    data = buf.getvalue()
    return SharedZip(data=data, sha256=hashlib.sha256(data).hexdigest(), testdata=testdata)


@cache
def shared_zip() -> SharedZip:
    """The zip of this process's `shared/` (built on first use, then kept)."""
    return build_shared_zip()


async def build_at_startup(app: web.Application) -> None:
    """`app.on_startup` hook: zip `shared/` before the first request (else on first use)."""
    shared_zip()


def _isolated(headers: dict[str, str] | None = None) -> dict[str, str]:
    return {**ISOLATION, **(headers or {})}


@routes.get("/pkg/shared.zip")
async def get_shared_zip(request: web.Request) -> web.Response:
    pkg = shared_zip()
    etag = f'"{pkg.sha256}"'
    headers = _isolated({"Cache-Control": "no-cache", "ETag": etag,
                         "X-Content-SHA256": pkg.sha256})
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=pkg.data, content_type="application/zip", headers=headers)


@routes.get("/pkg/testdata/{name}")
async def get_testdata(request: web.Request) -> web.Response:
    data = shared_zip().testdata.get(request.match_info["name"])
    if data is None:
        raise web.HTTPNotFound(text="no such golden vector file", headers=_isolated())
    return web.Response(body=data, content_type="application/json",
                        headers=_isolated({"Cache-Control": "no-cache"}))


def _resolve(base: Path, rel: str, missing: str) -> Path:
    """`base / rel`, refused (404) when it leaves `base` or is not a file."""
    if not base.is_dir():
        raise web.HTTPNotFound(text=missing, headers=_isolated())
    root = base.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise web.HTTPNotFound(text=f"not found: {rel}", headers=_isolated())
    return path


def _file(base: Path, rel: str, *, cache_control: str, missing: str) -> web.FileResponse:
    path = _resolve(base, rel, missing)
    ctype = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
    return web.FileResponse(path, headers=_isolated({"Content-Type": ctype,
                                                     "Cache-Control": cache_control}))


@routes.get("/static/node/{path:.+}")
async def get_node_file(request: web.Request) -> web.FileResponse:
    return _file(NODE_DIR, request.match_info["path"], cache_control="no-cache",
                 missing="browser/node/ is missing")


@routes.get("/static/vendor/{path:.+}")
async def get_vendor_file(request: web.Request) -> web.FileResponse:
    return _file(VENDOR_DIR, request.match_info["path"], cache_control="public, max-age=3600",
                 missing="browser/vendor/ is missing: run ./run.sh setup (npm ci + "
                         "scripts/vendor_browser.py)")


# `from '<spec>'`, `import '<spec>'`, `import('<spec>')` where <spec> is bare (not ./, ../, /)
BARE_IMPORT = re.compile(r"""(\bfrom\s*|\bimport\s*\(?\s*)(['"])([^'"./][^'"]*)\2""")
WORKER_URL = "/static/worker/"


def worker_import_map(vendor: Path = VENDOR_DIR) -> dict[str, str]:
    """The pages' import map (browser/vendor/manifest.json), pointed at /static/worker/."""
    imports = json.loads((vendor / "manifest.json").read_text(encoding="utf-8"))["imports"]
    return {k: v.replace("/static/vendor/", f"{WORKER_URL}vendor/", 1)
            for k, v in imports.items()}


def rewrite_bare_imports(text: str, imports: dict[str, str]) -> str:
    """Resolve bare import specifiers as an import map would: an exact key, else the longest
    key ending in "/" that prefixes the specifier. Unknown specifiers are left as they are."""
    prefixes = sorted((k for k in imports if k.endswith("/")), key=len, reverse=True)

    def resolve(m: re.Match[str]) -> str:
        spec = m[3]
        url = imports.get(spec)
        if url is None:
            key = next((k for k in prefixes if spec.startswith(k)), None)
            if key is None:
                return m[0]
            url = imports[key] + spec[len(key):]
        return f"{m[1]}{m[2]}{url}{m[2]}"

    return BARE_IMPORT.sub(resolve, text)


@cache
def _worker_module(path: Path, mtime_ns: int) -> bytes:
    del mtime_ns  # part of the cache key: an edited file is rewritten again
    return rewrite_bare_imports(path.read_text(encoding="utf-8"),
                                worker_import_map()).encode("utf-8")


@routes.get("/static/worker/{tree:node|vendor}/{path:.+}")
async def get_worker_file(request: web.Request) -> web.StreamResponse:
    tree = request.match_info["tree"]
    base = NODE_DIR if tree == "node" else VENDOR_DIR
    cache_control = "no-cache" if tree == "node" else "public, max-age=3600"
    rel = request.match_info["path"]
    path = _resolve(base, rel, f"browser/{tree}/ is missing")
    if path.suffix not in (".js", ".mjs") or not (VENDOR_DIR / "manifest.json").is_file():
        return _file(base, rel, cache_control=cache_control, missing=f"browser/{tree}/ is missing")
    body = _worker_module(path, path.stat().st_mtime_ns)
    return web.Response(body=body, headers=_isolated({
        "Content-Type": CONTENT_TYPES[path.suffix], "Cache-Control": cache_control}))
