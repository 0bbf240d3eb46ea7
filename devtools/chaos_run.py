"""A chaos run: the pipeline's processes, two sinks (`faulted` and `healthy`) and the load, started on
a given Kafka and Redis; its faults and its verification come from the two mixins."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from devtools.chaos_faults import ChaosFaults, Kill
from devtools.chaos_truth import (
    API_KEY,
    KafkaTopicTruth,
    LoadGenerator,
    PostgresTableTruth,
    RedisStreamTruth,
    SinkTruth,
    WebhookTruth,
)
from devtools.chaos_verify import ChaosVerify
from devtools.kafka import LocalKafka
from devtools.pipeline import PipelineProcesses
from devtools.postgres import LocalPostgres
from devtools.redis import LocalRedis
from devtools.webhook import WebhookReceiver
from shared.config import Settings, hash_api_key
from shared.topics import Topics

# Loaded by every service process started with the `inject` directory on PYTHONPATH: a fault-injecting
# wrapper around the real RocksDB restore (a long changelog, without waiting to write one).
SLOW_RESTORE_HOOK = """
import os

_delay = float(os.environ.get("HIFI_CHAOS_SLOW_RESTORE_S") or 0)
_times = [int(os.environ.get("HIFI_CHAOS_SLOW_RESTORE_TIMES") or 1)]
if _delay:
    import asyncio
    import sys

    from shared import keywindow

    _restore = keywindow.RocksKeyWindow.restore

    async def _slow_restore(self, partitions, *args, **kwargs):
        if _times[0] > 0:
            _times[0] -= 1
            print(f"chaos: restore of {partitions} slowed by {_delay}s", file=sys.stderr, flush=True)
            await asyncio.sleep(_delay)
        await _restore(self, partitions, *args, **kwargs)

    keywindow.RocksKeyWindow.restore = _slow_restore
"""

PG_DSN_ENV = "HIFI_CHAOS_PG_DSN"  # the senders' environment carries the Postgres sink's DSN under this name


@dataclass
class ChaosRun(ChaosFaults, ChaosVerify):
    workdir: Path
    kafka: LocalKafka
    redis: LocalRedis
    rate: float = 200.0
    port_base: int = 18500
    dedupe_backend: str = "rocksdb"
    faulted_sink: str = "webhook"  # or "kafka" (this cluster), "redis_stream" (sink_redis), "postgres" (sink_postgres)
    sink_redis: LocalRedis | None = None
    sink_postgres: LocalPostgres | None = None
    namespace: str = field(default_factory=lambda: f"chaos{uuid.uuid4().hex[:6]}")
    faulted: WebhookReceiver = field(init=False)
    healthy: WebhookReceiver = field(init=False)
    sinks: dict[str, SinkTruth] = field(init=False)
    pipeline: PipelineProcesses = field(init=False)
    load: LoadGenerator = field(init=False)
    pills: int = 0
    clean_exit: bool = True
    kills: list[Kill] = field(default_factory=list)
    fault_start_ms: float = 0.0
    fault_end_ms: float = 0.0
    notes: list[str] = field(default_factory=list)
    # Events a sink refuses on purpose: expected in its dead letters, not at the sink.
    refused_by_faulted: Callable[[str], bool] | None = None
    inject_env: dict[str, str] = field(default_factory=dict)  # PYTHONPATH of the fault-injecting hooks
    supervise: bool = False  # a worker that dies is restarted at once by PipelineProcesses, as Kubernetes does
    duration_s: float | None = None  # how long a timed scenario (the soak) runs its load; None: its default
    # Named spans of a fault (one worker's redeploy, a kill, a broker outage): the report counts late events per span.
    windows: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def topics(self) -> Topics:
        return Topics(self.namespace)

    async def start(self) -> None:
        self.faulted = WebhookReceiver(port=self.port_base + 98)
        self.healthy = WebhookReceiver(port=self.port_base + 99)
        await self.faulted.start()
        await self.healthy.start()
        config = self.workdir / "hifi.yaml"
        self.workdir.mkdir(parents=True, exist_ok=True)
        geo = self._geo_db()
        replication = 3 if self.kafka.nodes >= 3 else 1
        faulted, truth = await self._faulted_sink(replication)
        self.sinks = {"faulted": truth, "healthy": WebhookTruth(self.healthy)}
        config.write_text(f"""tenants:
  acme:
    api_keys: ["{hash_api_key(API_KEY)}"]
    sinks: [faulted, healthy]
sinks:
  faulted: {faulted}
  healthy: {{type: webhook, url: "http://127.0.0.1:{self.healthy.port}/in", timeout_s: 10}}
dedupe: {{backend: {self.dedupe_backend}}}
{f'enrich: {{geoip_db: "{geo}"}}' if geo else ""}
""")
        settings = Settings(
            config_path=str(config),
            broker=self.kafka.bootstrap,
            redis_url=self.redis.url,
            data_dir=str(self.workdir / "data"),
            namespace=self.namespace,
            partitions=4,
            replication=replication,
            min_insync=2 if replication == 3 else 1,
            log_level=os.environ.get("HIFI_CHAOS_LOG_LEVEL", "warning"),
        )
        self.pipeline = PipelineProcesses(
            settings, self.workdir / "logs", port_base=self.port_base, supervise=self.supervise
        )
        inject = self.workdir / "inject"
        inject.mkdir(exist_ok=True)
        (inject / "sitecustomize.py").write_text(SLOW_RESTORE_HOOK)
        self.inject_env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))}
        self.pipeline.start_all()
        await asyncio.to_thread(self.pipeline.wait_ready, 120.0)
        self.load = LoadGenerator(self.pipeline.collector_url, self.rate)

    async def _faulted_sink(self, replication: int) -> tuple[str, SinkTruth]:
        """The faulted sink's config line and how to read back what it holds."""
        if self.faulted_sink == "kafka":
            topic = f"{self.namespace}.sink-out"
            admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka.bootstrap)
            await admin.start()
            try:
                configs = {"min.insync.replicas": "2" if replication == 3 else "1"}
                await admin.create_topics([NewTopic(topic, 4, replication, topic_configs=configs)])
            finally:
                await admin.close()
            line = f'{{type: kafka, topic: "{topic}", timeout_s: 10}}'
            return line, KafkaTopicTruth(self.kafka.bootstrap, topic)
        if self.faulted_sink == "redis_stream":
            assert self.sink_redis is not None, "a Redis Stream sink needs its own Redis"
            self.sink_redis.ensure()
            stream = f"{self.namespace}:out"
            line = f'{{type: redis_stream, stream: "{stream}", url: "{self.sink_redis.url}", timeout_s: 10}}'
            return line, RedisStreamTruth(self.sink_redis.url, stream)
        if self.faulted_sink == "postgres":
            assert self.sink_postgres is not None, "a Postgres sink needs its own Postgres"
            self.sink_postgres.ensure()
            os.environ[PG_DSN_ENV] = self.sink_postgres.dsn  # inherited by the services started next
            table = f"{self.namespace}_out"
            line = f"{{type: postgres, dsn_env: {PG_DSN_ENV}, table: {table}, timeout_s: 10}}"
            return line, PostgresTableTruth(self.sink_postgres.dsn, table)
        url = f"http://127.0.0.1:{self.faulted.port}/in"
        return f'{{type: webhook, url: "{url}", timeout_s: 10}}', WebhookTruth(self.faulted)

    def _geo_db(self) -> Path | None:
        try:
            from mmdb_writer import MMDBWriter
            from netaddr import IPSet
        except ImportError:
            return None
        path = self.workdir / "geo.mmdb"
        writer = MMDBWriter(ip_version=4, database_type="GeoLite2-Country")
        writer.insert_network(IPSet(["10.0.0.0/8"]), {"country": {"iso_code": "NL"}})
        writer.to_db_file(str(path))
        return path

    async def stop(self) -> None:
        """Stops whatever `start` got to, also when it failed part way."""
        if (pipeline := getattr(self, "pipeline", None)) is not None:
            await asyncio.to_thread(pipeline.stop_all, 30.0)
        for receiver in (getattr(self, "faulted", None), getattr(self, "healthy", None)):
            if receiver is not None:
                await receiver.stop()
        for truth in getattr(self, "sinks", {}).values():
            await truth.close()
