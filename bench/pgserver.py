"""A throwaway PostgreSQL server: the test session's (the `postgres` fixture in
tests/conftest.py) and bench.ledger's second backend.

`initdb` into a fresh folder, then the postmaster as a direct child of the caller on a unix
socket in that folder (no TCP port: listen_addresses is empty), fsync off (a throwaway server
needs no durability). As root it runs as the `postgres` user (PostgreSQL refuses root) via
setpriv, which also sets the parent-death signal, so a killed caller cannot leave it behind;
`stop()` shuts it down and removes the folder (the test session's leftover-process check
would report it otherwise). Each user gets a schema of its own (`Server.fresh_url`), so tests
never see each other's rows.

Where PostgreSQL's binaries or psycopg are missing, `find_problem()` says why; the tests'
PostgreSQL cases skip with that message (./run.sh setup installs both as root with apt-get).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

PG_USER = "daa"


def pg_bin() -> Path | None:
    """The folder of initdb and postgres (Debian keeps them off PATH), newest version first."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    for path in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                       key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit()
                       else 0, reverse=True):
        return Path(path).parent
    return None


def find_problem() -> str | None:
    """Why no PostgreSQL server can run here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]'; ./run.sh setup does)"
    if pg_bin() is None:
        return ("PostgreSQL is not installed: no initdb on PATH or in /usr/lib/postgresql/*/bin "
                "(apt-get install postgresql; ./run.sh setup does it as root)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    return None


class Server:
    def __init__(self) -> None:
        binary = pg_bin()
        assert binary is not None
        self.dir = Path(tempfile.mkdtemp(prefix="daa-pg-"))
        self.data = self.dir / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                            "--init-groups", "--pdeathsig=KILL", "--"]
        self.log = self.dir / "postgres.log"
        subprocess.run([*self.as_user, str(binary / "initdb"), "-D", str(self.data), "-U",
                        PG_USER, "--auth=trust", "--no-locale", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, timeout=120, cwd=self.dir)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.as_user, str(binary / "postgres"), "-D", str(self.data), "-k",
                 str(self.dir), "-c", "listen_addresses=", "-c", "fsync=off", "-c",
                 "synchronous_commit=off", "-c", "full_page_writes=off", "-c",
                 "max_connections=40", "-c", "shared_buffers=32MB"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        self.url = f"postgresql:///postgres?host={self.dir}&user={PG_USER}"
        self._ids = itertools.count()
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=5):
                    return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("PostgreSQL did not start: "
                                       + self.log.read_text(errors="replace")[-2000:]) from None
                time.sleep(0.1)

    def fresh_url(self) -> str:
        """A URL whose tables live in a new, empty schema of their own."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._ids)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}".encode())
        return f"{self.url}&options=-csearch_path%3D{name}"

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL after 20 s; then the folder goes."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
