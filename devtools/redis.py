"""Redis for local runs and tests: use the one answering on the URL, else start `redis-server`."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from devtools import daemon
from devtools.kafka import REPO_ROOT
from shared.errors import HifiError


class RedisLaunchError(HifiError):
    """No Redis answers and none could be started."""


def _ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class LocalRedis:
    url: str = "redis://127.0.0.1:6379/0"
    data_dir: Path = REPO_ROOT / ".cache" / "redis"
    persistent: bool = False  # append-only file, so a killed server restarts with its data
    process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlparse(self.url).port or 6379

    @property
    def pid_file(self) -> Path:
        return self.data_dir / f"redis-{self.port}.pid"

    def answering(self) -> bool:
        return _ping(self.host, self.port)

    def ensure(self, timeout: float = 10.0) -> bool:
        """Return True if this call started a server (and so `stop` should stop it)."""
        if self.answering():
            return False
        if self.host not in ("127.0.0.1", "localhost"):
            raise RedisLaunchError(f"no Redis answers at {self.url}, and it is not local to start")
        server = shutil.which("redis-server")
        if server is None:
            raise RedisLaunchError("no Redis answers and redis-server is not installed (apt-get install redis-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            server,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--appendfsync",
            "always",
            "--appenddirname",
            f"aof-{self.port}",
            "--dbfilename",
            f"dump-{self.port}.rdb",
        ]
        self.process = daemon.spawn(argv, self.data_dir / f"redis-{self.port}.log", self.pid_file)
        if daemon.await_answer(self.process, self.answering, timeout, 0.05):
            return True
        raise RedisLaunchError(f"redis-server did not answer on port {self.port}; see {self.data_dir}")

    def kill(self) -> None:
        """kill -9, for chaos scenarios."""
        daemon.stop(self.process, self.pid_file, signal.SIGKILL)
        self.process = None
        while self.answering():
            time.sleep(0.05)

    def wipe_data(self) -> None:
        shutil.rmtree(self.data_dir / f"aof-{self.port}", ignore_errors=True)
        (self.data_dir / f"dump-{self.port}.rdb").unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop the server this project started (found by its pid file); never a Redis it found running."""
        daemon.stop(self.process, self.pid_file)
        self.process = None
