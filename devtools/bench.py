"""`hifi bench`: open-loop load through the whole pipeline, measured honestly.

- Batches are scheduled at fixed intended times; each event carries its intended send time and
  latency is measured from it to the sink's receipt, so a stall anywhere (the generator included)
  shows up in the numbers instead of slowing the load down (no coordinated omission).
- End-to-end latency goes into an HDR histogram; per-stage lag comes from the stage stamps.
- CPU seconds and peak RSS per process (services, the broker, Redis, and the harness itself: load
  generator plus sink, which share the machine they measure) come from /proc.
- `--system raw` runs the limit reference: the same collector and topics, but each middle stage and
  the sender replaced by a bare aiokafka relay (consume -> produce/POST/append -> commit), no processing.
- `Shape` is what the pipeline carries: `production` (the default: 2 tenants each subscribed to a
  webhook and a file sink, the auditor with canaries, 200 devices, 5 % client re-sends, 0.5-1 KB
  events with a user agent and an IP) or `minimal` (one tenant, one webhook, no auditor). Every
  system gets the same sinks and re-sends; ground truth is what the bench's own receivers saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from hdrh.histogram import HdrHistogram

from devtools.kafka import DEFAULT_HOME, KAFKA_VERSION, LocalKafka
from devtools.pipeline import PipelineProcesses
from devtools.redis import LocalRedis
from shared import pipeline as layout
from shared.config import HifiConfig, Settings, hash_api_key
from shared.metrics import record_counts

API_KEY = "bench-key"
SLA_MS = 1000
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process; None once it has exited."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mib(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass(frozen=True)
class Shape:
    """What the pipeline carries during a run: tenants, sinks, auditor, devices, re-sends, event size."""

    name: str
    tenants: int
    file_sink: bool  # each tenant also subscribed to a file sink (fsynced before the ack)
    auditor: bool  # the auditor runs, with canaries every `canary_interval_s`
    devices: int
    resend_ratio: float  # share of batches a client posts again (same event ids), which dedupe must drop
    payload_bytes: tuple[int, int] | None  # serialised event size range; None: the bare heartbeat (~150 B)

    @property
    def sinks(self) -> tuple[str, ...]:
        return ("hook", "files") if self.file_sink else ("hook",)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tenants": self.tenants,
            "sinks_per_tenant": len(self.sinks),
            "sinks": list(self.sinks),
            "auditor": self.auditor,
            "canaries": self.auditor,
            "devices": self.devices,
            "resend_ratio": self.resend_ratio,
            "payload_bytes": list(self.payload_bytes) if self.payload_bytes else None,
        }


SHAPES = {
    "production": Shape("production", 2, True, True, 200, 0.05, (512, 1024)),
    "minimal": Shape("minimal", 1, False, False, 500, 0.0, None),
}


@dataclass
class SinkTruth:
    """One sink's ground truth: every event's latency from its intended send time, and its copies."""

    histogram: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 600_000, 3))
    stage_lag: dict[str, HdrHistogram] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    on_time: int = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def record(self, events: list[dict[str, Any]], now: float) -> None:
        seen = self.seen
        latencies: list[int] = []
        lags: dict[str, list[int]] = {stage: [] for stage in (*STAGES, layout.SENDER.name)}
        for event in events:
            if event.get("canary"):  # the auditor's, not the client's: counted by the auditor, not here
                continue
            event_id = event["event_id"]
            copies = seen[event_id] = seen.get(event_id, 0) + 1
            if copies > 1:
                continue
            latency = now - event["payload"]["intended_ms"]
            latencies.append(int(latency))
            self.on_time += latency <= SLA_MS
            stamps = event.get("stages") or {}
            previous = stamps.get(layout.COLLECTOR.name)
            for stage in STAGES:
                at = stamps.get(stage)
                if previous is not None and at is not None:
                    lags[stage].append(int(at - previous))
                    previous = at
            if previous is not None:
                lags[layout.SENDER.name].append(int(now - previous))
        record_counts(self.histogram, latencies, 600_000)  # the sink shares the CPU it measures
        for stage, values in lags.items():
            if values:
                record_counts(self.stage_lag.setdefault(stage, HdrHistogram(1, 600_000, 3)), values, 600_000)


@dataclass
class BenchSink(SinkTruth):
    """The webhook destination: an HTTP server recording what it receives."""

    port: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.record(body["events"], time.time() * 1000)
        return web.json_response({"ok": True})


FILE_POLL_S = 0.01


@dataclass
class FileTail(SinkTruth):
    """The file destination: follows the JSON-lines file a file sink appends (and fsyncs) to.

    Polled every `FILE_POLL_S`, so its latencies read up to that much late. The bench's file sinks do
    not rotate (rotate_bytes 1 TiB): a rotation would move the file from under the tail."""

    path: Path = Path("/nonexistent")
    _task: asyncio.Task[None] | None = None
    _offset: int = 0
    _partial: bytes = b""

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.poll()  # whatever arrived since the last poll

    async def _follow(self) -> None:
        while True:
            self.poll()
            await asyncio.sleep(FILE_POLL_S)

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return
        if not data:
            return
        self._offset += len(data)
        data = self._partial + data
        complete, _, self._partial = data.rpartition(b"\n")
        if complete:
            self.record([json.loads(line) for line in complete.split(b"\n")], time.time() * 1000)


STAGES = tuple(s.name for s in layout.HOPS)  # the stamps an event gathers between collector and sender


USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (X11; Linux x86_64; rv:131.0) Gecko/20100101 Firefox/131.0",
    "okhttp/4.12.0 AcmeApp/3.2.1 (Android 14; Pixel 8)",
)


def tenant_names(shape: Shape) -> list[str]:
    return [f"bench{i}" for i in range(shape.tenants)]


def api_key(tenant: str) -> str:
    return f"{API_KEY}-{tenant}"


@dataclass
class Load:
    """What the client did: the ids the collector accepted, and how many events it posted."""

    accepted: set[str]
    offered: int  # events posted, re-sends included
    resent: int  # events posted a second time (same id), which dedupe must drop
    achieved_eps: float
    refused: dict[str, int] = field(default_factory=dict)  # requests not accepted whole, by status or error


def make_events(
    shape: Shape, rng: random.Random, prefix: str, first: int, count: int, intended_ms: float
) -> list[dict]:
    events = []
    base_sizes: dict[int, int] = {}  # per user agent, the one field whose length varies much
    for i in range(count):
        device = (first + i) % shape.devices
        event: dict[str, Any] = {
            "event_id": f"{prefix}-{i}",
            "type": "heartbeat",
            "ts": intended_ms,
            "device_id": f"dev-{device}",
            "payload": {"intended_ms": intended_ms, "seq": i},
        }
        if shape.payload_bytes:
            event["type"] = "page_view"
            event["context"] = {
                "user_agent": USER_AGENTS[device % len(USER_AGENTS)],
                "ip": f"10.{device // 250}.{device % 250}.17",
            }
            # One serialisation per user agent per batch, not per event: the harness shares the CPU it
            # measures. Ids and IPs vary by a few bytes, which the 32-byte margin on each side absorbs.
            ua = device % len(USER_AGENTS)
            if ua not in base_sizes:
                base_sizes[ua] = len(json.dumps(event, separators=(",", ":"))) + 10  # 10: ,"data":""
            lo, hi = shape.payload_bytes
            event["payload"]["data"] = "x" * max(0, rng.randint(lo + 32, hi - 32) - base_sizes[ua])
        events.append(event)
    return events


async def open_loop(
    url: str, rate: float, duration: float, batch: int, shape: Shape | None = None, seed: int = 0
) -> Load:
    """Post batches at fixed intended times, each tenant's in turn; a `shape.resend_ratio` share of
    batches is posted again one interval later (a client retrying after a lost response)."""
    shape = shape or SHAPES["minimal"]
    tenants = tenant_names(shape)
    rng = random.Random(seed)
    accepted: set[str] = set()
    refused: dict[str, int] = {}
    run_id = uuid.uuid4().hex[:6]
    interval = batch / rate
    start = time.monotonic()
    wall_start = time.time() * 1000
    n = offered = resent = 0
    resend: tuple[str, list[dict[str, Any]]] | None = None
    tasks: set[asyncio.Task[Any]] = set()
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def send(tenant: str, events: list[dict[str, Any]]) -> None:
            try:
                async with session.post(url, json=events, headers={"X-Api-Key": api_key(tenant)}) as resp:
                    body = await resp.json(content_type=None)
                    accepted.update(body.get("accepted", []))
                    if resp.status != 200:
                        refused[f"HTTP {resp.status}"] = refused.get(f"HTTP {resp.status}", 0) + 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                refused[type(exc).__name__] = refused.get(type(exc).__name__, 0) + 1

        def post(tenant: str, events: list[dict[str, Any]]) -> None:
            task = asyncio.create_task(send(tenant, events))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        while True:
            intended = start + n * interval
            if intended - start >= duration:
                break
            delay = intended - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if resend is not None:
                post(*resend)
                resent += len(resend[1])
                resend = None
            intended_ms = wall_start + (intended - start) * 1000
            tenant = tenants[n % len(tenants)]
            events = make_events(shape, rng, f"{run_id}-{n}", n * batch, batch, intended_ms)
            post(tenant, events)
            offered += batch
            if int((n + 1) * shape.resend_ratio) > int(n * shape.resend_ratio):
                resend = (tenant, events)
            n += 1
        if tasks:
            await asyncio.wait(tasks, timeout=60)
    elapsed = time.monotonic() - start
    return Load(accepted, offered + resent, resent, len(accepted) / elapsed if elapsed else 0.0, refused)


@dataclass
class BenchEnv:
    kafka: LocalKafka
    redis: LocalRedis
    workdir: Path
    port_base: int = 18700

    def settings(self, config: Path, namespace: str) -> Settings:
        return Settings(
            config_path=str(config),
            broker=self.kafka.bootstrap,
            redis_url=self.redis.url,
            data_dir=str(self.workdir / "data"),
            namespace=namespace,
            partitions=4,
            log_level="warning",
        )


# `hifi-contracts`: Hifi with a data contract on every event and per-sink rules on the webhook, so one run
# prices them against plain `hifi` (issue 18). Every bench event passes them: the sinks' ground truth holds.
CONTRACT_SCHEMA = (
    "{type: object, required: [event_id, type, ts, payload],"
    " properties: {payload: {type: object, required: [intended_ms, seq],"
    " properties: {intended_ms: {type: number}, seq: {type: integer, minimum: 0}, data: {type: string}}},"
    " context: {type: object, properties: {user_agent: {type: string, maxLength: 512}, ip: {type: string}}}}}"
)
CONTRACT_RULES = (
    ', filter: {types: [page_view, heartbeat], where: "payload.seq >= `0`"}'
    ", transform: [{hash: [device_id]}, {mask_ip: context.ip}, {add: {payload.source: bench}}]"
)
CONTRACT_PII_ENV = "HIFI_BENCH_PII_KEY"


def write_config(
    path: Path, shape: Shape, dedupe: str, hook_url: str, files_dir: Path, contracts: bool = False
) -> None:
    contract = (
        f", pii_secret_env: {CONTRACT_PII_ENV}, schemas: {{mode: enforce, unknown_types: quarantine,"
        f" types: {{page_view: {CONTRACT_SCHEMA}, heartbeat: {CONTRACT_SCHEMA}}}}}"
        if contracts
        else ""
    )
    tenants = "".join(
        f'  {t}: {{api_keys: ["{hash_api_key(api_key(t))}"], sinks: [{", ".join(shape.sinks)}]{contract}}}\n'
        for t in tenant_names(shape)
    )
    files = f'  files: {{type: file, path: "{files_dir}", rotate_bytes: {1 << 40}}}\n' if shape.file_sink else ""
    rules = CONTRACT_RULES if contracts else ""
    # settle_s 5 instead of 30: the bench reads the loss ledger once every bucket of the run has settled
    audit = "audit: {settle_s: 5}\n" if shape.auditor else ""
    path.write_text(f"""tenants:
{tenants}sinks:
  hook: {{type: webhook, url: "{hook_url}", batch_max: 500{rules}}}
{files}limits: {{max_events_per_batch: 500}}
dedupe: {{backend: {dedupe}}}
{audit}""")


async def run_once(
    env: BenchEnv,
    system: str,
    rate: float,
    duration: float,
    batch: int,
    dedupe: str = "rocksdb",
    shape: Shape | None = None,
) -> dict[str, Any]:
    shape = shape or SHAPES["production"]
    namespace = f"bench{uuid.uuid4().hex[:6]}"
    env.workdir.mkdir(parents=True, exist_ok=True)
    hook = BenchSink(port=env.port_base + 99)
    files_dir = env.workdir / namespace / "files"
    truths: dict[str, SinkTruth] = {"hook": hook}
    if shape.file_sink:
        truths["files"] = FileTail(path=files_dir / "events.jsonl")
    for truth in truths.values():
        await truth.start()
    hook_url = f"http://127.0.0.1:{hook.port}/in"
    config = env.workdir / f"{namespace}.yaml"
    contracts = system == "hifi-contracts"
    if contracts:
        os.environ.setdefault(CONTRACT_PII_ENV, "bench-pii-key")  # the services inherit it
    label, system = system, "hifi" if contracts else system
    write_config(config, shape, dedupe, hook_url, files_dir, contracts)
    settings = env.settings(config, namespace)
    pipeline = PipelineProcesses(
        settings, env.workdir / "logs" / namespace, port_base=env.port_base, auditor=shape.auditor and system == "hifi"
    )
    relays: list[subprocess.Popen[bytes]] = []
    if system == "hifi":
        pipeline.start_all()
    else:
        pipeline.start(layout.COLLECTOR.name)
    try:
        await asyncio.to_thread(pipeline.wait_ready, 120.0, None if system == "hifi" else [layout.COLLECTOR.name])
    except BaseException:  # one service failed to start: stop the others, or they keep their ports
        await asyncio.to_thread(pipeline.stop_all, 30.0)
        raise
    if system != "hifi":
        from shared.topics import Topics, ensure_topics

        t = Topics(namespace)
        await ensure_topics(env.kafka.bootstrap, t.all(list(shape.sinks)), 4, 1)
        if system == "raw":
            hops = [
                (t.raw, t.enriched),
                (t.enriched, t.unique),
                (t.unique, ",".join(t.sink(s) for s in shape.sinks)),
                (t.sink("hook"), hook_url),
            ]
            if shape.file_sink:
                hops.append((t.sink("files"), f"file:{files_dir / 'events.jsonl'}"))
            relays = [
                spawn_relay(source, target, f"{namespace}-relay{i}", env.kafka.bootstrap)
                for i, (source, target) in enumerate(hops)
            ]
        else:
            files_path = files_dir / "events.jsonl" if shape.file_sink else None
            stages = ["enrich", "dedupe", "route", "deliver"] + (["deliver-files"] if shape.file_sink else [])
            relays = [
                spawn_quix(stage, namespace, env.kafka.bootstrap, hook_url, env.workdir / "quix-state", files_path)
                for stage in stages
            ]
        await asyncio.sleep(8.0)  # let the consumers join their groups
    pids = {
        label: svc.process.pid
        for label, svc in pipeline.services.items()
        if svc.process is not None and svc.process.poll() is None
    }
    pids.update({f"{system}{i}": p.pid for i, p in enumerate(relays)})
    pids.update({f"kafka-{n}": pid for n, pid in env.kafka.running_pids().items()})
    pids["harness"] = os.getpid()  # the load generator and the sinks: they share the machine they measure
    redis_pid = _redis_pid(env.redis)
    if redis_pid:
        pids["redis"] = redis_pid
    cpu_before = {label: cpu for label, pid in pids.items() if (cpu := cpu_seconds(pid)) is not None}
    auditor: dict[str, Any] | None = None
    try:
        load = await open_loop(pipeline.collector_url, rate, duration, batch, shape)
        load_end = time.time()
        drained = await drain(list(truths.values()), load.accepted)
        await asyncio.sleep(1.0)
        cpu_after = {label: cpu_seconds(pid) for label, pid in pids.items() if label in cpu_before}
        # A process that exited during the run (a crash, or stopped by something else on the machine)
        # makes the run invalid; it is reported, not a reason to lose the other numbers.
        exited = sorted(label for label in pids if cpu_after.get(label) is None)
        cpu = {label: after - cpu_before[label] for label, after in cpu_after.items() if after is not None}
        rss = {label: round(r, 1) for label, pid in pids.items() if (r := peak_rss_mib(pid)) is not None}
        if "auditor" in pipeline.services:
            auditor = await read_auditor(pipeline.services["auditor"].url("/audit"), load_end, HifiConfig.load(config))
    finally:
        for relay in relays:
            relay.send_signal(signal.SIGTERM)
        for relay in relays:
            try:
                relay.wait(10)
            except subprocess.TimeoutExpired:
                relay.kill()
        await asyncio.to_thread(pipeline.stop_all, 30.0)
        for truth in truths.values():
            await truth.stop()
    accepted = load.accepted
    n = max(1, len(accepted))
    h = HdrHistogram(1, 600_000, 3)
    stage_lag: dict[str, HdrHistogram] = {}
    for truth in truths.values():
        h.add(truth.histogram)
        for stage, hist in truth.stage_lag.items():
            stage_lag.setdefault(stage, HdrHistogram(1, 600_000, 3)).add(hist)
    per_sink = {
        name: {
            "delivered": len(accepted & truth.seen.keys()),
            "missing": len(accepted - truth.seen.keys()),
            # Taken by the collector but its answer never reached the client (the 30 s client timeout,
            # under overload): delivered, yet outside `accepted`, so outside the latencies' denominator.
            "unacknowledged": len(truth.seen.keys() - accepted),
            "duplicates": sum(c - 1 for c in truth.seen.values()),
            "p95_ms": truth.histogram.get_value_at_percentile(95),
        }
        for name, truth in truths.items()
    }
    total_cpu = sum(v for k, v in cpu.items() if k != "harness")
    result = {
        "system": label if system != "hifi" or dedupe == "rocksdb" else f"{label}-{dedupe}",
        "shape": shape.name,
        "rate_eps": rate,
        "duration_s": duration,
        "batch": batch,
        "offered": load.offered,
        "refused_requests": load.refused,
        "resent": load.resent,
        "accepted": len(accepted),
        "achieved_eps": round(load.achieved_eps, 1),
        "unacknowledged": sum(s["unacknowledged"] for s in per_sink.values()),
        "delivered": min(s["delivered"] for s in per_sink.values()),  # at every sink
        "missing": sum(s["missing"] for s in per_sink.values()),  # over the sinks: one event missing at two counts 2
        "drained": drained,
        # Copies beyond the first at the sinks. Hifi and Quix dedupe, so any is a fault; the raw relays do
        # not, so theirs are the client's re-sends passed through (expected: resent x sinks).
        "duplicates": sum(s["duplicates"] for s in per_sink.values()),
        "dedupes": system != "raw",
        "sinks": per_sink,
        "p50_ms": h.get_value_at_percentile(50),
        "p95_ms": h.get_value_at_percentile(95),
        "p99_ms": h.get_value_at_percentile(99),
        "p999_ms": h.get_value_at_percentile(99.9),
        "max_ms": h.get_max_value(),
        "on_time_ratio": round(sum(t.on_time for t in truths.values()) / (n * len(truths)), 5),
        "stage_p95_ms": {s: hist.get_value_at_percentile(95) for s, hist in stage_lag.items()},
        "cpu_s_per_1k": {k: round(v * 1000 / n, 3) for k, v in sorted(cpu.items())},
        # Every process but the harness (load generator and receivers, the same for every system).
        "cpu_s_per_1k_total": round(total_cpu * 1000 / n, 3),
        "peak_rss_mib": dict(sorted(rss.items())),
        "exited": exited,
    }
    if auditor is not None:
        result["auditor"] = auditor_vs_truth(auditor, result)
    return result


async def read_auditor(url: str, load_end: float, config: HifiConfig) -> dict[str, Any]:
    """The auditor's /audit once every bucket the load wrote into has settled (bucket end + settle_s)."""
    bucket_s, settle_s = config.audit.bucket_s, config.audit.settle_s
    settled_at = (load_end // bucket_s + 1) * bucket_s + settle_s + 2.0  # + 2: its settle timer ticks each second
    await asyncio.sleep(max(0.0, settled_at - time.time()))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(url) as resp:
            resp.raise_for_status()
            summary: dict[str, Any] = await resp.json()
    return summary


def auditor_vs_truth(summary: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The auditor's own lag and loss beside the sinks' ground truth, and by how much they differ.

    The auditor's lag runs from the collector's ingest to the sender's ack, the bench's from the client's
    intended send time to the receipt: the difference is the client-to-collector leg plus the receiver's
    side. Its counts include its canaries, taken out here."""
    per_sink: dict[str, Any] = {}
    delivered = lost = 0
    for sink, tenants in summary.get("sinks", {}).items():
        lag = [t["lag_1h"] for t in tenants.values() if t["lag_1h"].get("count")]
        sink_delivered = sum(t["delivered"] - t["canaries"] for t in tenants.values())
        sink_lost = sum(t["lost"] for t in tenants.values())
        delivered += sink_delivered
        lost += sink_lost
        per_sink[sink] = {
            "delivered": sink_delivered,
            "lost": sink_lost,
            "p95_ms_max_over_tenants": max((x["p95_ms"] for x in lag), default=None),
            "p99_ms_max_over_tenants": max((x["p99_ms"] for x in lag), default=None),
        }
    truth_delivered = sum(s["delivered"] + s["unacknowledged"] for s in result["sinks"].values())
    p95 = max((s["p95_ms_max_over_tenants"] or 0 for s in per_sink.values()), default=None)
    return {
        "sinks": per_sink,
        "delivered": delivered,
        "lost": lost,
        "lost_by_stage": summary.get("lost_by_stage"),
        "overdue": len(summary.get("overdue", [])),
        "canaries_sent": summary.get("canaries_sent"),
        "p95_ms": p95,
        "differs_by": {
            "delivered": delivered - truth_delivered,
            "lost": lost - result["missing"],
            "p95_ms": None if p95 is None else p95 - result["p95_ms"],
        },
    }


DRAIN_IDLE_S = 10.0
DRAIN_MAX_S = 300.0


async def drain(sinks: list[SinkTruth], accepted: set[str]) -> bool:
    """After the load: wait while the sinks still receive, so a backlog is delivered late (and counted
    in the latencies) rather than reported missing. Stops when every accepted event reached every sink
    (True), after `DRAIN_IDLE_S` without a new event, or after `DRAIN_MAX_S` (False: `missing` then holds
    what was still undelivered, in the topics or lost)."""
    started = last_progress = time.monotonic()
    received = sum(len(s.seen) for s in sinks)
    while not all(accepted <= s.seen.keys() for s in sinks):
        now = time.monotonic()
        if now - last_progress > DRAIN_IDLE_S or now - started > DRAIN_MAX_S:
            return False
        await asyncio.sleep(0.5)
        if (now_received := sum(len(s.seen) for s in sinks)) > received:
            received, last_progress = now_received, time.monotonic()
    return True


QUIX_PYTHON = DEFAULT_HOME.parent / "bench" / "quix-venv" / "bin" / "python"


def spawn_quix(
    stage: str, namespace: str, bootstrap: str, sink_url: str, state_dir: Path, files_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """The Quix Streams peer runs from its own virtualenv (`make bench` creates it)."""
    if not QUIX_PYTHON.exists():
        raise SystemExit(
            f"the Quix Streams peer needs {QUIX_PYTHON}: python3 -m venv {QUIX_PYTHON.parent.parent} "
            "&& its pip install quixstreams==3.28.1 ua-parser msgpack"
        )
    script = Path(__file__).with_name("quix_peer.py")
    args = [str(QUIX_PYTHON), str(script), stage, namespace, bootstrap, sink_url, str(state_dir)]
    return subprocess.Popen(
        args + ([str(files_path)] if files_path else []),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def spawn_relay(source: str, target: str, group: str, bootstrap: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "devtools.relay", source, target, group, bootstrap], stdin=subprocess.DEVNULL
    )


def _redis_pid(redis: LocalRedis) -> int | None:
    if redis.pid_file.exists():
        return int(redis.pid_file.read_text())
    found = subprocess.run(
        ["pgrep", "-f", f"redis-server.*:{redis.port}"], capture_output=True, text=True
    ).stdout.split()
    return int(found[0]) if found else None


def midpoint(passed: float | None, failed: float | None, grain: float = 500.0) -> float | None:
    """A rate between the last one that passed and the first that failed, on a 500 events/s grain;
    None when there is nothing left between them (or nothing passed)."""
    if passed is None or failed is None:
        return None
    rate = round((passed + failed) / 2 / grain) * grain
    return rate if passed < rate < failed else None


def passes(result: dict[str, Any]) -> bool:
    return (
        result["achieved_eps"] >= 0.99 * result["rate_eps"] and result["p95_ms"] < SLA_MS and not result.get("exited")
    )


def format_table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| system | shape | rate | achieved | accepted | resent | missing | dup | p50 | p95 | p99 | p99.9 | max "
        "| on time (1 s) | CPU-s/1k |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    systems = list(dict.fromkeys(r["system"] for r in results))
    for r in sorted(results, key=lambda r: (systems.index(r["system"]), r["rate_eps"])):  # bisected rates in place
        rows.append(
            f"| {r['system']} | {r.get('shape', 'minimal')} | {r['rate_eps']:g} | {r['achieved_eps']:g} "
            f"| {r['accepted']} | {r.get('resent', 0)} | {r['missing']} | {r['duplicates']} | {r['p50_ms']} "
            f"| {r['p95_ms']} | {r['p99_ms']} | {r['p999_ms']} | {r['max_ms']} | {r['on_time_ratio'] * 100:.3f} % "
            f"| {r.get('cpu_s_per_1k_total', '')} |"
        )
    for r in results:
        if r.get("missing") and not r.get("drained", True):
            rows.append(
                f"\n{r['system']} at {r['rate_eps']:g} events/s: {r['missing']} accepted events were not delivered "
                f"when the bench stopped waiting ({DRAIN_IDLE_S:g} s without progress, or {DRAIN_MAX_S:g} s)"
            )
        if r.get("exited"):
            rows.append(
                f"\n{r['system']} at {r['rate_eps']:g} events/s does not count: "
                f"{', '.join(r['exited'])} exited during the run"
            )
        if r.get("unacknowledged"):
            rows.append(
                f"\n{r['system']} at {r['rate_eps']:g} events/s: {r['unacknowledged']} deliveries (over the sinks) of "
                "events whose collector answer the client never got (its 30 s timeout): the collector was saturated"
            )
        if r.get("dedupes") is False and r.get("duplicates"):
            rows.append(
                f"\n{r['system']} at {r['rate_eps']:g} events/s: {r['duplicates']} duplicates are the client's "
                f"{r.get('resent', 0)} re-sent events passed through to {len(r.get('sinks', {})) or 1} sinks "
                "(the raw relays do not dedupe; not a failure)"
            )
    return "\n".join(rows) + "\n"


def format_costs(results: list[dict[str, Any]]) -> str:
    """CPU seconds per 1,000 events and peak RSS per process, one line per run."""
    rows = [
        "| system | rate | CPU-s/1k total | CPU-s/1k per process | peak RSS MiB per process |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        cpu = ", ".join(f"{k} {v:g}" for k, v in r.get("cpu_s_per_1k", {}).items())
        rss = ", ".join(f"{k} {v:g}" for k, v in r.get("peak_rss_mib", {}).items())
        rows.append(f"| {r['system']} | {r['rate_eps']:g} | {r.get('cpu_s_per_1k_total', '')} | {cpu} | {rss} |")
    return "\n".join(rows) + "\n"


def format_auditor(results: list[dict[str, Any]]) -> str:
    """The auditor's own figures beside the sinks' ground truth (Hifi runs with the auditor only)."""
    rows = [
        "| rate | auditor delivered | sinks delivered | auditor lost | sinks missing | auditor p95 | sinks p95 "
        "| p95 differs by |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a = r.get("auditor")
        if not a:
            continue
        truth = sum(s["delivered"] + s.get("unacknowledged", 0) for s in r["sinks"].values())
        rows.append(
            f"| {r['rate_eps']:g} | {a['delivered']} | {truth} | {a['lost']} | {r['missing']} | {a['p95_ms']} "
            f"| {r['p95_ms']} | {a['differs_by']['p95_ms']} |"
        )
    return "\n".join(rows) + "\n" if len(rows) > 2 else ""


WARMUP_RATE = 2000.0
COMMON_RATE = 2000.0  # the issue's rate for p95/p99 targets and for comparing latency across systems


def headline(results: list[dict[str, Any]], ceilings: dict[str, float], shape: Shape | None = None) -> dict[str, Any]:
    """The numbers docs/bench/latest.json promises at its top level, and the ratios to the references.

    Hifi at the common rate (2,000 events/s), its loss over every rate it ran, the three ceilings, the
    peer's p95 at the same rate, pipeline/limit and pipeline/peer ratios for ceiling, p95 and total CPU
    per event, and each target of docs/BENCHMARKS.md with whether this run met it.
    """

    def at(system: str, rate: float) -> dict[str, Any]:
        return next((r for r in results if r["system"] == system and r["rate_eps"] == rate), {})

    hifi, raw, quix = at("hifi", COMMON_RATE), at("raw", COMMON_RATE), at("quix", COMMON_RATE)
    mine = [r for r in results if r["system"] == "hifi"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a is not None and b else None

    ceiling, limit, peer = ceilings.get("hifi"), ceilings.get("raw"), ceilings.get("quix")
    contracts = at("hifi-contracts", COMMON_RATE)
    ratios = {
        "contracts_p95_vs_hifi": ratio(contracts.get("p95_ms"), hifi.get("p95_ms")),
        "contracts_cpu_vs_hifi": ratio(contracts.get("cpu_s_per_1k_total"), hifi.get("cpu_s_per_1k_total")),
        "ceiling_vs_limit": ratio(ceiling, limit),
        "ceiling_vs_peer": ratio(ceiling, peer),
        "p95_vs_limit": ratio(hifi.get("p95_ms"), raw.get("p95_ms")),
        "p95_vs_peer": ratio(hifi.get("p95_ms"), quix.get("p95_ms")),
        "cpu_vs_limit": ratio(hifi.get("cpu_s_per_1k_total"), raw.get("cpu_s_per_1k_total")),
    }

    def target(name: str, value: float | None, ok: bool) -> dict[str, Any]:
        return {"target": name, "measured": value, "met": None if value is None else ok}

    on_time = hifi.get("on_time_ratio")
    targets = [
        target("p95 <= 1.5 x raw at 2,000 events/s", ratios["p95_vs_limit"], (ratios["p95_vs_limit"] or 0) <= 1.5),
        target("on time >= 99.99 % at 2,000 events/s", on_time, (on_time or 0) >= 0.9999),
        target("ceiling >= 0.7 x raw", ratios["ceiling_vs_limit"], (ratios["ceiling_vs_limit"] or 0) >= 0.7),
        target("CPU per event <= 1.2 x raw", ratios["cpu_vs_limit"], (ratios["cpu_vs_limit"] or 0) <= 1.2),
        target("ceiling ahead of Quix", ratios["ceiling_vs_peer"], (ratios["ceiling_vs_peer"] or 0) > 1),
        target("p95 ahead of Quix", ratios["p95_vs_peer"], (ratios["p95_vs_peer"] or 2) < 1),
    ]
    return {
        "rate_eps": COMMON_RATE,
        "shape": shape.to_json() if shape else None,
        "p50_ms": hifi.get("p50_ms"),
        "p95_ms": hifi.get("p95_ms"),
        "p99_ms": hifi.get("p99_ms"),
        "p999_ms": hifi.get("p999_ms"),
        "on_time_ratio": on_time,
        "missing": sum(r["missing"] for r in mine) if mine else None,
        "duplicates": sum(r["duplicates"] for r in mine) if mine else None,
        "ceiling_eps": ceiling,
        "limit_ceiling_eps": limit,
        "peer_ceiling_eps": peer,
        "limit_p95_ms": raw.get("p95_ms"),
        "peer_p95_ms": quix.get("p95_ms"),
        "cpu_s_per_1k_total": hifi.get("cpu_s_per_1k_total"),
        "limit_cpu_s_per_1k_total": raw.get("cpu_s_per_1k_total"),
        "peer_cpu_s_per_1k_total": quix.get("cpu_s_per_1k_total"),
        "limit_duplicates": raw.get("duplicates"),
        "auditor": hifi.get("auditor"),
        "planning_eps_per_core": planning(hifi),
        "ratios": ratios,
        "targets": targets,
    }


# Not Hifi's stages: the broker, Redis and the load generator with its receivers.
NOT_STAGES = ("harness", "kafka-", "redis")


def planning(result: dict[str, Any]) -> dict[str, int]:
    """Events/s one core carries per stage process: 1,000 / its CPU-s per 1,000 events at this run's rate.

    Valid only from a run that kept up (a saturated stage's CPU is shared by fewer accepted events)."""
    return {
        name: round(1000 / cost)
        for name, cost in result.get("cpu_s_per_1k", {}).items()
        if cost > 0 and not name.startswith(NOT_STAGES)
    }


def format_headline(head: dict[str, Any]) -> str:
    r = head["ratios"]
    shape = head.get("shape") or {}
    met = "; ".join(
        f"{t['target']}: {t['measured']} ({'met' if t['met'] else 'not measured' if t['met'] is None else 'MISSED'})"
        for t in head.get("targets", [])
    )
    return (
        f"Shape: {shape.get('name')} ({shape.get('tenants')} tenants x {shape.get('sinks_per_tenant')} sinks, "
        f"auditor {'on' if shape.get('auditor') else 'off'}, re-sends {shape.get('resend_ratio')}, "
        f"payload {shape.get('payload_bytes')} B).\n"
        f"At {head['rate_eps']:g} events/s Hifi: p50 {head['p50_ms']} ms, p95 {head['p95_ms']} ms, "
        f"p99 {head['p99_ms']} ms, p99.9 {head.get('p999_ms')} ms, on time {head['on_time_ratio']}; missing "
        f"{head['missing']}, duplicates {head['duplicates']} over every rate. Peer p95 {head['peer_p95_ms']} ms, "
        f"limit p95 {head['limit_p95_ms']} ms. CPU-s per 1,000 events (all processes but the harness): Hifi "
        f"{head.get('cpu_s_per_1k_total')}, limit {head.get('limit_cpu_s_per_1k_total')}, peer "
        f"{head.get('peer_cpu_s_per_1k_total')}.\n"
        f"Ratios: ceiling Hifi/limit {r['ceiling_vs_limit']}, Hifi/peer {r['ceiling_vs_peer']}; "
        f"p95 at {head['rate_eps']:g} events/s Hifi/limit {r['p95_vs_limit']}, Hifi/peer {r['p95_vs_peer']}; "
        f"CPU per event Hifi/limit {r.get('cpu_vs_limit')} "
        "(below 1 is better for p95 and CPU, above 1 for the ceiling).\n"
        f"Planning, events/s per core per stage: {head.get('planning_eps_per_core')}.\n"
        f"Targets: {met}."
    )


def write_doc(doc: Path, table: str, ceilings: dict[str, float], command: str, summary: str = "") -> None:
    import platform

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = (
        f"<!-- bench:begin -->\nLatest run: {stamp}, `{command}`, on {os.cpu_count()} cores / {mem_gib:.0f} GiB "
        f"({platform.platform()}), Kafka {KAFKA_VERSION}; broker, Redis, every process and the load generator on "
        f"one machine, shared with other work while it ran (absolute times are noisy; compare ratios). "
        f"Latencies in ms.\n\n{table}\nCeilings (achieved >= 99 % of offered and p95 < 1 s): "
        f"{', '.join(f'{k} {v:g} events/s' for k, v in ceilings.items()) or 'none reached'}.\n"
        f"{summary + chr(10) if summary else ''}<!-- bench:end -->"
    )
    text = doc.read_text()
    head, rest = text.split("<!-- bench:begin -->", 1)
    doc.write_text(head + section + rest.split("<!-- bench:end -->", 1)[1])


def main(
    rates: list[float],
    duration: float,
    batch: int,
    systems: list[str],
    step: bool,
    json_out: str | None,
    doc: str | None = None,
    dedupe: str = "rocksdb",
    refine: int = 2,
    warmup_s: float = 20.0,
    shape_name: str = "production",
    kafka_port: int = 19292,
    redis_url: str = "redis://127.0.0.1:6391/0",
    port_base: int = 18700,
) -> int:
    # SIGTERM stops a bench like Ctrl-C: the running pipeline, the broker and Redis are stopped, not orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    shape = SHAPES[shape_name]
    kafka = LocalKafka(port=kafka_port, data_root=DEFAULT_HOME.parent / "bench" / f"kafka-{kafka_port}")
    kafka.wipe()
    kafka.start()
    # A server of its own: one shared with a test run on this machine would be stopped by that run's end.
    redis = LocalRedis(url=redis_url)
    started_redis = redis.ensure()
    env = BenchEnv(kafka, redis, DEFAULT_HOME.parent / "bench", port_base=port_base)
    results: list[dict[str, Any]] = []
    ceilings: dict[str, float] = {}

    def run(system: str, rate: float) -> bool:
        print(f"bench {system} ({shape.name} shape) at {rate:g} events/s for {duration:g}s ...", flush=True)
        result = asyncio.run(run_once(env, system, rate, duration, batch, dedupe, shape))
        print(json.dumps(result), flush=True)
        results.append(result)
        return passes(result)

    try:
        if warmup_s > 0:
            # A fresh broker's JVM is still compiling its hot paths: a 10,000 events/s run in its first
            # minute fails where the same run after the ladder's lower rates passes. Warm it up with the
            # raw relays, unreported, so the first system measured does not pay for it.
            print(
                f"warm-up: the raw relays at {WARMUP_RATE:g} events/s for {warmup_s:g}s (not reported) ...", flush=True
            )
            asyncio.run(run_once(env, "raw", WARMUP_RATE, warmup_s, batch, shape=shape))
        for system in systems:
            failed: float | None = None
            for rate in rates:
                if run(system, rate):
                    ceilings[system] = rate
                elif step:
                    failed = rate
                    break
            # The ladder doubles; between its last pass and first fail, bisect (the same for every system).
            for _ in range(refine if step else 0):
                rate = midpoint(ceilings.get(system), failed)
                if rate is None:
                    break
                if run(system, rate):
                    ceilings[system] = rate
                else:
                    failed = rate
    finally:
        kafka.stop()
        if started_redis:
            redis.stop()
    if not step:
        ceilings = {}  # one fixed rate passing is not a ceiling search
    table = format_table(results)
    costs = format_costs(results)
    audit = format_auditor(results)
    head = headline(results, ceilings, shape)
    print(table)
    print(costs)
    print(audit)
    print("ceilings (achieved >= 99 % of offered and p95 < 1 s):", ceilings)
    print(format_headline(head))
    if doc:
        command = (
            f"hifi bench --shape {shape.name} {'--step' if step else ''} "
            + " ".join(f"--rate {r:g}" for r in ([] if step else rates))
            + f" --duration {duration:g} "
            + " ".join(f"--system {s}" for s in systems)
        )
        tables = f"{table}\nCost per process:\n\n{costs}" + (
            f"\nThe auditor beside the sinks:\n\n{audit}" if audit else ""
        )
        write_doc(Path(doc), tables, ceilings, " ".join(command.split()), format_headline(head))
    if json_out:
        summary = {
            **head,
            "machine": {"cores": os.cpu_count(), "kafka": KAFKA_VERSION, "shared": True},
            "results": results,
            "ceilings_eps": ceilings,
        }
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(summary, indent=1))
    return 0 if all(r["missing"] == 0 and (r["duplicates"] == 0 or not r.get("dedupes", True)) for r in results) else 1
