"""Run a command inside a private network namespace (docs/pitfalls.md): loopback plus one veth pair
with 10.77.0.1/24, so WebRTC stacks find a non-loopback host candidate while every packet
stays inside the namespace. Needs root (unshare -n)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ENV_FLAG = "DAA_PRIME_NETNS"
SETUP = ("ip link set lo up; ip link add v0 type veth peer name v1; "
         "ip addr add 10.77.0.1/24 dev v0; ip link set v0 up; ip link set v1 up; "
         "ip route add default dev v0; exec \"$@\"")


def inside() -> bool:
    return os.environ.get(ENV_FLAG) == "1"


def available() -> str | None:
    """None when private namespaces can be made here, else why not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip (iproute2) is not installed"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n failed: {probe.stderr.strip() or probe.returncode}"
    return None


LOOPBACK_ONLY = "ip link set lo up; exec \"$@\""


def command(module: str, argv: list[str], *, veth: bool = True) -> list[str]:
    """`python -m module argv...` wrapped to run in a fresh private namespace. Without the
    veth pair only loopback exists: WebRTC then finds no usable candidate (ICE fails)."""
    return ["unshare", "-n", "bash", "-c", SETUP if veth else LOOPBACK_ONLY, "bash",
            sys.executable, "-m", module, *argv]


def rerun_inside(module: str, argv: list[str]) -> int:
    """Re-run `python -m module argv...` inside a fresh private namespace; its exit code."""
    env = {**os.environ, ENV_FLAG: "1"}
    return subprocess.run(command(module, argv), env=env).returncode
