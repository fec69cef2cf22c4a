"""Run a command inside a private network namespace (docs/pitfalls.md): loopback plus one veth pair
with 10.77.0.1/24, so WebRTC stacks find a non-loopback host candidate while every packet
stays inside the namespace. Needs root (unshare -n).

`NatLab` builds a small internet of named namespaces with NAT routers for bench.nat."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
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


# -- a small internet with NATs, from named namespaces (bench.nat, tests/test_nat.py) -------
PUBLIC_IP = "10.200.0.1"  # the "public" namespace: the server and the TURN server
NAT_FLAGS = {"cone": [], "symmetric": ["--random-fully"]}  # iptables MASQUERADE per NAT kind


def nat_available() -> str | None:
    """None when bench.nat's topology can be built here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and iptables)"
    for tool in ("ip", "iptables", "turnserver"):
        if shutil.which(tool) is None:
            return (f"{tool} is not installed (./run.sh setup installs coturn and iptables as "
                    f"root)")
    return None


def _sh(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip() or res.returncode}")


class NatLab:
    """Named namespaces: `pub` (PUBLIC_IP on its loopback, routes between the routers),
    and per home i a router `r{i}` (WAN 10.201.i.2, NAT with iptables MASQUERADE, cone or
    symmetric) in front of a home `h{i}` (10.10.i.2). Homes reach only the public namespace
    through their router; no route leads from one home to another's private address. Every
    address is private and lives in these namespaces; `destroy` removes them all."""

    def __init__(self, tag: str, kinds: list[str]) -> None:
        self.tag, self.kinds = tag, kinds
        self.pub = f"daa{tag}pub"
        self.made: list[str] = []

    def router(self, i: int) -> str:
        return f"daa{self.tag}r{i}"

    def home(self, i: int) -> str:
        return f"daa{self.tag}h{i}"

    def wan_ip(self, i: int) -> str:
        return f"10.201.{i}.2"

    def _ns(self, name: str) -> None:
        _sh("ip", "netns", "add", name)
        self.made.append(name)
        _sh("ip", "-n", name, "link", "set", "lo", "up")

    def _link(self, a: str, a_if: str, b: str, b_if: str) -> None:
        _sh("ip", "link", "add", f"{a_if}{self.tag}", "type", "veth", "peer", "name",
            f"{b_if}{self.tag}")
        for ns, dev, name in ((a, f"{a_if}{self.tag}", a_if), (b, f"{b_if}{self.tag}", b_if)):
            _sh("ip", "link", "set", dev, "netns", ns)
            _sh("ip", "-n", ns, "link", "set", dev, "name", name)
            _sh("ip", "-n", ns, "link", "set", name, "up")

    def build(self) -> None:
        self._ns(self.pub)
        _sh("ip", "-n", self.pub, "addr", "add", f"{PUBLIC_IP}/32", "dev", "lo")
        _sh("ip", "netns", "exec", self.pub, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # as on the internet, a packet for a private address nobody routes is lost, not
        # refused: the default route leads to a namespace that drops what is not its own
        # (without one, coturn's send to a peer's host candidate fails with ENETUNREACH and
        # coturn closes that allocation)
        sink = f"daa{self.tag}void"
        self._ns(sink)
        self._link(self.pub, "void", sink, "in")
        _sh("ip", "-n", self.pub, "addr", "add", "10.199.0.1/30", "dev", "void")
        _sh("ip", "-n", sink, "addr", "add", "10.199.0.2/30", "dev", "in")
        _sh("ip", "-n", self.pub, "route", "add", "default", "via", "10.199.0.2")
        for i, kind in enumerate(self.kinds):
            r, h = self.router(i), self.home(i)
            self._ns(r)
            self._ns(h)
            self._link(self.pub, f"p{i}", r, "wan")
            _sh("ip", "-n", self.pub, "addr", "add", f"10.201.{i}.1/24", "dev", f"p{i}")
            _sh("ip", "-n", r, "addr", "add", f"{self.wan_ip(i)}/24", "dev", "wan")
            _sh("ip", "-n", r, "route", "add", "default", "via", f"10.201.{i}.1")
            self._link(r, "lan", h, "eth0")
            _sh("ip", "-n", r, "addr", "add", f"10.10.{i}.1/24", "dev", "lan")
            _sh("ip", "-n", h, "addr", "add", f"10.10.{i}.2/24", "dev", "eth0")
            _sh("ip", "-n", h, "route", "add", "default", "via", f"10.10.{i}.1")
            _sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            _sh("ip", "netns", "exec", r, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o",
                "wan", "-j", "MASQUERADE", *NAT_FLAGS[kind])
            # a home router's firewall: nothing unsolicited comes in. Dropping it before
            # conntrack confirms it also keeps a peer's early probe from taking the port an
            # outgoing mapping would reuse (the mapping stays endpoint-independent)
            for chain in ("INPUT", "FORWARD"):
                _sh("ip", "netns", "exec", r, "iptables", "-A", chain, "-i", "wan", "-m",
                    "conntrack", "--ctstate", "NEW,INVALID", "-j", "DROP")

    def destroy(self) -> None:
        for name in reversed(self.made):
            for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                      text=True).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made.clear()
