"""`hifi bench`: open-loop load through the whole pipeline, measured honestly.

- Batches are scheduled at fixed intended times; each event carries its intended send time and
  latency is measured from it to the sink's receipt, so a stall anywhere (the generator included)
  shows up in the numbers instead of slowing the load down (no coordinated omission).
- End-to-end latency goes into an HDR histogram; per-stage lag comes from the stage stamps.
- CPU seconds and peak RSS per process (services, the broker, Redis, and the harness itself: load
  generator plus sink, which share the machine they measure) come from /proc.
- `--system raw` runs the limit reference: the same collector and topics, but each middle stage and
  the sender replaced by a bare aiokafka relay (consume -> produce/POST -> commit), no processing.
"""

from __future__ import annotations

import asyncio
import json
import os
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

from shared.config import Settings, hash_api_key
from shared.local.kafka import DEFAULT_HOME, KAFKA_VERSION, LocalKafka
from shared.local.pipeline import PipelineProcesses
from shared.local.redis import LocalRedis
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


@dataclass
class BenchSink:
    """The destination: records the latency of every event from its intended send time."""

    port: int
    histogram: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 600_000, 3))
    stage_lag: dict[str, HdrHistogram] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    on_time: int = 0
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
        now = time.time() * 1000
        seen = self.seen
        latencies: list[int] = []
        lags: dict[str, list[int]] = {stage: [] for stage in (*STAGES, "sender")}
        for event in body["events"]:
            event_id = event["event_id"]
            copies = seen[event_id] = seen.get(event_id, 0) + 1
            if copies > 1:
                continue
            latency = now - event["payload"]["intended_ms"]
            latencies.append(int(latency))
            self.on_time += latency <= SLA_MS
            stamps = event.get("stages") or {}
            previous = stamps.get("collector")
            for stage in STAGES:
                at = stamps.get(stage)
                if previous is not None and at is not None:
                    lags[stage].append(int(at - previous))
                    previous = at
            if previous is not None:
                lags["sender"].append(int(now - previous))
        record_counts(self.histogram, latencies, 600_000)  # the sink shares the CPU it measures
        for stage, values in lags.items():
            if values:
                record_counts(self.stage_lag.setdefault(stage, HdrHistogram(1, 600_000, 3)), values, 600_000)
        return web.json_response({"ok": True})


STAGES = ("enricher", "deduplicator", "router")


async def open_loop(url: str, rate: float, duration: float, batch: int) -> tuple[set[str], int, float]:
    """Post batches at fixed intended times; returns accepted ids, batches sent, and the achieved rate."""
    accepted: set[str] = set()
    run_id = uuid.uuid4().hex[:6]
    interval = batch / rate
    start = time.monotonic()
    wall_start = time.time() * 1000
    n = 0
    tasks: set[asyncio.Task[Any]] = set()
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def send(events: list[dict[str, Any]]) -> None:
            try:
                async with session.post(url, json=events, headers={"X-Api-Key": API_KEY}) as resp:
                    body = await resp.json(content_type=None)
                    accepted.update(body.get("accepted", []))
            except (aiohttp.ClientError, TimeoutError):
                pass

        while True:
            intended = start + n * interval
            if intended - start >= duration:
                break
            delay = intended - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            intended_ms = wall_start + (intended - start) * 1000
            events = [
                {
                    "event_id": f"{run_id}-{n}-{i}",
                    "type": "heartbeat",
                    "ts": intended_ms,
                    "device_id": f"dev-{(n * batch + i) % 500}",
                    "payload": {"intended_ms": intended_ms, "seq": i},
                }
                for i in range(batch)
            ]
            task = asyncio.create_task(send(events))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.wait(tasks, timeout=60)
    elapsed = time.monotonic() - start
    return accepted, n, len(accepted) / elapsed if elapsed else 0.0


RELAY = """
import asyncio, json, os, signal, sys, aiohttp
from aiokafka import AIOKafkaConsumer
from shared.app import durable_producer  # the stages' producer settings, and below their batching
from shared.publish import BatchPublisher, Output
async def main(source, target, group, bootstrap):
    consumer = AIOKafkaConsumer(source, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=10, max_poll_records=500)
    await consumer.start()
    producer = session = None
    if target.startswith("http"):
        session = aiohttp.ClientSession()
    else:
        producer = durable_producer(bootstrap)
        await producer.start()
        publisher = BatchPublisher(producer)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    import msgpack
    while not stop.is_set():
        batch = await consumer.getmany(timeout_ms=100, max_records=500)
        records = [r for rs in batch.values() for r in rs]
        if not records:
            continue
        if session is not None:
            events = [msgpack.unpackb(r.value) for r in records]
            async with session.post(target, json={"events": events}) as resp:
                await resp.read()
        else:
            published = await publisher.publish([Output(target, r.key, r.value) for r in records])
            await asyncio.gather(*published.futures)
        await consumer.commit()
    await consumer.stop()
    if producer: await producer.stop()
    if session: await session.close()
asyncio.run(main(*sys.argv[1:5]))
"""


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


async def run_once(
    env: BenchEnv, system: str, rate: float, duration: float, batch: int, dedupe: str = "rocksdb"
) -> dict[str, Any]:
    namespace = f"bench{uuid.uuid4().hex[:6]}"
    sink = BenchSink(port=env.port_base + 99)
    await sink.start()
    config = env.workdir / f"{namespace}.yaml"
    env.workdir.mkdir(parents=True, exist_ok=True)
    config.write_text(f"""tenants:
  bench: {{api_keys: ["{hash_api_key(API_KEY)}"], sinks: [hook]}}
sinks:
  hook: {{type: webhook, url: "http://127.0.0.1:{sink.port}/in", batch_max: 500}}
limits: {{max_events_per_batch: 500}}
dedupe: {{backend: {dedupe}}}
""")
    settings = env.settings(config, namespace)
    pipeline = PipelineProcesses(settings, env.workdir / "logs" / namespace, port_base=env.port_base)
    relays: list[subprocess.Popen[bytes]] = []
    if system == "hifi":
        pipeline.start_all()
    else:
        pipeline.start("collector")
    try:
        await asyncio.to_thread(pipeline.wait_ready, 120.0, None if system == "hifi" else ["collector"])
    except BaseException:  # one service failed to start: stop the others, or they keep their ports
        await asyncio.to_thread(pipeline.stop_all, 30.0)
        raise
    if system != "hifi":
        from shared.topics import Topics, ensure_topics

        t = Topics(namespace)
        await ensure_topics(env.kafka.bootstrap, t.all(["hook"]), 4, 1)
        sink_url = f"http://127.0.0.1:{sink.port}/in"
        if system == "raw":
            hops = [(t.raw, t.enriched), (t.enriched, t.unique), (t.unique, t.sink("hook")), (t.sink("hook"), sink_url)]
            relays = [
                spawn_relay(source, target, f"{namespace}-relay{i}", env.kafka.bootstrap)
                for i, (source, target) in enumerate(hops)
            ]
        else:
            relays = [
                spawn_quix(stage, namespace, env.kafka.bootstrap, sink_url, env.workdir / "quix-state")
                for stage in ("enrich", "dedupe", "route", "deliver")
            ]
        await asyncio.sleep(8.0)  # let the consumers join their groups
    pids = {
        label: svc.process.pid
        for label, svc in pipeline.services.items()
        if svc.process is not None and svc.process.poll() is None
    }
    pids.update({f"{system}{i}": p.pid for i, p in enumerate(relays)})
    pids.update({f"kafka-{n}": pid for n, pid in env.kafka.running_pids().items()})
    pids["harness"] = os.getpid()  # the load generator and the sink: they share the machine they measure
    redis_pid = _redis_pid(env.redis)
    if redis_pid:
        pids["redis"] = redis_pid
    cpu_before = {label: cpu for label, pid in pids.items() if (cpu := cpu_seconds(pid)) is not None}
    try:
        accepted, batches, achieved = await open_loop(pipeline.collector_url, rate, duration, batch)
        drained = await drain(sink, accepted)
        await asyncio.sleep(1.0)
        cpu_after = {label: cpu_seconds(pid) for label, pid in pids.items() if label in cpu_before}
        # A process that exited during the run (a crash, or stopped by something else on the machine)
        # makes the run invalid; it is reported, not a reason to lose the other numbers.
        exited = sorted(label for label in pids if cpu_after.get(label) is None)
        cpu = {label: after - cpu_before[label] for label, after in cpu_after.items() if after is not None}
        rss = {label: round(r, 1) for label, pid in pids.items() if (r := peak_rss_mib(pid)) is not None}
    finally:
        for relay in relays:
            relay.send_signal(signal.SIGTERM)
        for relay in relays:
            try:
                relay.wait(10)
            except subprocess.TimeoutExpired:
                relay.kill()
        await asyncio.to_thread(pipeline.stop_all, 30.0)
        await sink.stop()
    h = sink.histogram
    delivered = len(accepted & set(sink.seen))
    n = max(1, len(accepted))
    return {
        "system": system if system != "hifi" or dedupe == "rocksdb" else f"hifi-{dedupe}",
        "rate_eps": rate,
        "duration_s": duration,
        "batch": batch,
        "offered": batches * batch,
        "accepted": len(accepted),
        "achieved_eps": round(achieved, 1),
        "delivered": delivered,
        "missing": len(accepted) - delivered,
        "drained": drained,
        "duplicates": sum(c - 1 for c in sink.seen.values()),
        "p50_ms": h.get_value_at_percentile(50),
        "p95_ms": h.get_value_at_percentile(95),
        "p99_ms": h.get_value_at_percentile(99),
        "p999_ms": h.get_value_at_percentile(99.9),
        "max_ms": h.get_max_value(),
        "on_time_ratio": round(sink.on_time / n, 5),
        "stage_p95_ms": {s: hist.get_value_at_percentile(95) for s, hist in sink.stage_lag.items()},
        "cpu_s_per_1k": {k: round(v * 1000 / n, 3) for k, v in sorted(cpu.items())},
        "peak_rss_mib": dict(sorted(rss.items())),
        "exited": exited,
    }


DRAIN_IDLE_S = 10.0
DRAIN_MAX_S = 300.0


async def drain(sink: BenchSink, accepted: set[str]) -> bool:
    """After the load: wait while the sink still receives, so a backlog is delivered late (and counted
    in the latencies) rather than reported missing. Stops when every accepted event arrived (True),
    after `DRAIN_IDLE_S` without a new event, or after `DRAIN_MAX_S` (False: `missing` then holds what
    was still undelivered, in the topics or lost)."""
    started = last_progress = time.monotonic()
    received = len(sink.seen)
    while not accepted <= sink.seen.keys():
        now = time.monotonic()
        if now - last_progress > DRAIN_IDLE_S or now - started > DRAIN_MAX_S:
            return False
        await asyncio.sleep(0.5)
        if len(sink.seen) > received:
            received, last_progress = len(sink.seen), time.monotonic()
    return True


QUIX_PYTHON = DEFAULT_HOME.parent / "bench" / "quix-venv" / "bin" / "python"


def spawn_quix(stage: str, namespace: str, bootstrap: str, sink_url: str, state_dir: Path) -> subprocess.Popen[bytes]:
    """The Quix Streams peer runs from its own virtualenv (`make bench` creates it)."""
    if not QUIX_PYTHON.exists():
        raise SystemExit(
            f"the Quix Streams peer needs {QUIX_PYTHON}: python3 -m venv {QUIX_PYTHON.parent.parent} "
            "&& its pip install quixstreams==3.28.1 ua-parser msgpack"
        )
    script = Path(__file__).with_name("quix_peer.py")
    return subprocess.Popen(
        [str(QUIX_PYTHON), str(script), stage, namespace, bootstrap, sink_url, str(state_dir)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def spawn_relay(source: str, target: str, group: str, bootstrap: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", RELAY, source, target, group, bootstrap], stdin=subprocess.DEVNULL)


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
        "| system | rate | achieved | accepted | missing | dup | p50 | p95 | p99 | p99.9 | max | on time (1 s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    systems = list(dict.fromkeys(r["system"] for r in results))
    for r in sorted(results, key=lambda r: (systems.index(r["system"]), r["rate_eps"])):  # bisected rates in place
        rows.append(
            f"| {r['system']} | {r['rate_eps']:g} | {r['achieved_eps']:g} | {r['accepted']} | {r['missing']} "
            f"| {r['duplicates']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['p999_ms']} "
            f"| {r['max_ms']} | {r['on_time_ratio'] * 100:.3f} % |"
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
    return "\n".join(rows) + "\n"


WARMUP_RATE = 2000.0
COMMON_RATE = 2000.0  # the rate for p95/p99 targets and for comparing latency across systems


def headline(results: list[dict[str, Any]], ceilings: dict[str, float]) -> dict[str, Any]:
    """The numbers docs/bench/latest.json promises at its top level, and the ratios to the references.

    Hifi at the common rate (2,000 events/s), its loss over every rate it ran, the three ceilings, the
    peer's p95 at the same rate, and pipeline/limit and pipeline/peer ratios for ceiling and p95.
    """

    def at(system: str, rate: float) -> dict[str, Any]:
        return next((r for r in results if r["system"] == system and r["rate_eps"] == rate), {})

    hifi, raw, quix = at("hifi", COMMON_RATE), at("raw", COMMON_RATE), at("quix", COMMON_RATE)
    mine = [r for r in results if r["system"] == "hifi"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a is not None and b else None

    ceiling, limit, peer = ceilings.get("hifi"), ceilings.get("raw"), ceilings.get("quix")
    return {
        "rate_eps": COMMON_RATE,
        "p50_ms": hifi.get("p50_ms"),
        "p95_ms": hifi.get("p95_ms"),
        "p99_ms": hifi.get("p99_ms"),
        "on_time_ratio": hifi.get("on_time_ratio"),
        "missing": sum(r["missing"] for r in mine) if mine else None,
        "duplicates": sum(r["duplicates"] for r in mine) if mine else None,
        "ceiling_eps": ceiling,
        "limit_ceiling_eps": limit,
        "peer_ceiling_eps": peer,
        "limit_p95_ms": raw.get("p95_ms"),
        "peer_p95_ms": quix.get("p95_ms"),
        "ratios": {
            "ceiling_vs_limit": ratio(ceiling, limit),
            "ceiling_vs_peer": ratio(ceiling, peer),
            "p95_vs_limit": ratio(hifi.get("p95_ms"), raw.get("p95_ms")),
            "p95_vs_peer": ratio(hifi.get("p95_ms"), quix.get("p95_ms")),
        },
    }


def format_headline(head: dict[str, Any]) -> str:
    r = head["ratios"]
    return (
        f"At {head['rate_eps']:g} events/s Hifi: p50 {head['p50_ms']} ms, p95 {head['p95_ms']} ms, "
        f"p99 {head['p99_ms']} ms, on time {head['on_time_ratio']}; missing {head['missing']}, duplicates "
        f"{head['duplicates']} over every rate. Peer p95 {head['peer_p95_ms']} ms, "
        f"limit p95 {head['limit_p95_ms']} ms.\n"
        f"Ratios: ceiling Hifi/limit {r['ceiling_vs_limit']}, Hifi/peer {r['ceiling_vs_peer']}; "
        f"p95 at {head['rate_eps']:g} events/s Hifi/limit {r['p95_vs_limit']}, Hifi/peer {r['p95_vs_peer']} "
        "(below 1 is better for p95, above 1 for the ceiling)."
    )


def write_doc(doc: Path, table: str, ceilings: dict[str, float], command: str, summary: str = "") -> None:
    import platform

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = (
        f"<!-- bench:begin -->\nLatest run: {stamp}, `{command}`, on {os.cpu_count()} cores / {mem_gib:.0f} GiB "
        f"({platform.platform()}), Kafka {KAFKA_VERSION}; broker, Redis, every process and the load generator on "
        f"one machine. Latencies in ms.\n\n{table}\nCeilings (achieved >= 99 % of offered and p95 < 1 s): "
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
) -> int:
    # SIGTERM stops a bench like Ctrl-C: the running pipeline, the broker and Redis are stopped, not orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    kafka = LocalKafka(port=19292, data_root=DEFAULT_HOME.parent / "bench" / "kafka")
    kafka.wipe()
    kafka.start()
    # A server of its own: one shared with a test run on this machine would be stopped by that run's end.
    redis = LocalRedis(url="redis://127.0.0.1:6391/0")
    started_redis = redis.ensure()
    env = BenchEnv(kafka, redis, DEFAULT_HOME.parent / "bench")
    results: list[dict[str, Any]] = []
    ceilings: dict[str, float] = {}

    def run(system: str, rate: float) -> bool:
        print(f"bench {system} at {rate:g} events/s for {duration:g}s ...", flush=True)
        result = asyncio.run(run_once(env, system, rate, duration, batch, dedupe))
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
            asyncio.run(run_once(env, "raw", WARMUP_RATE, warmup_s, batch))
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
    table = format_table(results)
    head = headline(results, ceilings)
    print(table)
    print("ceilings (achieved >= 99 % of offered and p95 < 1 s):", ceilings)
    print(format_headline(head))
    if doc:
        command = f"hifi bench {'--step' if step else ''} --duration {duration:g} " + " ".join(
            f"--system {s}" for s in systems
        )
        write_doc(Path(doc), table, ceilings, " ".join(command.split()), format_headline(head))
    if json_out:
        summary = {
            **head,
            "machine": {"cores": os.cpu_count(), "kafka": KAFKA_VERSION},
            "results": results,
            "ceilings_eps": ceilings,
        }
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(summary, indent=1))
    return 0 if all(r["missing"] == 0 and r["duplicates"] == 0 for r in results) else 1
