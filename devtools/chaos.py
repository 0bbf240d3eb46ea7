"""`hifi chaos`: the real pipeline under steady load, a fault, and ground truth.

Every event carries a producer id and sequence number; the load generator keeps the ids the
collector accepted; two sinks, `faulted` and `healthy`, are read back for what they hold: webhook
receivers record what they acknowledged, a Kafka sink's topic is read with read_committed, a Redis
Stream sink's stream with XRANGE, a Postgres sink's table with SELECT. A scenario passes only if every
accepted event reached both sinks exactly once (less the events a sink refuses on purpose) and the dead
letters are exactly the poison pills and those refused events.

Ports are parameters, with environment overrides for `hifi chaos` so parallel runs do not collide:
HIFI_CHAOS_PORT_BASE (services and webhook sinks), HIFI_CHAOS_KAFKA_PORT (one node),
HIFI_CHAOS_CLUSTER_PORT (three nodes), HIFI_CHAOS_REDIS_URL (dedupe and ledger) and
HIFI_CHAOS_OWN_REDIS_URL (a Redis a scenario kills: the dedupe backend or the Redis Stream sink),
HIFI_CHAOS_POSTGRES_PORT (the Postgres under the Postgres sink).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from devtools.kafka import KAFKA_VERSION, KafkaLaunchError, LocalKafka
from devtools.pipeline import PipelineProcesses
from devtools.postgres import LocalPostgres
from devtools.redis import LocalRedis
from devtools.traffic import EventFactory
from devtools.webhook import WebhookReceiver, one_in
from shared import pipeline as layout
from shared.config import Settings, hash_api_key
from shared.dlq import DeadLetterQueues
from shared.topics import Topics

API_KEY = "chaos-key"
SLA_MS = 1000.0
SINK_400_ONE_IN = 1000  # sink-4xx-mix: the faulted sink refuses one event id in this many with a 400

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


@dataclass
class LoadGenerator:
    """Open loop: batches at fixed intended times. A batch the collector refuses (5xx, connection
    error) is sent again, like an SDK would, until accepted: resends are duplicates to drop."""

    url: str
    rate: float
    batch: int = 20
    factory: EventFactory = field(default_factory=lambda: EventFactory(producer_id=uuid.uuid4().hex[:6]))
    accepted: set[str] = field(default_factory=set)
    resends: int = 0
    extra_events: list[dict[str, Any]] = field(default_factory=list)  # injected into the next batch
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def run(self) -> None:
        interval = self.batch / self.rate
        next_at = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
            while not self._stop.is_set():
                events = [self.factory.make() for _ in range(self.batch)]
                if self.extra_events:
                    events.extend(self.extra_events)
                    self.extra_events = []
                task = asyncio.create_task(self._post_until_accepted(session, events))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=120)

    async def _post_until_accepted(self, session: aiohttp.ClientSession, events: list[dict[str, Any]]) -> None:
        for attempt in range(200):
            try:
                async with session.post(self.url, json=events, headers={"X-Api-Key": API_KEY}) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status < 500 and isinstance(body, dict):
                        self.accepted.update(body.get("accepted", []))
                        retry = [
                            e
                            for e in events
                            if e.get("event_id")
                            in {
                                r.get("event_id")
                                for r in body.get("rejected", [])
                                if r.get("reason") == "broker_unavailable"
                            }
                        ]
                        if not retry:
                            return
                        events = retry
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass
            self.resends += 1
            await asyncio.sleep(min(2.0, 0.1 * (attempt + 1)))

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Kill:
    """A process (`label`, e.g. "sender.faulted") killed -9 at `killed_ms`; its successor started at
    `restarted_ms` (wall ms).

    A sink has one sender process at a time, so whatever the sink took in between was sent by the
    killed one before it died: a sink under load can handle a request after its sender is gone.
    """

    label: str
    killed_ms: float
    restarted_ms: float = float("inf")

    def covers(self, first_arrival_ms: float) -> bool:
        """Could the killed sender have had this delivery acked and not yet in its ledger? Its last
        2 s alive (an ack and a ledger write are about 1 ms apart; the rest is slack for a busy
        machine), or in flight when it died."""
        return self.killed_ms - 2000 <= first_arrival_ms <= self.restarted_ms


@dataclass
class WebhookTruth:
    """What a webhook receiver acknowledged, as it arrived."""

    receiver: WebhookReceiver

    @property
    def received(self) -> list[dict[str, Any]]:
        return self.receiver.received

    @property
    def arrival_ms(self) -> list[float]:
        return self.receiver.arrival_ms

    async def refresh(self) -> None:
        pass

    async def close(self) -> None:
        pass


@dataclass
class KafkaTopicTruth:
    """A Kafka sink's topic read back with read_committed: arrival is the record's timestamp."""

    bootstrap: str
    topic: str
    received: list[dict[str, Any]] = field(default_factory=list)
    arrival_ms: list[float] = field(default_factory=list)
    _consumer: AIOKafkaConsumer | None = None

    async def refresh(self) -> None:
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(
                self.topic,
                bootstrap_servers=self.bootstrap,
                group_id=None,
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                isolation_level="read_committed",
            )
            await self._consumer.start()
        try:
            while batch := await self._consumer.getmany(timeout_ms=500, max_records=5000):
                for records in batch.values():
                    for r in records:
                        self.received.append(json.loads(r.value))
                        self.arrival_ms.append(float(r.timestamp))
        except KafkaError:
            pass  # a broker down: read the rest on the next refresh

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()


@dataclass
class RedisStreamTruth:
    """A Redis Stream sink's stream read back with XRANGE: arrival is the entry id's milliseconds."""

    url: str
    stream: str
    received: list[dict[str, Any]] = field(default_factory=list)
    arrival_ms: list[float] = field(default_factory=list)
    _last_id: str = "-"

    async def refresh(self) -> None:
        client = aioredis.from_url(self.url, socket_timeout=5.0, socket_connect_timeout=2.0)
        try:
            while True:
                start = self._last_id if self._last_id == "-" else f"({self._last_id}"
                entries = await client.xrange(self.stream, min=start, count=5000)
                if not entries:
                    return
                for entry_id, fields in entries:
                    self._last_id = entry_id.decode()
                    self.received.append(json.loads(fields[b"data"]))
                    self.arrival_ms.append(float(self._last_id.split("-")[0]))
        except (RedisError, OSError):
            pass  # Redis down: read the rest on the next refresh
        finally:
            await client.aclose()

    async def close(self) -> None:
        pass


@dataclass
class PostgresTableTruth:
    """A Postgres sink's table read back whole: one row per idempotency key, so a copy the sink wrote twice
    would have to carry another key; arrival is the row's `delivered_at`."""

    dsn: str
    table: str
    received: list[dict[str, Any]] = field(default_factory=list)
    arrival_ms: list[float] = field(default_factory=list)

    async def refresh(self) -> None:
        import asyncpg

        try:
            conn = await asyncpg.connect(self.dsn, timeout=5.0)
        except (OSError, TimeoutError, asyncpg.PostgresError):
            return  # Postgres down: read it all on the next refresh
        try:
            if await conn.fetchval("SELECT to_regclass($1)", self.table) is None:
                return
            rows = await conn.fetch(
                f"SELECT event_id, extract(epoch FROM received_at) * 1000 AS ingest_ts,"
                f" extract(epoch FROM delivered_at) * 1000 AS delivered_ms FROM {self.table} WHERE NOT canary"
                " ORDER BY delivered_at"
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return
        finally:
            await conn.close()
        self.received = [{"event_id": r["event_id"], "ingest_ts": float(r["ingest_ts"] or 0)} for r in rows]
        self.arrival_ms = [float(r["delivered_ms"]) for r in rows]

    async def close(self) -> None:
        pass


SinkTruth = WebhookTruth | KafkaTopicTruth | RedisStreamTruth | PostgresTableTruth
PG_DSN_ENV = "HIFI_CHAOS_PG_DSN"  # the senders' environment carries the Postgres sink's DSN under this name


@dataclass
class ChaosRun:
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
        await asyncio.to_thread(self.pipeline.stop_all, 30.0)
        await self.faulted.stop()
        await self.healthy.stop()
        for truth in getattr(self, "sinks", {}).values():
            await truth.close()

    # -- faults ------------------------------------------------------------------------------------

    def mark_fault(self, start: bool) -> None:
        if start:
            self.fault_start_ms = self.fault_start_ms or time.time() * 1000
        else:
            self.fault_end_ms = time.time() * 1000

    def kill(self, label: str) -> None:
        self.kills.append(Kill(label, time.time() * 1000))
        self.pipeline.kill(label)

    async def restart(self, label: str) -> None:
        for kill in self.kills:
            if kill.label == label and kill.restarted_ms == float("inf"):
                kill.restarted_ms = time.time() * 1000
        self.pipeline.start(label)
        await asyncio.to_thread(self.pipeline.wait_ready, 90.0, [label])

    async def crash(self, label: str, timeout: float = 90.0) -> None:
        """kill -9 under supervision: wait until the supervisor has restarted the worker and it is ready."""
        svc = self.pipeline.services[label]
        restarts = svc.restarts
        self.kill(label)
        deadline = time.monotonic() + timeout
        while svc.restarts == restarts:
            if time.monotonic() > deadline or svc.gave_up:
                raise TimeoutError(f"the supervisor did not restart {label}")
            await asyncio.sleep(0.05)
        self.kills[-1].restarted_ms = svc.restarted_wall_ms
        await asyncio.to_thread(self.pipeline.wait_ready, timeout, [label])

    async def kill_and_restart(self, label: str, down_s: float = 2.0) -> None:
        self.kill(label)
        await asyncio.sleep(down_s)
        await self.restart(label)

    async def redeploy(self, label: str, ready_timeout: float = 90.0) -> None:
        """One worker of a rolling deploy: SIGTERM (it drains, commits, maybe leaves), start it again under its
        name, and wait for its /ready (assigned and restored) before the caller moves on to the next one."""
        started_ms = time.time() * 1000
        started = time.monotonic()
        code = await asyncio.to_thread(self.pipeline.stop, label, 30.0)
        stopped_s = time.monotonic() - started
        self.pipeline.start(label)
        await asyncio.to_thread(self.pipeline.wait_ready, ready_timeout, [label])
        ready_s = time.monotonic() - started
        self.windows.append((f"redeploy {label}", started_ms, time.time() * 1000))
        self.notes.append(f"{label} exit {code}: drained in {stopped_s:.1f}s, ready again {ready_s:.1f}s after SIGTERM")
        if code != 0:
            self.clean_exit = False

    async def timed(self, name: str, fault: Awaitable[None]) -> None:
        """Run `fault` and record its span, for the report's late events per window."""
        started_ms = time.time() * 1000
        await fault
        self.windows.append((name, started_ms, time.time() * 1000))

    async def inject_pills(self) -> int:
        """Bad records written straight into the raw topic, as a buggy producer would."""
        producer = AIOKafkaProducer(bootstrap_servers=self.kafka.bootstrap, acks="all", enable_idempotence=True)
        await producer.start()
        good = self.load.factory.make()
        pills = [
            b"\xc1\xff not msgpack",
            msgpack.packb([1, 2, 3]),
            msgpack.packb({"type": "play", "ts": 1.0, "tenant": "acme"}),  # no event_id
            msgpack.packb({"event_id": "p-ts", "type": "play", "ts": "yesterday", "tenant": "acme"}),
            msgpack.packb(
                {"event_id": "p-big", "type": "play", "ts": 1.0, "tenant": "acme", "payload": {"blob": "x" * 300_000}}
            ),
        ]
        try:
            for pill in pills:
                await producer.send_and_wait(self.topics.raw, pill, key=b"acme:poison")
        finally:
            await producer.stop()
        # A valid event whose enrichment raises (an IP the geo reader refuses): it must still arrive.
        good["context"] = {"ip": "999.1.1.1"}
        self.load.extra_events.append(good)
        self.pills += len(pills)
        return len(pills)

    async def leaders(self, names: list[str] | None = None) -> dict[int, int]:
        """Partitions led per broker node, over `names` (default: the pipeline topics)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka.bootstrap)
        await admin.start()
        try:
            described = await admin.describe_topics(
                names or [self.topics.raw, self.topics.enriched, self.topics.unique]
            )
        finally:
            await admin.close()
        leaders = {node.node_id: 0 for node in self.kafka.members}
        for topic in described:
            for part in topic["partitions"]:
                leaders[part["leader"]] = leaders.get(part["leader"], 0) + 1
        return leaders

    async def busiest_leader(self, names: list[str] | None = None) -> int:
        leaders = await self.leaders(names)
        return max(leaders, key=lambda n: leaders[n])

    async def least_busy_leader(self) -> int:
        leaders = await self.leaders()
        return min(leaders, key=lambda n: leaders[n])

    # -- measuring ---------------------------------------------------------------------------------

    def expected(self, name: str) -> set[str]:
        """The accepted events sink `name` should hold: all but those it refuses on purpose."""
        refused = self.refused_by_faulted if name == "faulted" else None
        return {e for e in self.load.accepted if refused is None or not refused(e)}

    async def drain(self, timeout: float = 120.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            for truth in self.sinks.values():
                await truth.refresh()
            if all(self.expected(n) <= {e["event_id"] for e in t.received} for n, t in self.sinks.items()):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(3.0)  # anything delivered twice would arrive now
        for truth in self.sinks.values():
            await truth.refresh()
        return time.monotonic() - started

    async def dead_letter_ids(self) -> dict[str, list[str]]:
        """Per stage, the event ids of its dead letters (pills without one count as "?")."""
        queues = DeadLetterQueues(self.kafka.bootstrap, self.topics, ["faulted", "healthy"])
        out: dict[str, list[str]] = {}
        for stage, count in (await queues.counts()).items():
            if count:
                letters = await queues.read(stage, limit=count)
                out[stage] = [
                    str(letter["original"].get("event_id", "?")) if isinstance(letter.get("original"), dict) else "?"
                    for letter in letters
                ]
        return out

    async def report(self, scenario: str) -> dict[str, Any]:
        dlq = await DeadLetterQueues(self.kafka.bootstrap, self.topics, ["faulted", "healthy"]).counts()
        accepted = self.load.accepted
        out: dict[str, Any] = {
            "scenario": scenario,
            "faulted_sink": self.faulted_sink,
            "accepted": len(accepted),
            "resends": self.load.resends,
        }
        window_dupes = 0
        window_offsets: list[int] = []
        unexplained: set[str] = set()
        for name, sink in self.sinks.items():
            counts: dict[str, int] = {}
            first_arrival: dict[str, float] = {}
            ingest_ms: dict[str, float] = {}
            for e, arrived in zip(sink.received, sink.arrival_ms, strict=True):
                counts[e["event_id"]] = counts.get(e["event_id"], 0) + 1
                first_arrival.setdefault(e["event_id"], arrived)
                ingest_ms.setdefault(e["event_id"], e["ingest_ts"])
            out[f"{name}_delivered"] = len(counts)
            out[f"{name}_missing"] = len(self.expected(name) - set(counts))
            out[f"{name}_duplicates"] = sum(n - 1 for n in counts.values())
            if isinstance(sink, WebhookTruth):  # requests it took after their sender had given up: not kept
                out[f"{name}_requests_dropped"] = sink.receiver.dropped_batches
            out[f"{name}_on_time_during_fault"] = self._on_time(sink)
            out[f"{name}_p99_lag_during_fault_ms"] = self._p99_lag_ms(sink)
            # Late: first copy more than the SLA after ingest, over the whole run; in seconds of offered load.
            late = sum(1 for e, at in first_arrival.items() if at - ingest_ms[e] > SLA_MS) if counts else 0
            out[f"{name}_late_events"] = late
            out[f"{name}_late_event_seconds"] = round(late / self.rate, 2)
            out[f"{name}_on_time"] = round(1 - late / len(counts), 5) if counts else None
            # The documented window: this sink's sender was killed -9 after the sink took a batch and
            # before the ledger write, so its successor delivered the batch again.
            kills = [k for k in self.kills if k.label == f"sender.{name}"]
            for event_id, n in counts.items():
                if n == 1:
                    continue
                covering = [k for k in kills if k.covers(first_arrival[event_id])]
                if not covering:
                    unexplained.add(event_id)
                    continue
                window_dupes += n - 1
                # Where in the window the first copy arrived (ms after the kill): negative is an ack the
                # sender had and did not write down; positive, a request it sent that the sink took late.
                window_offsets.extend(round(first_arrival[event_id] - k.killed_ms) for k in covering)
        out["missing"] = out["faulted_missing"] + out["healthy_missing"]
        # The healthy sink measures what a fault costs the pipeline (the faulted one may be down on purpose).
        out["late_event_seconds"] = out["healthy_late_event_seconds"]
        # On time before the fault: far below 100 % means the machine, not the fault, made events late.
        out["on_time_before_fault"] = self._on_time_before_fault(self.sinks["healthy"])
        out["on_time"] = out["healthy_on_time"]
        out["kills"] = len(self.kills)
        if self.windows:
            out["late_s_by_window"] = self._late_by_window(self.sinks["healthy"])
        delivered = {name: {r["event_id"] for r in sink.received} for name, sink in self.sinks.items()}
        missing = sorted({e for name in self.sinks for e in self.expected(name) - delivered[name]})
        if missing:
            out["missing_sample"] = missing[:10]
            out["missing_seen_in"] = await self.locate(set(missing))
        out["namespace"] = self.namespace
        out["duplicates"] = out["faulted_duplicates"] + out["healthy_duplicates"]
        out["duplicates_sender_kill_window"] = window_dupes
        if window_offsets:
            out["kill_window_first_copy_ms"] = [min(window_offsets), max(window_offsets)]
        out["duplicates_unexplained"] = out["duplicates"] - window_dupes
        if unexplained:
            # Where the extra copies came from: the first topic holding more copies than events.
            sample = set(sorted(unexplained)[:50])
            out["duplicates_sample"] = sorted(sample)[:5]
            out["duplicates_copies_in"] = await self.copies(sample)
            out["duplicates_arrivals"] = self._arrivals(sample)
        out["sender_kills"] = sum(1 for k in self.kills if k.label.startswith("sender."))
        out["dead_lettered"] = sum(dlq.values())
        out["dead_lettered_by_stage"] = {stage: n for stage, n in dlq.items() if n}
        out["pills"] = self.pills
        # Dead letters expected: the pills, and every accepted event the faulted sink refuses on purpose.
        refused = accepted - self.expected("faulted")
        out["dead_letters_expected"] = self.pills + len(refused)
        letters = await self.dead_letter_ids() if out["dead_lettered"] or refused else {}
        sender_letters = letters.get("sender.faulted", [])
        out["dead_letters_refused_missing"] = len(refused - set(sender_letters))
        unexpected = [e for e in sender_letters + letters.get("sender.healthy", []) if e not in refused]
        out["dead_letters_unexpected"] = len(unexpected)
        if unexpected:
            out["dead_letters_unexpected_sample"] = unexpected[:5]
        out["recovery_s"] = self._recovery_s()
        out["clean_exit"] = self.clean_exit
        out["passed"] = (
            out["missing"] == 0
            and out["duplicates_unexplained"] == 0
            and out["dead_lettered"] == out["dead_letters_expected"]
            and out["dead_letters_refused_missing"] == 0
            and self.clean_exit
        )
        out["notes"] = self.notes
        return out

    async def locate(self, event_ids: set[str]) -> dict[str, int]:
        """How many of `event_ids` each pipeline topic holds: the first topic short of them is where they went."""
        return {topic: len(counts) for topic, counts in (await self._scan(event_ids)).items()}

    async def copies(self, event_ids: set[str]) -> dict[str, int]:
        """How many records of `event_ids` each pipeline topic holds: the first topic with more copies than
        events is where a duplicate got through."""
        return {topic: sum(counts.values()) for topic, counts in (await self._scan(event_ids)).items()}

    def _arrivals(self, event_ids: set[str]) -> dict[str, list[float]]:
        """Per sink, the arrival times (s after the fault started) of the copies of `event_ids`, and the kills."""
        start = self.fault_start_ms
        out: dict[str, list[float]] = {f"kill:{k.label}": [round((k.killed_ms - start) / 1000, 2)] for k in self.kills}
        for name, sink in self.sinks.items():
            out[name] = sorted(
                round((arrived - start) / 1000, 2)
                for e, arrived in zip(sink.received, sink.arrival_ms, strict=True)
                if e["event_id"] in event_ids
            )[:20]
        return out

    async def _scan(self, event_ids: set[str]) -> dict[str, dict[str, int]]:
        from shared.codec import unpack

        found: dict[str, dict[str, int]] = {}
        topics = self.topics
        for topic in (topics.name(t) for t in layout.event_topics(["faulted", "healthy"])):
            consumer = AIOKafkaConsumer(
                topic, bootstrap_servers=self.kafka.bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
            )
            await consumer.start()
            seen: dict[str, int] = {}
            try:
                idle = 0
                while idle < 3:
                    batch = await consumer.getmany(timeout_ms=300, max_records=5000)
                    idle = 0 if batch else idle + 1
                    for records in batch.values():
                        for r in records:
                            try:
                                event_id = unpack(r.value).get("event_id")
                            except Exception:
                                continue
                            if event_id in event_ids:
                                seen[event_id] = seen.get(event_id, 0) + 1
            finally:
                await consumer.stop()
            found[topic] = seen
        return found

    def _lags_during_fault(self, sink: SinkTruth) -> list[float]:
        """Ingest-to-sink lag (ms) of each event ingested from the fault's start until 5 s after its end."""
        if not self.fault_start_ms:
            return []
        end = (self.fault_end_ms or time.time() * 1000) + 5_000
        return [
            arr - e["ingest_ts"]
            for e, arr in zip(sink.received, sink.arrival_ms, strict=True)
            if self.fault_start_ms <= e["ingest_ts"] <= end
        ]

    def _late_by_window(self, sink: SinkTruth) -> dict[str, float]:
        """Late seconds of traffic per fault window (events ingested from its start until 3 s after its end,
        first copy later than the SLA), and the late seconds outside every window."""
        first: dict[str, tuple[float, float]] = {}
        for e, arrived in zip(sink.received, sink.arrival_ms, strict=True):
            first.setdefault(e["event_id"], (e["ingest_ts"], arrived))
        late = [ingest for ingest, arrived in first.values() if arrived - ingest > SLA_MS]
        out: dict[str, float] = {}
        inside: set[int] = set()
        for name, start, end in self.windows:
            hits = [i for i, ingest in enumerate(late) if start <= ingest <= end + 3_000]
            inside.update(hits)
            out[name] = round(len(hits) / self.rate, 2)
        out["outside windows"] = round((len(late) - len(inside)) / self.rate, 2)
        return out

    def _on_time(self, sink: SinkTruth) -> float | None:
        lags = self._lags_during_fault(sink)
        return round(sum(1 for lag in lags if lag <= SLA_MS) / len(lags), 5) if lags else None

    def _p99_lag_ms(self, sink: SinkTruth) -> float | None:
        lags = sorted(self._lags_during_fault(sink))
        return round(lags[min(len(lags) - 1, int(len(lags) * 0.99))]) if lags else None

    def _on_time_before_fault(self, sink: SinkTruth) -> float | None:
        lags = [
            arr - e["ingest_ts"]
            for e, arr in zip(sink.received, sink.arrival_ms, strict=True)
            if e["ingest_ts"] < self.fault_start_ms
        ]
        return round(sum(1 for lag in lags if lag <= SLA_MS) / len(lags), 5) if lags else None

    def _recovery_s(self) -> float | None:
        """Seconds after the fault ended until the faulted sink had every event ingested before then."""
        if not self.fault_end_ms:
            return None
        faulted = self.sinks["faulted"]
        arrivals = [
            arr
            for e, arr in zip(faulted.received, faulted.arrival_ms, strict=True)
            if e["ingest_ts"] <= self.fault_end_ms
        ]
        return round(max(0.0, (max(arrivals) - self.fault_end_ms) / 1000), 2) if arrivals else None


# -- scenarios ---------------------------------------------------------------------------------------

EVENT_PATH = tuple(s.label() for s in layout.EVENT_PATH)  # collector .. router, in order
HOPS = tuple(s.label() for s in layout.HOPS)  # the consumer stages before the senders
FAULTED, HEALTHY = layout.SENDER.label("faulted"), layout.SENDER.label("healthy")  # the run's two sinks


async def kill_each_stage(run: ChaosRun) -> None:
    """1. kill -9 each stage in turn mid-stream, then restart it."""
    run.mark_fault(True)
    for label in (*EVENT_PATH, FAULTED):
        await asyncio.sleep(3.0)
        await run.kill_and_restart(label)
    run.mark_fault(False)


async def kill_restart_single(run: ChaosRun) -> None:
    """17. kill -9 of each consumer stage's single worker, restarted at once by its supervisor (as Kubernetes
    does): with static membership it takes its partitions back without waiting out its old session."""
    run.mark_fault(True)
    for label in (*HOPS, HEALTHY):
        await asyncio.sleep(4.0)
        await run.crash(label)
    run.mark_fault(False)


async def rolling_deploy_two_workers(run: ChaosRun) -> None:
    """18. two workers per consumer stage, then a rolling deploy of every worker, one at a time (SIGTERM,
    start under the same name, ready), as a StatefulSet rollout with maxUnavailable 1 does."""
    stages = (*HOPS, FAULTED, HEALTHY)
    extras = [run.pipeline.add_worker(label) for label in stages]
    await asyncio.to_thread(run.pipeline.wait_ready, 120.0, extras)
    await asyncio.sleep(3.0)  # the rebalances of the scale-out are not the deploy's
    run.mark_fault(True)
    for label in [w for pair in zip(extras, stages, strict=True) for w in pair]:  # highest ordinal first
        await run.redeploy(label)
        await asyncio.sleep(1.0)
    run.mark_fault(False)


async def slow_message_then_kill(run: ChaosRun) -> None:
    """2. a slow message at the sink, then kill -9 of the sender waiting on it."""
    slow = run.load.factory.make()
    run.faulted.slow_event_ids = {slow["event_id"]}
    run.faulted.slow_s = 8.0
    run.load.extra_events.append(slow)
    run.mark_fault(True)
    deadline = time.monotonic() + 30
    while run.faulted.requests == 0 or slow["event_id"] not in run.load.accepted:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(2.0)  # the sender is now waiting on the slow batch
    run.kill("sender.faulted")
    run.faulted.slow_event_ids = set()
    await asyncio.sleep(1.0)
    await run.restart("sender.faulted")
    run.mark_fault(False)
    run.notes.append(
        f"slow event {slow['event_id']}; batches dropped by the sink on disconnect: {run.faulted.dropped_batches}"
    )


async def rolling_deploy(run: ChaosRun) -> None:
    """9. a rolling deploy: SIGTERM each stage in turn (it drains and commits), then start it again."""
    run.mark_fault(True)
    for label in (*EVENT_PATH, FAULTED, HEALTHY):
        await asyncio.sleep(2.0)
        await run.redeploy(label)
    run.mark_fault(False)


async def pause_each_stage(run: ChaosRun) -> None:
    """3. SIGSTOP a stage for 10 s, then SIGCONT (longer than the 10 s session timeout: a rebalance)."""
    run.mark_fault(True)
    for label in ("enricher", "sender.faulted"):
        await asyncio.sleep(3.0)
        run.pipeline.signal(label, signal.SIGSTOP)
        await asyncio.sleep(10.0)
        run.pipeline.signal(label, signal.SIGCONT)
    run.mark_fault(False)


async def kill_busiest_broker(run: ChaosRun) -> None:
    """4. kill -9 the broker leading most pipeline partitions; restart it after 30 s (3-node cluster)."""
    node = await run.busiest_leader()
    await asyncio.sleep(3.0)
    run.mark_fault(True)
    await asyncio.to_thread(run.kafka.kill_node, node)
    await asyncio.sleep(30.0)
    await asyncio.to_thread(run.kafka.start_node, node)
    run.mark_fault(False)
    run.notes.append(f"killed broker node {node}")


async def restart_redis(run: ChaosRun) -> None:
    """5. kill Redis and restart it, once with its data and once empty (dedupe and ledger on Redis)."""
    for keep_data in (True, False):
        await asyncio.sleep(4.0)
        run.mark_fault(True)
        await asyncio.to_thread(run.redis.kill)
        await asyncio.sleep(5.0)
        if not keep_data:
            run.redis.wipe_data()
        await asyncio.to_thread(run.redis.ensure)
    run.mark_fault(False)


async def sick_sink(run: ChaosRun) -> None:
    """6. one sink answers 5xx for 30 s, then is slow (+2 s per batch), then answers 429 + Retry-After."""
    await asyncio.sleep(3.0)
    run.mark_fault(True)
    run.faulted.fail_status = 503
    await asyncio.sleep(30.0)
    run.faulted.fail_status = None
    run.faulted.delay_s = 2.0
    await asyncio.sleep(10.0)
    run.faulted.delay_s = 0.0
    run.faulted.fail_status, run.faulted.retry_after = 429, 1.0
    await asyncio.sleep(6.0)
    run.faulted.fail_status, run.faulted.retry_after = None, None
    run.mark_fault(False)


async def poison_pills(run: ChaosRun) -> None:
    """7. poison pills: undecodable, wrong shape, missing field, wrong type, oversized; one event whose
    enrichment raises (it must arrive)."""
    await asyncio.sleep(2.0)
    run.mark_fault(True)
    await run.inject_pills()
    await asyncio.sleep(2.0)
    await run.inject_pills()
    run.mark_fault(False)


async def scale_out_and_in(run: ChaosRun) -> None:
    """8. scale each stage from 1 to 2 workers and back during load."""
    run.mark_fault(True)
    for label in (*HOPS, FAULTED):
        extra = run.pipeline.add_worker(label)
        await asyncio.to_thread(run.pipeline.wait_ready, 90.0, [extra])
        await asyncio.sleep(4.0)
        code = await asyncio.to_thread(run.pipeline.remove_worker, extra, 30.0)
        run.notes.append(f"{extra} exit {code}")
    run.mark_fault(False)


# -- chaos v2 (issue 14): faults that combine ------------------------------------------------------


async def outage_scale_out(run: ChaosRun) -> None:
    """10. the faulted sink answers 503 for 60 s; 10 s in, its sender group scales 1 -> 3; after the
    outage, back to 1. Evicted members must not deliver the batches they held."""
    await asyncio.sleep(3.0)
    run.mark_fault(True)
    outage = asyncio.create_task(run.faulted.fail_for(503, 60.0))
    await asyncio.sleep(10.0)
    extras = [run.pipeline.add_worker("sender.faulted") for _ in range(2)]
    await asyncio.to_thread(run.pipeline.wait_ready, 90.0, extras)
    await outage
    run.mark_fault(False)
    await asyncio.sleep(15.0)
    for extra in extras:
        code = await asyncio.to_thread(run.pipeline.remove_worker, extra, 30.0)
        run.notes.append(f"{extra} exit {code}")


async def outage_rolling_deploy(run: ChaosRun) -> None:
    """11. the faulted sink answers 503 while every sender is restarted in turn (SIGTERM, start)."""
    await asyncio.sleep(3.0)
    run.mark_fault(True)
    run.faulted.fail_status = 503
    await asyncio.sleep(5.0)
    for label in ("sender.faulted", "sender.healthy"):
        await run.redeploy(label)
        await asyncio.sleep(3.0)
    await asyncio.sleep(5.0)
    run.faulted.fail_status = None
    run.mark_fault(False)


async def long_restore(run: ChaosRun) -> None:
    """12. a second deduplicator whose first restore (injected, 15 s) outlasts the 10 s session timeout,
    then kill -9 of the first worker, restarted with the same slow first restore."""
    slow = {**run.inject_env, "HIFI_CHAOS_SLOW_RESTORE_S": "15", "HIFI_CHAOS_SLOW_RESTORE_TIMES": "1"}
    await asyncio.sleep(3.0)
    run.mark_fault(True)
    extra = run.pipeline.add_worker("deduplicator", env=slow)
    await asyncio.sleep(20.0)  # not awaiting ready: a worker restoring is not ready, and that is the point
    run.pipeline.services["deduplicator"].env.update(slow)
    run.kill("deduplicator")
    await asyncio.sleep(2.0)
    run.pipeline.start("deduplicator")
    await asyncio.to_thread(run.pipeline.wait_ready, 120.0, ["deduplicator", extra])
    run.mark_fault(False)
    await asyncio.sleep(5.0)
    code = await asyncio.to_thread(run.pipeline.stop, extra, 30.0)
    run.notes.append(f"{extra} exit {code}")


async def kafka_sink_broker_kill(run: ChaosRun) -> None:
    """13. kill -9 the broker leading most partitions of the Kafka sink's topic mid-batch; restart it
    after 20 s (3-node cluster). Ground truth: the sink topic read with read_committed."""
    await asyncio.sleep(5.0)
    truth = run.sinks["faulted"]
    assert isinstance(truth, KafkaTopicTruth)
    node = await run.busiest_leader([truth.topic])
    run.mark_fault(True)
    await asyncio.to_thread(run.kafka.kill_node, node)
    await asyncio.sleep(20.0)
    await asyncio.to_thread(run.kafka.start_node, node)
    run.mark_fault(False)
    run.notes.append(f"killed broker node {node}, leading most of {truth.topic}")


async def redis_sink_kill(run: ChaosRun) -> None:
    """14. kill -9 the Redis under a Redis Stream sink mid-pipeline; restart it with its data (AOF,
    fsync always) after 5 s. Ground truth: the stream read back."""
    assert run.sink_redis is not None
    for _ in range(2):
        await asyncio.sleep(5.0)
        run.mark_fault(True)
        await asyncio.to_thread(run.sink_redis.kill)
        await asyncio.sleep(5.0)
        await asyncio.to_thread(run.sink_redis.ensure)
    run.mark_fault(False)


async def postgres_sink_kill(run: ChaosRun) -> None:
    """19. under load, kill -9 the Postgres sink's sender and restart Postgres (fast shutdown) while its
    successor starts; then kill -9 Postgres itself and the sender again. Ground truth: the table's rows."""
    assert run.sink_postgres is not None
    run.mark_fault(True)
    for kill_server in (False, True):
        await asyncio.sleep(5.0)
        run.kill(FAULTED)
        await asyncio.to_thread(run.sink_postgres.kill if kill_server else run.sink_postgres.stop)
        await asyncio.sleep(3.0)
        await asyncio.to_thread(run.sink_postgres.ensure)
        await run.restart(FAULTED)
    run.mark_fault(False)


async def slow_isr_rebalance(run: ChaosRun) -> None:
    """15. SIGSTOP the broker leading fewest pipeline partitions (a follower of the rest), so acks=all
    produces stall, and rebalance the deduplicator and a sender meanwhile; SIGCONT after 20 s."""
    node = await run.least_busy_leader()
    await asyncio.sleep(3.0)
    run.mark_fault(True)
    pid = run.kafka.running_pids()[node]
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(3.0)
        extras = [run.pipeline.add_worker("deduplicator"), run.pipeline.add_worker("sender.faulted")]
        await asyncio.sleep(17.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    run.mark_fault(False)
    await asyncio.to_thread(run.pipeline.wait_ready, 120.0, extras)
    await asyncio.sleep(5.0)
    for extra in extras:
        code = await asyncio.to_thread(run.pipeline.remove_worker, extra, 30.0)
        run.notes.append(f"{extra} exit {code}")
    run.notes.append(f"SIGSTOP broker node {node} for 20 s")


async def sink_4xx_mix(run: ChaosRun) -> None:
    """16. the faulted sink refuses one event in 1,000 (by event id) with a 400, and everything with a
    401 for 10 s: the 400 events, and only they, are dead-lettered; the 401 stretch pauses the sink."""
    assert run.refused_by_faulted is not None  # from the load's first event on (Scenario.refuse_one_in)
    await asyncio.sleep(8.0)
    run.mark_fault(True)
    await run.faulted.fail_for(401, 10.0)
    run.mark_fault(False)
    await asyncio.sleep(12.0)
    run.notes.append(f"requests refused with 400: {run.faulted.rejected_requests}")


SOAK_DURATION_S = 1800.0
DAY_S = 86_400.0


async def soak(run: ChaosRun) -> None:
    """20. the soak: `duration_s` (30 min) of load on a 3-node cluster, two workers per consumer stage, with one
    rolling deploy of every worker, one kill -9 of one of two workers (restarted by its supervisor) and one
    kill of the busiest broker (restarted 30 s later), spread over the run; the rest is steady load."""
    duration = run.duration_s or SOAK_DURATION_S
    began = time.monotonic()

    async def until(share: float) -> None:  # the faults are spread over the run, never overlapping
        await asyncio.sleep(max(0.0, began + share * duration - time.monotonic()))

    stages = (*HOPS, FAULTED, HEALTHY)
    extras = [run.pipeline.add_worker(label) for label in stages]
    await asyncio.to_thread(run.pipeline.wait_ready, 180.0, extras)
    await asyncio.sleep(3.0)  # the scale-out's rebalances are not the soak's faults
    run.mark_fault(True)  # from here on the run is the soak: "before the fault" is the warm-up
    await until(0.1)
    for label in [w for pair in zip(extras, stages, strict=True) for w in pair]:
        await run.redeploy(label, ready_timeout=180.0)
        await asyncio.sleep(1.0)
    await until(0.5)
    await run.timed("kill -9 deduplicator-2", run.crash("deduplicator#2", timeout=180.0))
    await until(0.75)
    node = await run.busiest_leader()

    async def broker_outage() -> None:
        await asyncio.to_thread(run.kafka.kill_node, node)
        await asyncio.sleep(30.0)
        await asyncio.to_thread(run.kafka.start_node, node, True, 300.0)  # a loaded machine took over 60 s

    await run.timed(f"kill busiest broker {node}", broker_outage())
    await until(1.0)
    run.mark_fault(False)
    run.notes.append(f"soak ran {time.monotonic() - began:.0f}s of faults and load (asked {duration:.0f}s)")


def project_per_day(result: dict[str, Any]) -> None:
    """The soak's late seconds as a day's error budget: one crash a day (its window), and every fault of the soak
    in one day; the issue's bar is better than 99.99 % on time per day."""
    windows: dict[str, float] = result.get("late_s_by_window", {})
    crash_s = sum(v for k, v in windows.items() if k.startswith("kill -9"))
    result["projected_on_time_per_day_one_crash"] = round(1 - crash_s / DAY_S, 6)
    result["projected_on_time_per_day_all_soak_faults"] = round(1 - result["late_event_seconds"] / DAY_S, 6)


@dataclass(frozen=True)
class Scenario:
    number: int
    name: str
    fault: Callable[[ChaosRun], Awaitable[None]]
    nodes: int = 1
    dedupe_backend: str = "rocksdb"
    own_redis: bool = False  # a Redis of its own, which the scenario kills
    faulted_sink: str = "webhook"  # "kafka", "redis_stream" (on the scenario's own Redis), "postgres" (its own)
    # The faulted webhook answers 400 to about one event id in this many, from before the load's first
    # event (set by the fault step, an event sent in the first seconds was delivered yet expected refused).
    refuse_one_in: int | None = None
    supervise: bool = False  # workers that die are restarted by the supervisor, not by the scenario
    rate: float | None = None  # its own load (events/s) unless `--rate` says otherwise
    in_all: bool = True  # run by `hifi chaos all` (the soak is not: `make soak`)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario(1, "kill-stages", kill_each_stage),
        Scenario(2, "slow-then-kill", slow_message_then_kill),
        Scenario(3, "pause-stages", pause_each_stage),
        Scenario(4, "kill-broker", kill_busiest_broker, nodes=3),
        Scenario(5, "restart-redis", restart_redis, dedupe_backend="redis", own_redis=True),
        Scenario(6, "sick-sink", sick_sink),
        Scenario(7, "poison-pills", poison_pills),
        Scenario(8, "scale-stages", scale_out_and_in),
        Scenario(9, "rolling-deploy", rolling_deploy),
        Scenario(10, "outage-scale-out", outage_scale_out),
        Scenario(11, "outage-rolling-deploy", outage_rolling_deploy),
        Scenario(12, "long-restore", long_restore),
        Scenario(13, "kafka-sink-broker-kill", kafka_sink_broker_kill, nodes=3, faulted_sink="kafka"),
        Scenario(14, "redis-sink-kill", redis_sink_kill, own_redis=True, faulted_sink="redis_stream"),
        Scenario(15, "slow-isr-rebalance", slow_isr_rebalance, nodes=3),
        Scenario(16, "sink-4xx-mix", sink_4xx_mix, refuse_one_in=SINK_400_ONE_IN),
        Scenario(17, "kill-restart-single", kill_restart_single, supervise=True),
        Scenario(18, "rolling-deploy-2", rolling_deploy_two_workers),
        Scenario(19, "postgres-sink-kill", postgres_sink_kill, faulted_sink="postgres"),
        Scenario(20, "soak", soak, nodes=3, supervise=True, rate=1000.0, in_all=False),
    )
}


async def run_scenario(
    scenario: Scenario,
    workdir: Path,
    kafka: LocalKafka,
    redis: LocalRedis,
    rate: float = 200.0,
    port_base: int = 18500,
    sink_redis: LocalRedis | None = None,
    sink_postgres: LocalPostgres | None = None,
    duration_s: float | None = None,
) -> dict[str, Any]:
    run = ChaosRun(
        workdir,
        kafka,
        redis,
        rate=rate,
        port_base=port_base,
        dedupe_backend=scenario.dedupe_backend,
        faulted_sink=scenario.faulted_sink,
        sink_redis=sink_redis,
        sink_postgres=sink_postgres,
        supervise=scenario.supervise,
        duration_s=duration_s,
    )
    await run.start()
    if scenario.refuse_one_in:
        run.faulted.reject_event = run.refused_by_faulted = one_in(scenario.refuse_one_in)
    started = time.monotonic()
    try:
        load = asyncio.create_task(run.load.run())
        await asyncio.sleep(2.0)
        try:
            await scenario.fault(run)
        except (TimeoutError, RuntimeError, KafkaLaunchError) as exc:  # never ready: still count what arrived
            run.clean_exit = False
            run.notes.append(f"fault step failed: {type(exc).__name__}: {str(exc)[:2000]}")
        await asyncio.sleep(3.0)
        run.load.stop()
        await load
        drained = await run.drain()
        result = await run.report(scenario.name)
        result["number"] = scenario.number
        result["drain_s"] = round(drained, 1)
        result["seconds"] = round(time.monotonic() - started, 1)
        result["rate"] = rate
        if scenario.fault is soak:
            project_per_day(result)
        return result
    finally:
        await run.stop()


def format_table(results: list[dict[str, Any]]) -> str:
    head = (
        "| # | scenario | accepted | delivered (faulted / healthy) | missing | duplicates | dead-lettered / expected "
        "| recovery s | healthy on-time during fault | late s (healthy, whole run) | result |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        on_time = r.get("healthy_on_time_during_fault")
        window = " (sender kill window)" if r["duplicates"] and not r["duplicates_unexplained"] else ""
        rows.append(
            f"| {r['number']} | {r['scenario']} | {r['accepted']} "
            f"| {r['faulted_delivered']} / {r['healthy_delivered']} "
            f"| {r['missing']} | {r['duplicates']}{window} "
            f"| {r['dead_lettered']} / {r['dead_letters_expected']} | {r['recovery_s']} "
            f"| {'n/a' if on_time is None else f'{on_time * 100:.2f} %'} | {r.get('late_event_seconds', 'n/a')} "
            f"| {'pass' if r['passed'] else 'FAIL'} |"
        )
    return head + "\n".join(rows) + "\n"


def write_doc(doc: Path, table: str, command: str) -> None:
    """Replace the results section of docs/RELIABILITY.md (between the chaos markers)."""
    import platform

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = (
        f"<!-- chaos:begin -->\nLatest run: {stamp}, `{command}`, on {os.cpu_count()} cores / {mem_gib:.0f} GiB "
        f"({platform.platform()}), Kafka {KAFKA_VERSION}, everything on one machine.\n\n{table}<!-- chaos:end -->"
    )
    text = doc.read_text()
    head, rest = text.split("<!-- chaos:begin -->", 1)
    doc.write_text(head + section + rest.split("<!-- chaos:end -->", 1)[1])


def main(
    names: list[str], rate: float | None, json_out: str | None, doc: str | None = None, duration_s: float | None = None
) -> int:
    """Run the named scenarios (`all`: every one but the soak) at `rate` events/s (default: the scenario's own,
    else 200); `duration_s` shortens or lengthens a timed scenario (the soak)."""
    from devtools.kafka import DEFAULT_HOME

    chosen = [s for s in SCENARIOS.values() if s.in_all] if names == ["all"] else []
    for name in names if names != ["all"] else []:
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)} or all")
        chosen.append(SCENARIOS[name])
    results = []
    workroot = DEFAULT_HOME.parent / "chaos"
    env = os.environ.get
    port_base = int(env("HIFI_CHAOS_PORT_BASE", "18500"))
    shared_redis_url = env("HIFI_CHAOS_REDIS_URL", "redis://127.0.0.1:6379/14")
    own_redis_url = env("HIFI_CHAOS_OWN_REDIS_URL", "redis://127.0.0.1:16379/0")
    for scenario in chosen:
        kafka = LocalKafka(
            nodes=scenario.nodes,
            port=int(env("HIFI_CHAOS_CLUSTER_PORT", "25092"))
            if scenario.nodes == 3
            else int(env("HIFI_CHAOS_KAFKA_PORT", "19192")),
            data_root=workroot / f"kafka-{scenario.nodes}n",
            heap="384m",
        )
        kafka.wipe()
        # The Redis a scenario kills is its own, persistent one: the dedupe backend, or the stream sink.
        own = (
            LocalRedis(url=own_redis_url, data_dir=workroot / "redis", persistent=True) if scenario.own_redis else None
        )
        if own is not None:
            own.wipe_data()
        sink_redis = own if scenario.faulted_sink == "redis_stream" else None
        sink_postgres = (
            LocalPostgres(port=int(env("HIFI_CHAOS_POSTGRES_PORT", "15433")), data_root=workroot / "postgres")
            if scenario.faulted_sink == "postgres"
            else None
        )
        if sink_postgres is not None:
            sink_postgres.wipe()
        redis = (
            own
            if own is not None and sink_redis is None
            else LocalRedis(url=shared_redis_url, data_dir=workroot / "redis")
        )
        started_redis = False
        try:
            # Generous: formatting and starting three brokers on a loaded 2-core machine took over 90 s.
            kafka.start(timeout=float(env("HIFI_CHAOS_KAFKA_START_S", "300")))
            started_redis = redis.ensure()
            print(f"scenario {scenario.number} {scenario.name}: running ...", flush=True)
            result = asyncio.run(
                run_scenario(
                    scenario,
                    workroot / scenario.name,
                    kafka,
                    redis,
                    rate or scenario.rate or 200.0,
                    port_base,
                    sink_redis,
                    sink_postgres,
                    duration_s,
                )
            )
            print(json.dumps(result), flush=True)
            results.append(result)
        finally:
            kafka.stop()
            if started_redis or redis is own:
                redis.stop()
            if sink_redis is not None:
                sink_redis.stop()
            if sink_postgres is not None:
                sink_postgres.stop()
    table = format_table(results)
    print(table)
    if doc:
        write_doc(Path(doc), table, "hifi chaos " + " ".join(names) + (f" --rate {rate:g}" if rate else ""))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(results, indent=1))
    return 0 if all(r["passed"] for r in results) else 1
