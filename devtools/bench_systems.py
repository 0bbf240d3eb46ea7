"""The systems under test: Hifi (with or without contracts), the raw relays and the Quix Streams peer,
each run once at one rate against the same sinks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaError

from devtools.bench_load import SHAPES, Shape, api_key, open_loop, tenant_names
from devtools.bench_measure import (
    auditor_vs_truth,
    cpu_now,
    drain,
    merged,
    merged_latencies,
    process_costs,
    read_auditor,
    read_batch_shapes,
    redis_pid,
    sink_counts,
)
from devtools.bench_receivers import RemoteSinks
from devtools.kafka import DEFAULT_HOME, LocalKafka
from devtools.pipeline import PipelineProcesses
from devtools.redis import LocalRedis
from shared import pipeline as layout
from shared.config import HifiConfig, Settings, hash_api_key
from shared.tables import partition_owners
from shared.topics import Topics, ensure_topics

PARTITIONS = 4  # of every topic, the pipeline's and the peers'
NOT_SCALED = (layout.COLLECTOR.name, layout.AUDITOR.name)  # a second worker is priced for the stages between
PROFILE_ENV = "HIFI_BENCH_PROFILE"  # a directory: py-spy records every Python process of each run into it


@dataclass
class BenchEnv:
    """What every run shares: the broker, Redis, a work directory, and the ports its services listen on."""

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
            partitions=PARTITIONS,
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
    """The Hifi config of one run: the shape's tenants and sinks (the bench's receivers), its dedupe backend,
    the auditor if the shape has one, and with `contracts` the schemas and webhook rules of `hifi-contracts`."""
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
    workers: int = 1,
    warmup_s: float = 0.0,
) -> dict[str, Any]:
    """One run of `system` at `rate` events/s for `duration` s: start it with fresh topics and sinks, drive
    the open-loop load, drain, stop it, and return the run's row of latest.json. `workers` > 1 runs that
    many processes of each Hifi stage after the collector (one consumer group each, as scaled out).

    The load's first `warmup_s` (before the `duration` measured) is the run's warm-up, at the same rate
    into the same processes: its events must arrive once like the others (missing, duplicates), but the
    latencies, on-time share and CPU per event are the measured window's; the warm-up's own p95 and
    on-time share are reported beside them (`warmup_p95_ms`, `warmup_on_time_ratio`)."""
    shape = shape or SHAPES["production"]
    namespace = f"bench{uuid.uuid4().hex[:6]}"
    env.workdir.mkdir(parents=True, exist_ok=True)
    files_dir = env.workdir / namespace / "files"
    sinks = RemoteSinks(env.port_base + 99, env.port_base + 98, files_dir / "events.jsonl" if shape.file_sink else None)
    await sinks.start()
    hook_url = f"http://127.0.0.1:{sinks.hook_port}/in"
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
    peers: list[subprocess.Popen[bytes]] = []
    if system == "hifi":
        pipeline.start_all()
        for stage in [stage for stage in pipeline.services if stage not in NOT_SCALED]:
            for _ in range(workers - 1):
                pipeline.add_worker(stage)
    else:
        pipeline.start(layout.COLLECTOR.name)
    try:
        await asyncio.to_thread(pipeline.wait_ready, 120.0, None if system == "hifi" else [layout.COLLECTOR.name])
        if system != "hifi":
            peers = await start_peers(env, system, shape, namespace, hook_url, files_dir)
    except BaseException:  # a service or peer failed to start: stop the others, or they keep their ports
        await asyncio.to_thread(pipeline.stop_all, 30.0)
        sinks.kill()
        raise
    pids = measured_processes(env, pipeline, system, peers, sinks)
    auditor: dict[str, Any] | None = None
    batch_shapes: dict[str, dict[str, float]] = {}
    profile_dir = os.environ.get(PROFILE_ENV)
    profiles: list[subprocess.Popen[bytes]] = []
    try:
        loading = asyncio.create_task(
            open_loop(pipeline.collector_url, rate, duration, batch, shape, warmup_s=warmup_s)
        )
        await asyncio.sleep(warmup_s)
        cpu_before = cpu_now(pids)  # the measured window's CPU: from the warm-up's end to the drain's
        profiles = profile_python(pids, duration, Path(profile_dir) / label) if profile_dir else []
        load = await loading
        load_end = time.time()
        await sinks.expect(load.accepted)
        drained = await drain(sinks.progress)
        await asyncio.sleep(1.0)
        cpu, rss, exited = process_costs(pids, cpu_before)
        batch_shapes = await read_batch_shapes(
            {label: service.url("/metrics") for label, service in pipeline.services.items() if label != "collector"}
        )
        if "auditor" in pipeline.services:
            auditor = await read_auditor(pipeline.services["auditor"].url("/audit"), load_end, HifiConfig.load(config))
    finally:
        for profile in profiles:
            await asyncio.to_thread(profile.wait, 30)
        stop_peers(peers)
        await asyncio.to_thread(pipeline.stop_all, 30.0)
        try:
            truths = await sinks.stop()
        finally:
            sinks.kill()
    accepted = load.accepted
    events = max(1, len(load.measured))  # the denominator of every per-event figure
    warmup_events = max(1, len(accepted) - len(load.measured))
    latency, stage_lag, warmup_latency = merged_latencies(truths.values())
    per_sink = sink_counts(truths, accepted)
    total_cpu = sum(v for k, v in cpu.items() if not k.startswith("harness"))
    result = {
        "system": (label if system != "hifi" or dedupe == "rocksdb" else f"{label}-{dedupe}")
        + (f"-x{workers}" if workers > 1 else ""),
        "workers": workers,
        "shape": shape.name,
        "rate_eps": rate,
        "duration_s": duration,
        "warmup_s": warmup_s,
        "batch": batch,
        "offered": load.offered,  # warm-up included, as are `resent`, `accepted` and the integrity counts
        "refused_requests": load.refused,
        "resent": load.resent,
        "accepted": len(accepted),
        "measured": len(load.measured),
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
        "p50_ms": latency.get_value_at_percentile(50),
        "p95_ms": latency.get_value_at_percentile(95),
        "p99_ms": latency.get_value_at_percentile(99),
        "p999_ms": latency.get_value_at_percentile(99.9),
        "max_ms": latency.get_max_value(),
        "on_time_ratio": round(sum(t.on_time for t in truths.values()) / (events * len(truths)), 5),
        "warmup_p95_ms": warmup_latency.get_value_at_percentile(95) if warmup_s else None,
        "warmup_on_time_ratio": (
            round(sum(t.warmup_on_time for t in truths.values()) / (warmup_events * len(truths)), 5)
            if warmup_s
            else None
        ),
        # The auditor's lag covers the whole run: its p95 is compared with this one.
        "whole_run_p95_ms": merged([latency, warmup_latency]).get_value_at_percentile(95),
        "stage_p95_ms": {s: hist.get_value_at_percentile(95) for s, hist in stage_lag.items()},
        "cpu_s_per_1k": {k: round(v * 1000 / events, 3) for k, v in sorted(cpu.items())},
        # Every process but the harness (the load generator, and the receivers in `harness-sinks`: the same
        # for every system).
        "cpu_s_per_1k_total": round(total_cpu * 1000 / events, 3),
        "peak_rss_mib": dict(sorted(rss.items())),
        "exited": exited,
        "batches": batch_shapes,
    }
    if auditor is not None:
        result["auditor"] = auditor_vs_truth(auditor, result)
    return result


async def start_peers(
    env: BenchEnv, system: str, shape: Shape, namespace: str, hook_url: str, files_dir: Path
) -> list[subprocess.Popen[bytes]]:
    """The processes standing in for Hifi's middle stages and senders: the raw relays or the Quix peer."""
    topics = Topics(namespace)
    await ensure_topics(env.kafka.bootstrap, topics.all(list(shape.sinks)), PARTITIONS, 1)
    files_path = files_dir / "events.jsonl"
    if system == "raw":
        hops = [
            (topics.raw, topics.enriched),
            (topics.enriched, topics.unique),
            (topics.unique, ",".join(topics.sink(s) for s in shape.sinks)),
            (topics.sink("hook"), hook_url),
        ]
        if shape.file_sink:
            hops.append((topics.sink("files"), f"file:{files_path}"))
        groups = [f"{namespace}-relay{i}" for i in range(len(hops))]
        peers = [
            spawn_relay(source, target, group, env.kafka.bootstrap)
            for (source, target), group in zip(hops, groups, strict=True)
        ]
        try:
            await relays_assigned(env.kafka.bootstrap, groups, PARTITIONS, peers)
        except BaseException:
            stop_peers(peers)  # relays that never joined must not keep consuming into the next run
            raise
        return peers
    else:
        stages = ["enrich", "dedupe", "route", "deliver"] + (["deliver-files"] if shape.file_sink else [])
        state_dir = env.workdir / "quix-state"
        peer_files = files_path if shape.file_sink else None
        peers = [spawn_quix(stage, namespace, env.kafka.bootstrap, hook_url, state_dir, peer_files) for stage in stages]
    await asyncio.sleep(8.0)  # let the consumers join their groups (the peer's group names are Quix's own)
    return peers


RELAY_JOIN_S = 120.0


async def relays_assigned(
    bootstrap: str, groups: list[str], partitions: int, relays: list[subprocess.Popen[bytes]]
) -> None:
    """Wait until each relay's group holds every partition of its source, so the load does not start (and
    the drain's idle limit run out) while a relay on a loaded machine is still joining."""
    deadline = time.monotonic() + RELAY_JOIN_S
    pending = list(groups)
    while pending:
        if exited := [r.args for r in relays if r.poll() is not None]:
            raise RuntimeError(f"a raw relay exited before joining its group: {exited}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"raw relay groups {pending} not assigned {partitions} partitions in {RELAY_JOIN_S:g} s")
        try:
            members = await asyncio.gather(*(partition_owners(bootstrap, group) for group in pending))
        except KafkaError as exc:  # a fresh broker has no coordinator for a new group yet: ask again
            if not exc.retriable:
                raise
        else:
            pending = [
                g for g, owners in zip(pending, members, strict=True) if sum(map(len, owners.values())) < partitions
            ]
        if pending:
            await asyncio.sleep(0.5)


def stop_peers(peers: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every peer at once, then wait for each (10 s) before killing it."""
    for peer in peers:
        peer.send_signal(signal.SIGTERM)
    for peer in peers:
        try:
            peer.wait(10)
        except subprocess.TimeoutExpired:
            peer.kill()


def profile_python(pids: dict[str, int], duration: float, into: Path) -> list[subprocess.Popen[bytes]]:
    """py-spy (in the bench's virtualenv) samples each Python process through the middle half of the load,
    as collapsed stacks (`label.txt`); `hifi bench` is then measuring a profiled run, so its CPU is not
    the run's to publish. The broker and Redis are not Python."""
    into.mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).with_name("py-spy")
    record = f"{py_spy} record -r 50 -d {max(1, int(duration / 2))} --format raw --nonblocking"
    return [
        subprocess.Popen(
            ["sh", "-c", f"sleep {duration / 4:.1f}; exec {record} -p {pid} -o {into / (label + '.txt')}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for label, pid in pids.items()
        if not label.startswith(("kafka-", "redis"))
    ]


def measured_processes(
    env: BenchEnv,
    pipeline: PipelineProcesses,
    system: str,
    peers: list[subprocess.Popen[bytes]],
    sinks: RemoteSinks,
) -> dict[str, int]:
    """Every process whose CPU and RSS a run reports, by label: services, peers, brokers, Redis, harness."""
    pids = {
        label: svc.process.pid
        for label, svc in pipeline.services.items()
        if svc.process is not None and svc.process.poll() is None
    }
    pids.update({f"{system}{i}": p.pid for i, p in enumerate(peers)})
    pids.update({f"kafka-{n}": pid for n, pid in env.kafka.running_pids().items()})
    pids["harness"] = os.getpid()  # the load generator: it shares the machine it measures
    if sinks.process is not None:
        pids["harness-sinks"] = sinks.process.pid  # the receivers, likewise
    redis = redis_pid(env.redis)
    if redis:
        pids["redis"] = redis
    return pids


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
    """One raw relay (devtools/relay.py): consume `source`, produce/POST/append to `target`, commit."""
    return subprocess.Popen(
        [sys.executable, "-m", "devtools.relay", source, target, group, bootstrap], stdin=subprocess.DEVNULL
    )
