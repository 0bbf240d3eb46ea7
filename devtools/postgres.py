"""PostgreSQL for local runs and tests: use the one answering on the port, else start Debian's `postgres`.

initdb and postgres refuse to run as root, so as root they run as the `postgres` user (runuser) on a data
dir that user owns. The cluster trusts local connections (dev only): the DSN carries no password.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from devtools.kafka import REPO_ROOT
from shared.config import SinkConfig
from shared.errors import HifiError

DEFAULT_PORT = 5432
DATABASE = "hifi"
USER = "postgres"


class PostgresLaunchError(HifiError):
    """No PostgreSQL answers and none could be started."""


def _bin_dir() -> Path:
    """Where initdb and postgres live: Debian's versioned dir (newest first), else PATH."""

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.split("/")[-2]))

    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.path.exists(os.path.join(found, "initdb")):
            return Path(found)
    initdb = shutil.which("initdb")
    if initdb is None:
        raise PostgresLaunchError("PostgreSQL is not installed (apt-get install postgresql)")
    return Path(os.path.realpath(initdb)).parent


def _answering(host: str, port: int) -> bool:
    """True if a PostgreSQL server answers an SSLRequest (it replies 'S' or 'N') on the port."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall((8).to_bytes(4, "big") + (80877103).to_bytes(4, "big"))
            return sock.recv(1) in (b"S", b"N")
    except OSError:
        return False


def _enterable_by_all(path: Path) -> bool:
    """Every existing directory on the way to `path` lets others pass (o+x)."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents] if p.exists())


@dataclass
class LocalPostgres:
    port: int = DEFAULT_PORT
    data_root: Path = REPO_ROOT / ".cache" / "postgres"
    host: str = "127.0.0.1"

    @property
    def root(self) -> Path:
        """`data_root`, unless the `postgres` user (we run as root) could not enter it: a checkout under a
        private directory (mktemp -d is 0700). Then a directory of this checkout's own under the system's
        temp dir, which every user can enter."""
        if os.geteuid() != 0 or _enterable_by_all(self.data_root):
            return self.data_root
        tag = hashlib.sha1(str(self.data_root.resolve()).encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"hifi-postgres-{tag}"

    @property
    def data_dir(self) -> Path:
        return self.root / f"pg-{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "postmaster.pid"

    @property
    def log_file(self) -> Path:
        return self.root / f"pg-{self.port}.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://{USER}@{self.host}:{self.port}/{DATABASE}"

    def answering(self) -> bool:
        return _answering(self.host, self.port)

    def _as_owner(self, argv: list[str]) -> list[str]:
        """As root, run as the `postgres` user (initdb/postgres refuse root); otherwise as ourselves."""
        if os.geteuid() == 0:
            return ["runuser", "-u", USER, "--", *argv]
        return argv

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam(USER)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _init(self, bin_dir: Path) -> None:
        """initdb once per data dir; a half-written one (no PG_VERSION) is redone."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the postgres user must reach its data dir under ours
        self.data_dir.mkdir(mode=0o700)
        self._chown(self.data_dir)
        result = subprocess.run(
            self._as_owner(
                [str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", USER, "--auth=trust", "-E", "UTF8"]
            ),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise PostgresLaunchError(f"initdb failed for {self.data_dir}: {result.stderr[-2000:]}")

    def ensure(self, timeout: float = 30.0) -> bool:
        """Return True if this call started a server (and so `stop` should stop it)."""
        if self.answering():
            return False
        bin_dir = _bin_dir()
        self._init(bin_dir)
        self.log_file.touch()
        self._chown(self.log_file)
        # -k: the unix socket in the data dir, not /var/run/postgresql (which may be missing or root's)
        argv = [
            str(bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-o",
            f"-p {self.port} -h {self.host} -k {self.data_dir} -c fsync=on -c synchronous_commit=on",
            "start",
        ]
        deadline = time.monotonic() + timeout
        while True:
            result = subprocess.run(self._as_owner(argv), capture_output=True, text=True)
            if result.returncode == 0:
                break
            # After a kill -9 the old backends hold the lock file for a moment, until they notice.
            if time.monotonic() > deadline:
                raise PostgresLaunchError(
                    f"pg_ctl start failed on port {self.port}: {result.stderr[-1000:]}; see {self.log_file}"
                )
            time.sleep(0.2)
        while time.monotonic() < deadline:
            if self.answering() and self._create_database(bin_dir):
                return True
            time.sleep(0.1)
        raise PostgresLaunchError(f"postgres did not answer on port {self.port}; see {self.log_file}")

    def _create_database(self, bin_dir: Path) -> bool:
        """Create the `hifi` database unless it exists; False while the server still starts up."""
        psql = [str(bin_dir / "psql"), "-h", self.host, "-p", str(self.port), "-U", USER, "-d", "postgres", "-tAc"]
        probe = subprocess.run([*psql, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"], capture_output=True)
        if probe.returncode != 0:
            return False
        if probe.stdout.strip() != b"1":
            subprocess.run([*psql, f"CREATE DATABASE {DATABASE}"], capture_output=True, check=True)
        return True

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """kill -9 the postmaster, for chaos scenarios; the next `ensure` recovers from the WAL."""
        pid = self.pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while self.answering():
            time.sleep(0.05)
        if pid is not None:
            for _ in range(100):  # until the postmaster is gone (or a zombie: a container's init may not reap)
                try:
                    if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
                        break
                except (OSError, IndexError):
                    break
                time.sleep(0.05)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop (fast: open connections are cut) and start again on the same data."""
        self.stop()
        self.ensure(timeout)

    def stop(self) -> None:
        """Stop the server this project started (its data dir exists); never one it found running elsewhere."""
        if not (self.data_dir / "PG_VERSION").exists() or self.pid() is None:
            return
        subprocess.run(
            self._as_owner([str(_bin_dir() / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"]),
            capture_output=True,
        )

    def wipe(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.log_file.unlink(missing_ok=True)


def local_postgres_for(sink: SinkConfig) -> LocalPostgres | None:
    """The local server a Postgres sink needs under `hifi up`: the one its DSN points at (on this machine),
    or, with `dsn_env` unset, a new one on 5432 whose DSN is put in that variable for the services."""
    if sink.type != "postgres":
        return None
    dsn = os.environ.get(sink.options["dsn_env"])
    if not dsn:
        server = LocalPostgres()
        os.environ[sink.options["dsn_env"]] = server.dsn  # inherited by the services started next
        return server
    url = urlparse(dsn)
    if url.hostname not in ("127.0.0.1", "localhost"):
        return None  # a remote database is not ours to start
    return LocalPostgres(port=url.port or DEFAULT_PORT)
