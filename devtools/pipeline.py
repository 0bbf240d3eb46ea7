"""Every service as its own OS process, as in production: used by `hifi up`, tests, chaos and bench."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from shared import pipeline
from shared.config import HifiConfig, Settings
from shared.stage import EXIT_INSTANCE_ID_TAKEN


@dataclass(frozen=True)
class RestartPolicy:
    """How the supervisor restarts a worker that died, as Kubernetes restarts a crashed container: at once
    the first time, then with doubled, jittered delays up to `ceiling_s`. Crashes count while they are
    consecutive: a worker that stayed up `reset_after_s` starts over. After `max_consecutive` restarts in a
    row it gives up (a crash loop is a bug to see, not to hide)."""

    first_delay_s: float = 0.0
    backoff_s: float = 1.0
    ceiling_s: float = 30.0
    reset_after_s: float = 600.0  # Kubernetes resets its CrashLoopBackOff after ten minutes up
    max_consecutive: int = 10

    def after_exit(self, crashes: int, uptime_s: float, code: int | None = None) -> tuple[int, float | None]:
        """A worker that had `crashes` consecutive crashes died after `uptime_s` with exit `code`: its new
        count, and the delay before its restart (None: give up)."""
        crashes = 1 if uptime_s >= self.reset_after_s else crashes + 1
        if code == EXIT_INSTANCE_ID_TAKEN:
            return crashes, None  # another live process holds its name: a restart would only displace it again
        if crashes > self.max_consecutive:
            return crashes, None
        if crashes == 1:
            return crashes, self.first_delay_s
        return crashes, min(self.ceiling_s, self.backoff_s * 2 ** (crashes - 2) * random.uniform(0.8, 1.2))


@dataclass
class ServiceProcess:
    name: str
    sink: str | None
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    terminating: bool = False
    env: dict[str, str] = field(default_factory=dict)  # this worker's own additions (e.g. an injected fault)
    restarts: int = 0  # by the supervisor
    crashes: int = 0  # consecutive: deaths with less than the policy's `reset_after_s` up in between
    started_at: float = 0.0  # monotonic
    last_exit: int | None = None  # the return code of the process the supervisor replaced (or gave up on) last
    restarted_wall_ms: float = 0.0  # when the supervisor last started it (wall clock, for chaos reports)
    gave_up: bool = False  # crashed `max_consecutive` times in a row: left down

    @property
    def label(self) -> str:
        return pipeline.stage(self.name).label(self.sink)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@dataclass
class PipelineProcesses:
    settings: Settings
    log_dir: Path
    port_base: int = 8080
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    auditor: bool = False  # the auditor injects canaries, which tests counting exact deliveries do not want
    supervise: bool = False  # restart a worker that exits without being stopped (`hifi up`, chaos); tests opt in
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()  # the supervisor thread and the caller both start processes
        self._closing = threading.Event()
        self._supervisor: threading.Thread | None = None
        config = HifiConfig.load(self.settings.config_path)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        sinks = list(config.sinks)
        specs = [*pipeline.EVENT_PATH, *([pipeline.AUDITOR] if self.auditor else []), pipeline.SENDER]
        for spec in specs:
            for sink in sinks if spec.per_sink else [None]:
                label = spec.label(sink)
                port = spec.local_port(self.port_base, sinks, sink)
                self.services[label] = ServiceProcess(spec.name, sink, port, self.log_dir / f"{label}.log")

    @property
    def collector_url(self) -> str:
        return self.services[pipeline.COLLECTOR.name].url("/v1/events")

    def data_dir(self, label: str) -> Path:
        """Where worker `label` keeps its RocksDB stores: its own, as each pod has its own volume, and the
        same after a restart. The first worker of a service uses the configured directory; extra workers
        (`add_worker`) get `workers/<label>` under it, since two processes cannot open one store (LOCK)."""
        base = Path(self.settings.data_dir)
        return base if "#" not in label else base / "workers" / label

    @staticmethod
    def worker_id(label: str) -> str:
        """The worker's stable name, its consumers' `group_instance_id`: `enricher`, `enricher-2`, `sender.hook`."""
        return label.replace("#", "-")

    def start(self, label: str) -> None:
        """Start (or restart by hand) a worker; supervision resumes for it, with a fresh crash count."""
        with self._lock:
            svc = self.services[label]
            svc.gave_up, svc.crashes = False, 0
            self._start(label)

    def _start(self, label: str) -> None:
        svc = self.services[label]
        if svc.process is not None and svc.process.poll() is None:
            return
        svc.terminating = False
        svc.started_at = time.monotonic()
        env = {
            **os.environ,
            **self.settings.as_env(),
            "HIFI_WORKER_ID": self.worker_id(label),
            "HIFI_DATA_DIR": str(self.data_dir(label)),
            "HIFI_WEB_PORT": str(svc.port),
            "PYTHONUNBUFFERED": "1",
            **svc.env,
        }
        cmd = [sys.executable, "-m", "services.cli", "run", svc.name] + (["--sink", svc.sink] if svc.sink else [])
        with open(svc.log_path, "ab") as log:
            svc.process = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def add_worker(self, label: str, env: dict[str, str] | None = None) -> str:
        """One more process in the same consumer group as `label` (scale out), with its own data
        directory and `env` added to its environment; returns its label."""
        base = self.services[label]
        n = sum(1 for other in self.services if other.split("#")[0] == label) + 1
        extra = f"{label}#{n}"
        port = self.port_base + 30 + len(self.services)
        self.services[extra] = ServiceProcess(
            base.name, base.sink, port, self.log_dir / f"{extra}.log", env=dict(env or {})
        )
        self.start(extra)
        return extra

    def group(self, label: str) -> str:
        """The consumer group of worker `label`'s service (as `create_app` names it)."""
        from shared.topics import Topics

        svc = self.services[label]
        return Topics(self.settings.namespace).group(pipeline.stage(svc.name).group(svc.sink))

    def remove_worker(self, label: str, timeout: float = 30.0) -> int | None:
        """Scale in: stop worker `label` for good and take its static membership out of its group, so its
        partitions move now instead of after its session timeout (a stateful worker keeps them on SIGTERM)."""
        import asyncio

        from shared.membership import MemberRemovalFailed, remove_static_members

        code = self.stop(label, timeout)
        try:
            asyncio.run(remove_static_members(self.settings.broker, self.group(label), [self.worker_id(label)]))
        except MemberRemovalFailed:
            pass  # it left by itself (a stateless stage leaves after its drain)
        return code

    def start_all(self) -> None:
        for label in self.services:
            self.start(label)
        if self.supervise and self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, name="hifi-supervisor", daemon=True)
            self._supervisor.start()

    def _supervise(self) -> None:
        """Restart every worker that exited without being stopped (`stop`, SIGTERM through `signal`)."""
        due: dict[str, float] = {}  # label -> monotonic time of its planned restart
        while not self._closing.wait(0.05):
            now = time.monotonic()
            with self._lock:
                for label, svc in list(self.services.items()):
                    proc = svc.process
                    if proc is None or proc.poll() is None or svc.terminating or svc.gave_up:
                        due.pop(label, None)
                        continue
                    if label not in due:
                        svc.crashes, delay = self.restart_policy.after_exit(
                            svc.crashes, now - svc.started_at, proc.returncode
                        )
                        if delay is None:
                            svc.gave_up, svc.last_exit = True, proc.returncode
                            continue
                        due[label] = now + delay
                    if now >= due[label]:
                        del due[label]
                        svc.last_exit = proc.returncode
                        self._start(label)
                        svc.restarted_wall_ms = time.time() * 1000
                        svc.restarts += 1

    def restarts(self) -> str:
        """For the live line: which workers the supervisor restarted, and how the last one had exited."""
        shown = [
            f"{label} x{svc.restarts} (exit {svc.last_exit})"
            + (f" GAVE UP after {svc.crashes} crashes in a row" if svc.gave_up else "")
            for label, svc in self.services.items()
            if svc.restarts or svc.gave_up
        ]
        return "restarts " + ", ".join(shown) if shown else ""

    def ready(self, label: str) -> bool:
        svc = self.services[label]
        try:
            with urllib.request.urlopen(svc.url("/ready"), timeout=1.0) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 90.0, labels: list[str] | None = None) -> float:
        started = time.monotonic()
        waiting = list(labels or self.services)
        while waiting:
            for label in list(waiting):
                svc = self.services[label]
                exited = svc.process is not None and svc.process.poll() is not None
                if exited and (not self.supervise or svc.gave_up or svc.terminating):
                    raise RuntimeError(f"{label} exited with {svc.process.returncode}:\n{self.tail(label)}")
                if self.ready(label):
                    waiting.remove(label)
            if time.monotonic() - started > timeout:
                raise TimeoutError(
                    f"not ready after {timeout:.0f}s: {waiting}\n" + "\n".join(self.tail(w) for w in waiting)
                )
            time.sleep(0.2)
        return time.monotonic() - started

    def signal(self, label: str, sig: int) -> None:
        svc = self.services[label]
        with self._lock:  # the supervisor restarts under it: the process signalled is the one it will not replace
            svc.terminating = svc.terminating or sig == signal.SIGTERM  # before the exit the supervisor would see
            if svc.process is not None and svc.process.poll() is None:
                os.kill(svc.process.pid, sig)

    def stop(self, label: str, timeout: float = 30.0) -> int | None:
        svc = self.services[label]
        with self._lock:  # marked before the check: a worker that crashed just now is not restarted after this
            proc = svc.process
            if proc is None:
                return None
            asked = svc.terminating
            svc.terminating = True
            if proc.poll() is None and not asked:  # a second SIGTERM makes the worker skip its drain
                proc.send_signal(signal.SIGTERM)
        if proc.poll() is None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self, label: str) -> None:
        """kill -9: no drain, no commit, no leaving the group. Under supervision it is a crash: restarted."""
        svc = self.services[label]
        if svc.process is not None and svc.process.poll() is None:
            svc.process.kill()
            svc.process.wait()

    def stop_all(self, timeout: float = 30.0) -> dict[str, int | None]:
        self._closing.set()
        if self._supervisor is not None:
            self._supervisor.join()
        # Front to back, so each stage can drain what the previous one passed on.
        for label in self.services:
            self.signal(label, signal.SIGTERM)
        return {label: self.stop(label, timeout) for label in self.services}

    def stats(self) -> dict[str, object]:
        """Every service's /stats, for status lines and for test failure reports."""
        out: dict[str, object] = {}
        for label, svc in self.services.items():
            try:
                with urllib.request.urlopen(svc.url("/stats"), timeout=1.0) as resp:
                    out[label] = json.loads(resp.read())
            except OSError as exc:
                out[label] = f"unreachable: {exc}"
        return out

    def tail(self, label: str, lines: int = 30) -> str:
        path = self.services[label].log_path
        if not path.exists():
            return f"--- {label}: no log"
        return f"--- {label} ({path}):\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
