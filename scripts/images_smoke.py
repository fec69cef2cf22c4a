"""The smoke test of `./run.sh images` (scripts/images.py): the built images' own commands,
on 127.0.0.1 only.

The server image's container serves the page and /api/run; two node-cpu containers join it;
at least 2 rounds must commit; the images' HEALTHCHECK commands must pass in the running
containers; a headless Chromium (Playwright) opens the served page and must load Pyodide's and
ONNX Runtime Web's wasm from the container and take a train step (`page_ok`); the GPU check's
dry mode runs in the node-cpu image, and the CUDA image's torch reports its CUDA build.
Runner: `docker run --network host` with Docker, else `buildah run --isolation chroot`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def out(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, text=True, capture_output=True).stdout.strip()


def image_config(engine: str, name: str) -> dict[str, Any]:
    tag = f"daa-prime-{name}"
    if engine == "docker":
        cfg: dict[str, Any] = json.loads(out("docker", "image", "inspect", tag))[0]["Config"]
        return cfg
    doc = json.loads(out("buildah", "inspect", "--type", "image", tag))
    docker_cfg: dict[str, Any] = doc["Docker"]["config"]
    return docker_cfg


class Runner:
    """Runs an image's command (or another) as the image's user, on the host network."""

    def __init__(self, engine: str, work: Path) -> None:
        self.engine, self.work = engine, work
        self.name = ("docker run --network host" if engine == "docker"
                     else "buildah run --isolation chroot")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.containers: list[str] = []

    def start(self, image: str, label: str, cmd: list[str] | None = None,
              env: dict[str, str] | None = None, volume: str | None = None) -> str:
        env = env or {}
        if self.engine == "docker":
            ctr = f"daa-smoke-{label}-{os.getpid()}"
            argv = ["docker", "run", "--rm", "--name", ctr, "--network", "host",
                    *(f"--env={k}={v}" for k, v in env.items()),
                    *(["-v", volume] if volume else []), f"daa-prime-{image}", *(cmd or [])]
        else:
            ctr = out("buildah", "from", "--name", f"daa-smoke-{label}-{os.getpid()}",
                      f"daa-prime-{image}")
            if cmd is None:  # the image's CMD, as its config says
                cmd = image_config(self.engine, image)["Cmd"]
            argv = ["buildah", "run", "--isolation", "chroot",
                    *(f"--env={k}={v}" for k, v in env.items()),
                    *(["-v", volume] if volume else []), ctr, "--", *cmd]
        self.containers.append(ctr)
        logf = open(self.work / f"{label}.log", "wb")  # noqa: SIM115 (lives with the process)
        self.procs.append(subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
        return ctr

    def once(self, image: str, cmd: list[str], timeout: float = 300) -> tuple[int, str]:
        """Run `cmd` in a fresh container of `image`; (exit code, stdout)."""
        if self.engine == "docker":
            argv = ["docker", "run", "--rm", "--network", "host", f"daa-prime-{image}", *cmd]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
            return done.returncode, done.stdout
        ctr = out("buildah", "from", f"daa-prime-{image}")
        try:
            done = subprocess.run(["buildah", "run", "--isolation", "chroot", ctr, "--", *cmd],
                                  capture_output=True, text=True, timeout=timeout)
            return done.returncode, done.stdout
        finally:
            subprocess.run(["buildah", "rm", ctr], capture_output=True)

    def exec(self, ctr: str, cmd: list[str], env: dict[str, str] | None = None) -> int:
        env = env or {}
        if self.engine == "docker":
            argv = ["docker", "exec", *(f"--env={k}={v}" for k, v in env.items()), ctr, *cmd]
        else:
            argv = ["buildah", "run", "--isolation", "chroot",
                    *(f"--env={k}={v}" for k, v in env.items()), ctr, "--", *cmd]
        return subprocess.run(argv, capture_output=True, timeout=60).returncode

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for ctr in self.containers:
            rm = ["docker", "rm", "-f", ctr] if self.engine == "docker" else ["buildah", "rm",
                                                                             ctr]
            subprocess.run(rm, capture_output=True)


@contextlib.contextmanager
def runner(engine: str) -> Iterator[Runner]:
    with tempfile.TemporaryDirectory(prefix="daa-images-") as d:
        r = Runner(engine, Path(d))
        try:
            yield r
        finally:
            r.close()
            for f in sorted(Path(d).glob("*.log")):  # the containers' output, for a failure
                tail = f.read_text(errors="replace").splitlines()[-5:]
                print(f"--- {f.name} (last lines)\n" + "\n".join(tail), file=sys.stderr)


def smoke(engine: str, timeout_s: float, gpu: bool) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from bench.common import free_port, get_json

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    coord = f"127.0.0.1:{port}"
    res: dict[str, Any] = {"rounds_committed": 0, "page_ok": False}
    with runner(engine) as run:
        data = run.work / "data"
        data.mkdir()
        os.chown(data, 10001, 10001)  # the images' user owns the run's volume
        server = run.start("server", "server", [
            "python", "-m", "server", "--host", "127.0.0.1", "--port", str(port),
            "--data-dir", "/data", "--quorum", "2", "--rounds", "1000", "--inner-steps", "10",
            "--deadline-s", "120"], volume=f"{data}:/data")
        t0 = time.monotonic()
        wait(lambda: get_json(base + "/api/run"), t0, timeout_s, "the server's /api/run")
        res["server_up_s"] = round(time.monotonic() - t0, 1)
        with urllib.request.urlopen(base + "/", timeout=10) as resp:
            res["page_status"] = resp.status
        nodes = [run.start("node-cpu", f"node{i}", env={"DAA_COORDINATOR": coord,
                                                        "DAA_STATE_DIR": f"/home/daa/node{i}"})
                 for i in range(2)]
        wait(lambda: len(get_json(base + "/api/rounds?limit=10")) >= 2, t0, timeout_s,
             "2 committed rounds")
        res["rounds_committed"] = len(get_json(base + "/api/rounds?limit=1000"))
        res["seconds_to_2_rounds"] = round(time.monotonic() - t0, 1)
        res["health"] = {
            "server": run.exec(server, ["python", "/app/docker/healthcheck.py", "server"],
                               {"DAA_PORT": str(port)}) == 0,
            **{f"node{i}": run.exec(ctr, ["python", "/app/docker/healthcheck.py", "node"],
                                    {"DAA_COORDINATOR": coord,
                                     "DAA_STATE_DIR": f"/home/daa/node{i}"}) == 0
               for i, ctr in enumerate(nodes)}}
        res.update(page_check(base + "/"))
        res["rounds_committed"] = len(get_json(base + "/api/rounds?limit=1000"))
        res.update(in_image_checks(run, gpu))
    return res


def in_image_checks(run: Runner, gpu: bool) -> dict[str, Any]:
    """The GPU check's dry mode in the CPU node image; the CUDA image's torch build."""
    res: dict[str, Any] = {}
    rc, stdout = run.once("node-cpu", ["scripts/gpu_check.sh", "--dry"])
    lines = stdout.strip().splitlines()
    res["gpu_check_dry_in_node_cpu"] = rc == 0 and bool(lines) and json.loads(lines[-1])["dry"]
    if gpu:
        code = "import torch; print(torch.__version__, 'CUDA', torch.version.cuda)"
        rc, stdout = run.once("node-cuda", ["python", "-c", code], timeout=120)
        res["node_cuda_torch"] = stdout.strip() if rc == 0 else f"failed (exit {rc})"
    return res


def wait(cond: Any, t0: float, timeout_s: float, what: str) -> None:
    while True:
        with contextlib.suppress(OSError, ValueError):
            if cond():
                return
        if time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"smoke test: no {what} after {timeout_s:.0f} s")
        time.sleep(1.0)


def page_check(url: str) -> dict[str, Any]:
    """Open the served page in headless Chromium: Pyodide's and ONNX Runtime Web's wasm must
    load from the server (HTTP 200) and the tab must take a train step with them."""
    chromium = Path(os.environ.get("DAA_CHROMIUM", "/usr/bin/chromium"))
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {"page_ok": False, "page_note": "playwright is not installed"}
    if not chromium.exists():
        return {"page_ok": False, "page_note": f"no Chromium at {chromium}"}
    loaded: dict[str, int] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.on("response", lambda r: loaded.__setitem__(r.url.rsplit("/", 1)[-1],
                                                             r.status))
            page.goto(url)
            t0 = time.monotonic()
            page.wait_for_function("() => window.daaNode && window.daaNode.stats.totalSteps >= 1",
                                   timeout=240_000, polling=500)
            steps_s = round(time.monotonic() - t0, 1)
        except Exception as exc:  # a timeout or a page error: reported, not raised
            return {"page_ok": False, "page_note": f"{exc.__class__.__name__}: {exc}"[:300],
                    "page_assets": loaded}
        finally:
            browser.close()
    wasm = {k: v for k, v in loaded.items() if k.endswith(".wasm")}
    pyodide = any(k.startswith("pyodide") and v == 200 for k, v in wasm.items())
    ort = any(k.startswith("ort-wasm") and v == 200 for k, v in wasm.items())
    return {"page_ok": pyodide and ort, "page_wasm": wasm, "page_first_step_s": steps_s}
