"""A real S3 API server for local runs and tests: s3proxy (Maven Central jar) on its filesystem backend.

`make jars` fetches `org.gaul:s3proxy` (dev/s3/pom.xml) into .cache/s3/s3proxy.jar; this module runs it
with `jclouds.provider=filesystem` on a given port, with a fixed local identity and credential.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from devtools import daemon
from devtools.kafka import REPO_ROOT
from shared.errors import HifiError

S3PROXY_JAR = REPO_ROOT / ".cache" / "s3" / "s3proxy.jar"
S3_POM = REPO_ROOT / "dev" / "s3" / "pom.xml"
# The local server's identity: s3proxy checks signatures against these (never used outside this machine).
LOCAL_ACCESS_KEY = "hifi-local"
LOCAL_SECRET_KEY = "hifi-local-secret"


class S3LaunchError(HifiError):
    """The local s3proxy could not be fetched, started or stopped."""


@dataclass
class LocalS3:
    port: int = 9000
    data_dir: Path = REPO_ROOT / ".cache" / "s3"
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / f"s3proxy-{self.port}.pid"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / f"blobs-{self.port}"

    def answering(self) -> bool:
        """Any HTTP answer on the port (s3proxy refuses an unsigned request with 403)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
            urllib.request.urlopen(self.endpoint, timeout=1.0).close()
        except urllib.error.HTTPError:
            return True
        except (OSError, urllib.error.URLError):
            return False
        return True

    def fetch(self) -> None:
        """The jar, from Maven Central through Maven (the Makefile's `jars` target does the same)."""
        if S3PROXY_JAR.exists():
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise S3LaunchError("s3proxy.jar is missing and Maven is not installed (dev/system-deps.sh)")
        cmd = [mvn, "-q", "-B", "-f", str(S3_POM), "dependency:copy", f"-DoutputDirectory={S3PROXY_JAR.parent}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not S3PROXY_JAR.exists():
            raise S3LaunchError(f"could not fetch s3proxy: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def ensure(self, timeout: float = 60.0) -> bool:
        """Return True if this call started a server (and so `stop` should stop it)."""
        if self.answering():
            return False
        self.fetch()
        java = shutil.which("java")
        if java is None:
            raise S3LaunchError("java is not installed (dev/system-deps.sh installs it)")
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        props = self.data_dir / f"s3proxy-{self.port}.properties"
        props.write_text(
            "\n".join(
                [
                    f"s3proxy.endpoint=http://127.0.0.1:{self.port}",
                    "s3proxy.authorization=aws-v2-or-v4",
                    f"s3proxy.identity={LOCAL_ACCESS_KEY}",
                    f"s3proxy.credential={LOCAL_SECRET_KEY}",
                    "jclouds.provider=filesystem",
                    f"jclouds.filesystem.basedir={self.blob_dir}",
                    "",
                ]
            )
        )
        argv = [java, "-Xmx256m", "-jar", str(S3PROXY_JAR), "--properties", str(props)]
        self.process = daemon.spawn(argv, self.data_dir / f"s3proxy-{self.port}.log", self.pid_file)
        if daemon.await_answer(self.process, self.answering, timeout, 0.1):
            return True
        raise S3LaunchError(f"s3proxy did not answer on port {self.port}; see {self.data_dir}/s3proxy-{self.port}.log")

    def create_bucket(self, name: str) -> None:
        """On the filesystem backend a bucket is a directory under the server's base dir."""
        (self.blob_dir / name).mkdir(parents=True, exist_ok=True)

    def stop(self) -> None:
        """Stop the server this project started (found by its pid file); never one it found running."""
        daemon.stop(self.process, self.pid_file)
        self.process = None


def start_for_archive(config_path: str) -> LocalS3 | None:
    """For `hifi up`: the config's first s3_archive sink on a local endpoint gets a local s3proxy (its bucket
    created, the local credentials exported to the services unless set). Returns the server this started."""
    from shared.config import HifiConfig

    config = HifiConfig.load(config_path)
    archives = config.archive_sinks()
    if not archives:
        return None
    options = config.sinks[archives[0]].options
    endpoint = urlparse(options.get("endpoint") or "")
    if endpoint.hostname not in ("127.0.0.1", "localhost") or endpoint.port is None:
        return None
    server = LocalS3(port=endpoint.port)
    started = server.ensure()
    server.create_bucket(options["bucket"])
    os.environ.setdefault(options.get("access_key_env", "HIFI_ARCHIVE_ACCESS_KEY_ID"), LOCAL_ACCESS_KEY)
    os.environ.setdefault(options.get("secret_key_env", "HIFI_ARCHIVE_SECRET_ACCESS_KEY"), LOCAL_SECRET_KEY)
    print(f"s3: {'started' if started else 'using the one'} at {server.endpoint} (bucket {options['bucket']})")
    return server if started else None
