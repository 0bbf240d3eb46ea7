"""Session fixtures: one real Kafka broker (own port, fresh data) and a real Redis for the whole run.

CI and `make test` start both; when run by hand, the fixtures start whatever is not running.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import settings

from devtools.kafka import DEFAULT_HOME, LocalKafka
from devtools.postgres import LocalPostgres
from devtools.redis import LocalRedis
from devtools.s3 import LOCAL_ACCESS_KEY, LOCAL_SECRET_KEY, LocalS3
from shared.config import Settings

# `make fuzz` runs the property tests with many more examples (HYPOTHESIS_PROFILE=fuzz).
settings.register_profile("default", deadline=None)
settings.register_profile("fuzz", deadline=None, max_examples=int(os.environ.get("HIFI_FUZZ_EXAMPLES", "20000")))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

TEST_KAFKA_PORT = int(os.environ.get("HIFI_TEST_KAFKA_PORT", "19092"))
TEST_REDIS_URL = os.environ.get("HIFI_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TEST_POSTGRES_PORT = int(os.environ.get("HIFI_TEST_POSTGRES_PORT", "15432"))
TEST_S3_PORT = int(os.environ.get("HIFI_TEST_S3_PORT", "19594"))
# Under pytest-xdist (`make test` runs the files on several workers) each worker takes its own block of ports.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
# Ports the suite's own brokers hold (clients, then controllers at +1000): test_stale_leader and
# test_kafka_cluster start three-node clusters at 27092 and 29092. All of them sit below the kernel's
# ephemeral range (32768 and up), where an outgoing connection can take a port before a broker binds it.
_RESERVED_PORTS = {
    port + offset for port in (TEST_KAFKA_PORT, 27092, 29092) for offset in (0, 1, 2, 1000, 1001, 1002)
} | {TEST_S3_PORT}


def _port_blocks(start: int, size: int = 20) -> Iterator[int]:
    """Blocks of `size` ports from `start`, skipping any block that holds a broker's port."""
    for base in itertools.count(start, size):
        if not any(base <= port < base + size for port in _RESERVED_PORTS):
            yield base


_ports = _port_blocks(int(os.environ.get("HIFI_TEST_PORT_BASE", "18100")) + 4000 * _WORKER)


# `make test` spreads tests over pytest-xdist workers (--dist loadgroup). Tests that start a three-node
# cluster share one group, so two such clusters (six brokers) never start at once on a two-core runner.
XDIST_GROUPS = {
    "test_kafka_cluster.py": "three-node-cluster",
    "test_stale_leader.py": "three-node-cluster",
    "test_broker_kill.py": "three-node-cluster",
}


# The multi-process suites: whole pipelines of processes, three-node clusters, the bench, a browser.
# `make test` runs them; `make quick` (pytest -m "not slow and not chaos") is the inner loop without them.
SLOW_FILES = {
    "test_bench.py",
    "test_chaos.py",
    "test_dashboard.py",
    "test_kafka_cluster.py",
    "test_stale_leader.py",
    "test_broker_kill.py",
    "test_supervision.py",
    "test_restart_policy.py",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = XDIST_GROUPS.get(item.path.name)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
        if item.path.name in SLOW_FILES or "start_pipeline" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def kafka() -> Iterator[LocalKafka]:
    """`make test` starts this broker before pytest and stops it after; run alone, pytest does both."""
    cluster = LocalKafka(nodes=1, port=TEST_KAFKA_PORT, data_root=DEFAULT_HOME / f"test-{TEST_KAFKA_PORT}")
    started_here = not cluster.running_pids()
    if started_here and "PYTEST_XDIST_WORKER" in os.environ:
        # Each xdist worker runs this fixture: two would race to start one broker, and the first to finish
        # would stop it under the other. dev/test.sh (make test) starts it once before pytest.
        pytest.fail(f"no broker on port {TEST_KAFKA_PORT}: with -n, start it first (dev/test.sh does)", pytrace=False)
    cluster.start()
    yield cluster
    if started_here:
        cluster.stop()


def _session_server(server: Any, what: str) -> Iterator[Any]:
    """Use the server answering, else start it (and stop it after). Under xdist each worker runs this: two
    would race to start one server, so `make test` (dev/test.sh) starts it before pytest."""
    if "PYTEST_XDIST_WORKER" in os.environ and not server.answering():
        pytest.fail(f"no {what}: with -n, start it first (dev/test.sh does)", pytrace=False)
    started = server.ensure()
    yield server
    if started:
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    yield from _session_server(LocalRedis(url=TEST_REDIS_URL), f"Redis at {TEST_REDIS_URL}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres]:
    yield from _session_server(LocalPostgres(port=TEST_POSTGRES_PORT), f"PostgreSQL on port {TEST_POSTGRES_PORT}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3]:
    """A real S3 API (s3proxy, filesystem backend); each test uses its own bucket."""
    yield from _session_server(LocalS3(port=TEST_S3_PORT), f"s3proxy on port {TEST_S3_PORT}")


@pytest.fixture
def bucket(s3_server: LocalS3, namespace: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the test S3, named for the test, and the archive's credentials for it."""
    monkeypatch.setenv("HIFI_ARCHIVE_ACCESS_KEY_ID", LOCAL_ACCESS_KEY)
    monkeypatch.setenv("HIFI_ARCHIVE_SECRET_ACCESS_KEY", LOCAL_SECRET_KEY)
    s3_server.create_bucket(namespace)
    return namespace


@pytest.fixture
async def redis_client(redis_server: LocalRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def namespace() -> str:
    """Each test gets its own topics and consumer groups on the shared broker."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def port_base() -> int:
    return next(_ports)


@pytest.fixture
def settings_for(kafka: LocalKafka, redis_server: LocalRedis, namespace: str, tmp_path: Path):
    def make(config_path: Path, **overrides: object) -> Settings:
        values = dict(
            config_path=str(config_path),
            broker=kafka.bootstrap,
            redis_url=redis_server.url,
            data_dir=str(tmp_path / "data"),
            namespace=namespace,
            partitions=4,
            log_level="warning",
        )
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def start_pipeline(port_base: int, tmp_path: Path):
    """Start every service of a config as its own process; stop them all (SIGTERM) after the test."""
    from devtools.pipeline import PipelineProcesses

    started: list[PipelineProcesses] = []

    async def start(settings: Settings, auditor: bool = False, supervise: bool = False) -> PipelineProcesses:
        import asyncio

        pipeline = PipelineProcesses(
            settings, tmp_path / "logs", port_base=port_base, auditor=auditor, supervise=supervise
        )
        started.append(pipeline)
        pipeline.start_all()
        await asyncio.to_thread(pipeline.wait_ready, 120.0)
        return pipeline

    yield start
    for pipeline in started:
        codes = pipeline.stop_all(timeout=30.0)
        unclean = {label: code for label, code in codes.items() if code not in (0, None)}
        assert not unclean, f"services did not stop cleanly on SIGTERM: {unclean}\n" + "\n".join(
            pipeline.tail(label) for label in unclean
        )
