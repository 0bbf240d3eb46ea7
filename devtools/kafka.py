"""Real Apache Kafka (KRaft) on this machine, from the official jars on Maven Central.

What Kafka's own scripts do, done from Python: `kafka-storage.sh format` is `kafka.tools.StorageTool`,
`kafka-server-start.sh` is `java -cp 'libs/*' kafka.Kafka server.properties`. One node runs as a
combined broker+controller; three nodes share one cluster id and a static three-voter quorum.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from shared.errors import HifiError

REPO_ROOT = Path(__file__).resolve().parents[1]
POM = REPO_ROOT / "dev" / "kafka" / "pom.xml"
DEFAULT_HOME = REPO_ROOT / ".cache" / "kafka"
KAFKA_VERSION = "4.4.0"

LOG4J2_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <File name="file" fileName="${sys:kafka.logs.dir}/server.log">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka" level="INFO"/>
    <Logger name="org.apache.kafka" level="INFO"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Root level="WARN"><AppenderRef ref="file"/></Root>
  </Loggers>
</Configuration>
"""


class KafkaLaunchError(HifiError):
    """The local broker could not be installed, formatted, started or stopped."""


@dataclass(frozen=True)
class KafkaNode:
    node_id: int
    port: int
    controller_port: int
    data_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "kafka.pid"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass(frozen=True)
class LocalKafka:
    """A single-node or three-node KRaft cluster on loopback.

    Ports: node i listens on `port + i` for clients and `port + 1000 + i` for the controller quorum.
    """

    nodes: int = 1
    port: int = 9092
    home: Path = DEFAULT_HOME
    data_root: Path | None = None
    heap: str = "512m"

    @property
    def libs(self) -> Path:
        return self.home / "libs"

    @property
    def root(self) -> Path:
        return self.data_root or (self.home / f"data-{self.nodes}n-{self.port}")

    @property
    def members(self) -> list[KafkaNode]:
        return [
            KafkaNode(i + 1, self.port + i, self.port + 1000 + i, self.root / f"node-{i + 1}")
            for i in range(self.nodes)
        ]

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.members)

    # -- install ---------------------------------------------------------------------------------

    def ensure_jars(self) -> None:
        """Copy the broker jars from Maven Central once; later starts reuse them."""
        marker = self.libs / f"kafka_2.13-{KAFKA_VERSION}.jar"
        if marker.exists():
            return
        if shutil.which("mvn") is None:
            raise KafkaLaunchError("Maven (mvn) is needed once to fetch the Kafka jars; install it")
        self.libs.mkdir(parents=True, exist_ok=True)
        cmd = ["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", f"-DoutputDirectory={self.libs}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not marker.exists():
            raise KafkaLaunchError(f"fetching Kafka jars failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")

    def _java(self, node: KafkaNode, main: str, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise KafkaLaunchError("Java 17+ is needed to run Kafka; install a JDK")
        return [
            java,
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={node.log_dir}",
            f"-Dlog4j2.configurationFile={node.data_dir / 'log4j2.xml'}",
            "-cp",
            f"{self.libs}/*",
            main,
            *args,
        ]

    def server_properties(self, node: KafkaNode) -> str:
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.members)
        rf = min(3, self.nodes)
        min_isr = 2 if self.nodes >= 3 else 1
        props = {
            "process.roles": "broker,controller",
            "node.id": node.node_id,
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": node.data_dir / "log",
            "num.partitions": 4,
            "default.replication.factor": rf,
            "min.insync.replicas": min_isr,
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": 8,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": min_isr,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": min_isr,
            # Tests and `hifi up` want a consumer group formed at once, not after 3 s.
            "group.initial.rebalance.delay.ms": 0,
            # Lets HIFI_SESSION_TIMEOUT_S go down to 3 s locally (the broker's default floor is 6 s).
            "group.min.session.timeout.ms": 3000,
            # A broker killed -9 leads its partitions (and sits in their ISRs) until the controller fences it:
            # after 9 s of missed heartbeats by default, every acks=all produce to them stalls that long.
            # 3 s keeps a loaded machine's GC pause or stall from fencing a live broker (issue 15: a broker
            # kill's late window <= 3 s).
            "broker.session.timeout.ms": 3000,
            "broker.heartbeat.interval.ms": 500,
            # Every node here is also a controller. When the killed broker is the active controller (the busiest
            # one was, in chaos), the others notice after this long without a metadata fetch answered (2 s by
            # default), elect a new one, and only then begin the dead broker's 3 s session: 4.8 s from the kill
            # to the fence. Pre-vote (KIP-996) keeps a slow answer from deposing a live leader.
            "controller.quorum.fetch.timeout.ms": 1000,
            "auto.create.topics.enable": "true",
            "log.retention.hours": 24,
            "log.segment.bytes": 64 * 1024 * 1024,
            "num.network.threads": 2,
            "num.io.threads": 4,
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _format(self) -> None:
        """Write configs and format storage once per data dir; all nodes share one cluster id."""
        cluster_id_file = self.root / "cluster.id"
        if cluster_id_file.exists():
            cluster_id = cluster_id_file.read_text().strip()
        else:
            # Kafka cluster ids are base64url UUIDs, which StorageTool random-uuid would print.
            import base64

            # Like Kafka's own Uuid.randomUuid, never one starting with "-": the tool would read it as an option.
            cluster_id = "-"
            while cluster_id.startswith("-"):
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            self.root.mkdir(parents=True, exist_ok=True)
            cluster_id_file.write_text(cluster_id)
        for node in self.members:
            node.log_dir.mkdir(parents=True, exist_ok=True)
            (node.data_dir / "log4j2.xml").write_text(LOG4J2_XML)
            props = node.data_dir / "server.properties"
            props.write_text(self.server_properties(node))
            if (node.data_dir / "log" / "meta.properties").exists():
                continue
            cmd = self._java(node, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props))
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise KafkaLaunchError(f"formatting node {node.node_id} failed: {done.stdout}{done.stderr}")

    # -- run ---------------------------------------------------------------------------------------

    def running_pids(self) -> dict[int, int]:
        pids = {}
        for node in self.members:
            pid = _read_pid(node.pid_file)
            if pid is not None:
                pids[node.node_id] = pid
        return pids

    def start(self, timeout: float = 90.0) -> float:
        """Start every node not already running; return the seconds until all answered."""
        started = time.monotonic()
        self.ensure_jars()
        self._format()
        for node in self.members:
            self.start_node(node.node_id, wait=False)
        for node in self.members:
            self.wait_ready(node, timeout - (time.monotonic() - started))
        return time.monotonic() - started

    def start_node(self, node_id: int, wait: bool = True, timeout: float = 60.0) -> None:
        node = self.members[node_id - 1]
        if _read_pid(node.pid_file) is not None:
            return
        props = node.data_dir / "server.properties"
        # Readiness is read from what this launch logs: the log is appended to across restarts.
        server_log = node.log_dir / "server.log"
        (node.data_dir / "server.log.start").write_text(str(server_log.stat().st_size if server_log.exists() else 0))
        out = open(node.log_dir / "stdout.log", "ab")
        proc = subprocess.Popen(
            self._java(node, "kafka.Kafka", str(props)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in `hifi up` must not kill the broker before the services
        )
        out.close()
        node.pid_file.write_text(str(proc.pid))
        if wait:
            self.wait_ready(node, timeout)

    def wait_ready(self, node: KafkaNode, timeout: float) -> None:
        """A broker is ready when it accepts connections and registered with the controller."""
        deadline = time.monotonic() + max(timeout, 1.0)
        while time.monotonic() < deadline:
            if _read_pid(node.pid_file) is None:
                raise KafkaLaunchError(f"kafka node {node.node_id} exited during start-up:\n{self.tail_log(node)}")
            if _port_open(node.port) and _log_says_started(node):
                return
            time.sleep(0.2)
        raise KafkaLaunchError(f"kafka node {node.node_id} not ready in {timeout:.0f}s:\n{self.tail_log(node)}")

    def stop(self, timeout: float = 30.0) -> None:
        for node in self.members:
            self.stop_node(node.node_id, timeout=timeout)

    def stop_node(self, node_id: int, timeout: float = 30.0, sig: int = signal.SIGTERM) -> None:
        node = self.members[node_id - 1]
        pid = _read_pid(node.pid_file)
        if pid is None:
            node.pid_file.unlink(missing_ok=True)
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
        node.pid_file.unlink(missing_ok=True)

    def kill_node(self, node_id: int) -> None:
        """kill -9, for chaos scenarios."""
        self.stop_node(node_id, timeout=0.0, sig=signal.SIGKILL)

    def tail_log(self, node: KafkaNode, lines: int = 40) -> str:
        chunks = []
        for name in ("stdout.log", "server.log"):
            path = node.log_dir / name
            if path.exists():
                chunks.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(chunks)

    def wipe(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and ") Z " not in stat.read_text()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _log_says_started(node: KafkaNode) -> bool:
    log = node.log_dir / "server.log"
    if not log.exists():
        return False
    marker = node.data_dir / "server.log.start"
    start = int(marker.read_text() or 0) if marker.exists() else 0
    with open(log, "rb") as f:
        f.seek(start if start <= log.stat().st_size else 0)  # a log rotated since: read it all
        # KafkaRaftServer logs this once the broker has caught up with the metadata log.
        return b"Kafka Server started" in f.read()
