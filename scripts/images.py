"""Build the container images and smoke-test them (`./run.sh images [--gpu]`).

    python -m scripts.images [--gpu] [--no-smoke]

Engine: Docker when a daemon answers `docker info`, else Buildah (installed with apt-get when
this runs as root and it is missing). With Buildah no image registry is needed: the base is a
Debian bookworm root file system with python3 made by `mmdebstrap` from Debian's packages,
cached as ~/.cache/daa-prime/base-bookworm.tar (the output says when it came from there), and
the Dockerfiles build with `buildah bud --isolation chroot`, the base passed as the BASE build
argument (Docker uses the Dockerfiles' default base).

Torch: the CPU images take the build machine's local CPU wheel when pip has one (pip's
find-links folders), hard-linked into docker/wheels/; otherwise PyTorch's CPU index. The CUDA
node image (`--gpu`) takes PyPI's torch (the CUDA build, which carries its runtime).

Then the smoke test (scripts/images_smoke.py): a server container and two node containers
on 127.0.0.1, >= 2 committed rounds, the HEALTHCHECK commands, the served page in headless
Chromium, the GPU check's dry mode in the node image. Runner: `docker run --network host` with
Docker, else `buildah run --isolation chroot` (`podman run` cannot start containers on these
machines). The LAST stdout line is one JSON object (engine, runner, images {name: size_mb},
smoke); the build steps' own output goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "daa-prime"
BASE_TAR = CACHE / "base-bookworm.tar"
BASE_IMAGE = "localhost/daa-prime-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,ca-certificates,passwd"
WHEELS = ROOT / "docker" / "wheels"
TORCH_VERSION = "2.13.0"
IMAGES = {  # name -> (Dockerfile, extra build args)
    "server": ("docker/server.Dockerfile", {}),
    "node-cpu": ("docker/node.Dockerfile", {}),
    "node-cuda": ("docker/node.Dockerfile", {"TORCH_INDEX_URL": "https://pypi.org/simple"}),
}


def log(msg: str) -> None:
    print(msg, flush=True)


def sh(*cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a step; its own output goes to stderr (stdout keeps the summary and the JSON)."""
    log("$ " + " ".join(cmd))
    kw.setdefault("stdout", sys.stderr)
    return subprocess.run(cmd, check=True, text=True, **kw)


def out(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, text=True, capture_output=True).stdout.strip()


# -- engine and base ----------------------------------------------------------------------
def pick_engine() -> str:
    if shutil.which("docker") and subprocess.run(
            ["docker", "info"], capture_output=True, timeout=30).returncode == 0:
        return "docker"
    if not shutil.which("buildah") or not shutil.which("mmdebstrap"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise SystemExit("no Docker daemon and no buildah + mmdebstrap: install them "
                             "(apt-get install -y buildah mmdebstrap) or start Docker")
        sh("apt-get", "install", "-y", "-q", "buildah", "mmdebstrap")
    return "buildah"


def buildah_base() -> dict[str, Any]:
    """The Debian base image for Buildah; its root file system tarball is cached."""
    t0 = time.monotonic()
    from_cache = BASE_TAR.exists()
    if not from_cache:
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = BASE_TAR.with_suffix(".tmp.tar")
        sh("mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}",
           *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("man", "doc", "info",
                                                                   "locale")),
           "bookworm", str(tmp), "http://deb.debian.org/debian")
        tmp.replace(BASE_TAR)
    log(f"base: {BASE_TAR} " + ("(from cache)" if from_cache else "(made by mmdebstrap now)"))
    have = subprocess.run(["buildah", "inspect", "--type", "image", BASE_IMAGE],
                          capture_output=True).returncode == 0
    if not have or not from_cache:
        ctr = out("buildah", "from", "scratch")
        try:
            sh("buildah", "add", ctr, str(BASE_TAR), "/")
            sh("buildah", "config", "--cmd", "/bin/sh", ctr)
            sh("buildah", "commit", "--quiet", ctr, BASE_IMAGE, stdout=subprocess.DEVNULL)
        finally:
            subprocess.run(["buildah", "rm", ctr], capture_output=True)
    return {"image": BASE_IMAGE, "tarball": str(BASE_TAR), "from_cache": from_cache,
            "seconds": round(time.monotonic() - t0, 1)}


def local_torch_wheel() -> Path | None:
    """pip's local CPU torch wheel for the base's Python (3.11), if pip's find-links hold it."""
    dirs = [d for d in re.split(r"[\s]+", os.environ.get("PIP_FIND_LINKS", "")) if d]
    with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
        for line in out(sys.executable, "-m", "pip", "config", "list").splitlines():
            if "find-links" in line:
                dirs += line.split("=", 1)[1].strip("'\" ").split()
    for d in dirs:
        d = d.removeprefix("file://")
        hits = sorted(glob.glob(f"{d}/torch-{TORCH_VERSION}+cpu-cp311-*linux*_x86_64.whl"))
        if hits:
            return Path(hits[-1])
    return None


def pip_cert() -> str | None:
    """The CA bundle this machine's pip uses (PIP_CERT or pip's `cert` setting), if any."""
    cert = os.environ.get("PIP_CERT")
    if not cert:
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            for line in out(sys.executable, "-m", "pip", "config", "list").splitlines():
                if line.split("=", 1)[0].endswith(".cert"):
                    cert = line.split("=", 1)[1].strip("'\" ")
    return cert if cert and Path(cert).is_file() else None


def stage_wheels(cpu: bool) -> str | None:
    """docker/wheels/: the local CPU torch wheel for CPU images, nothing for CUDA ones."""
    for old in WHEELS.glob("*.whl"):
        old.unlink()
    wheel = local_torch_wheel() if cpu else None
    if wheel is not None:
        dest = WHEELS / wheel.name
        try:
            os.link(wheel, dest)
        except OSError:
            shutil.copy2(wheel, dest)
    return wheel.name if wheel else None


# -- build ---------------------------------------------------------------------------------
def build(engine: str, name: str, base: str | None, wheel: str | None) -> None:
    dockerfile, extra = IMAGES[name]
    args = dict(extra)
    if base:
        args["BASE"] = base
    if wheel:  # the local wheel's exact version; deps from PyPI
        args["TORCH_VERSION"] = wheel.split("-")[1]
        args["TORCH_INDEX_URL"] = "https://pypi.org/simple"
    flags = [f"--build-arg={k}={v}" for k, v in args.items()]
    cert = pip_cert()
    if cert:  # this machine's CA bundle for pip (a TLS-re-signing proxy), never in the image
        flags.append(f"--secret=id=pip_cert,src={cert}")
    tag = f"daa-prime-{name}"
    if engine == "docker":
        sh("docker", "build", "-f", dockerfile, *flags, "-t", tag, ".", cwd=ROOT)
    else:  # docker format keeps HEALTHCHECK (OCI has no field for it)
        sh("buildah", "bud", "--isolation", "chroot", "--format", "docker", "--layers",
           "-f", dockerfile, *flags, "-t", tag, ".", cwd=ROOT)


def size_mb(engine: str, name: str) -> float:
    tag = f"daa-prime-{name}"
    if engine == "docker":
        size = int(out("docker", "image", "inspect", "-f", "{{.Size}}", tag))
    else:  # uncompressed: the image's layers' diff sizes in containers/storage
        diff_ids = set(json.loads(out("buildah", "inspect", "--type", "image", tag))
                       ["OCIv1"]["rootfs"]["diff_ids"])
        root = Path(out("buildah", "info", "--format", "{{.store.GraphRoot}}"))
        driver = out("buildah", "info", "--format", "{{.store.GraphDriverName}}")
        layers = json.loads((root / f"{driver}-layers" / "layers.json").read_text())
        size = sum(int(layer.get("diff-size", 0)) for layer in layers
                   if layer.get("diff-digest") in diff_ids)
    return round(size / 1e6, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.images", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="also build the CUDA node image")
    p.add_argument("--no-smoke", action="store_true", help="build only")
    p.add_argument("--timeout", type=float, default=900.0, help="smoke test limit (s)")
    args = p.parse_args(argv)
    if not (ROOT / "browser" / "vendor" / "manifest.json").exists():
        raise SystemExit("browser/vendor/ is empty: run ./run.sh setup first")
    t0 = time.monotonic()
    engine = pick_engine()
    version = out(engine, "--version")
    log(f"engine: {version}")
    base = buildah_base() if engine == "buildah" else None
    sizes: dict[str, float] = {}
    wheel = stage_wheels(cpu=True)
    log(f"torch for the CPU images: {wheel or 'PyTorch CPU index (no local wheel)'}")
    try:
        for name in ("server", "node-cpu"):
            build(engine, name, base["image"] if base else None, wheel)
            sizes[name] = size_mb(engine, name)
        if args.gpu:
            stage_wheels(cpu=False)
            build(engine, "node-cuda", base["image"] if base else None, None)
            sizes["node-cuda"] = size_mb(engine, "node-cuda")
    finally:
        stage_wheels(cpu=False)
    build_s = round(time.monotonic() - t0, 1)
    for name, mb in sizes.items():
        log(f"image daa-prime-{name}: {mb:,.1f} MB")
    result: dict[str, Any] = {}
    if not args.no_smoke:
        sys.path.insert(0, str(ROOT))
        from scripts.images_smoke import smoke

        result = smoke(engine, args.timeout, args.gpu)
        for key, value in result.items():
            log(f"smoke {key}: {value}")
    runner_name = ("docker run --network host" if engine == "docker"
                   else "buildah run --isolation chroot")
    print(json.dumps({
        "engine": version, "runner": runner_name, "base": base, "torch_cpu": wheel or "index",
        "images": sizes, "build_s": build_s,
        "smoke": {"rounds_committed": result.get("rounds_committed", 0),
                  "page_ok": result.get("page_ok", False),
                  **{k: v for k, v in result.items() if k not in ("rounds_committed",
                                                                   "page_ok")}}},
        sort_keys=True), flush=True)
    ok = args.no_smoke or (result["rounds_committed"] >= 2 and result["page_ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
