"""What the bench measures: each sink's ground truth (latencies, copies, stage lags), CPU and RSS from
/proc, the drain after the load, and the auditor's figures beside the truth."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from hdrh.histogram import HdrHistogram

from devtools.redis import LocalRedis
from devtools.webhook import WebhookReceiver
from shared import pipeline as layout
from shared.config import HifiConfig
from shared.metrics import record_counts

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
    """Peak resident set size (VmHWM) of a live process in MiB; None once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


STAGES = tuple(s.name for s in layout.HOPS)  # the stamps an event gathers between collector and sender


def cpu_now(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each labelled process still alive."""
    return {label: cpu for label, pid in pids.items() if (cpu := cpu_seconds(pid)) is not None}


def process_costs(
    pids: dict[str, int], cpu_before: dict[str, float]
) -> tuple[dict[str, float], dict[str, float], list[str]]:
    """CPU seconds since `cpu_before` and peak RSS per process, and the labels of those that exited.

    A process that exited during the run (a crash, or stopped by something else on the machine) makes
    the run invalid; it is reported, not a reason to lose the other numbers."""
    cpu_after = {label: cpu_seconds(pid) for label, pid in pids.items() if label in cpu_before}
    exited = sorted(label for label in pids if cpu_after.get(label) is None)
    cpu = {label: after - cpu_before[label] for label, after in cpu_after.items() if after is not None}
    rss = {label: round(r, 1) for label, pid in pids.items() if (r := peak_rss_mib(pid)) is not None}
    return cpu, rss, exited


@dataclass
class SinkTruth:
    """One sink's ground truth: every event's latency from its intended send time, and its copies.

    The run's warm-up events (`payload.warmup`) are counted for copies like any other, and their latencies
    kept apart (`warmup_histogram`, `warmup_on_time`): the measured window's figures start after them."""

    histogram: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 600_000, 3))
    stage_lag: dict[str, HdrHistogram] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    on_time: int = 0
    warmup_histogram: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 600_000, 3))
    warmup_on_time: int = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def record(self, events: list[dict[str, Any]], now: float) -> None:
        seen = self.seen
        latencies: list[int] = []
        warmup: list[int] = []
        lags: dict[str, list[int]] = {stage: [] for stage in (*STAGES, layout.SENDER.name)}
        for event in events:
            if event.get("canary"):  # the auditor's, not the client's: counted by the auditor, not here
                continue
            event_id = event["event_id"]
            copies = seen[event_id] = seen.get(event_id, 0) + 1
            if copies > 1:
                continue
            payload = event["payload"]
            latency = now - payload["intended_ms"]
            if payload.get("warmup"):
                warmup.append(int(latency))
                self.warmup_on_time += latency <= SLA_MS
                continue
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
        record_counts(self.warmup_histogram, warmup, 600_000)
        for stage, values in lags.items():
            if values:
                record_counts(self.stage_lag.setdefault(stage, HdrHistogram(1, 600_000, 3)), values, 600_000)


@dataclass
class BenchSink(WebhookReceiver, SinkTruth):
    """The webhook destination: devtools.webhook's receiver (its server and fault knobs unused), recording
    each event's latency and copies instead of keeping the events, which would grow with the run."""

    port: int = 0

    async def _handle(self, request: web.Request) -> web.Response:
        body = msgspec.json.decode(await request.read())  # the harness shares the CPU it measures: C, not json
        self.record(body["events"], time.time() * 1000)
        return web.Response(body=b'{"ok":true}', content_type="application/json")


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
        if complete:  # JSON lines hold no raw newline: the chunk's lines, as one array, in one C call
            self.record(msgspec.json.decode(b"[" + complete.replace(b"\n", b",") + b"]"), time.time() * 1000)


def merged(histograms: Iterable[HdrHistogram]) -> HdrHistogram:
    """One histogram holding every value of `histograms`."""
    into = HdrHistogram(1, 600_000, 3)
    for histogram in histograms:
        into.add(histogram)
    return into


def merged_latencies(
    truths: Iterable[SinkTruth],
) -> tuple[HdrHistogram, dict[str, HdrHistogram], HdrHistogram]:
    """End-to-end latency and per-stage lag over every sink, one histogram each, and the warm-up's latency."""
    truths = list(truths)
    stages = dict.fromkeys(stage for truth in truths for stage in truth.stage_lag)
    stage_lag = {stage: merged(t.stage_lag[stage] for t in truths if stage in t.stage_lag) for stage in stages}
    return merged(t.histogram for t in truths), stage_lag, merged(t.warmup_histogram for t in truths)


def sink_counts(truths: dict[str, SinkTruth], accepted: set[str]) -> dict[str, dict[str, int]]:
    """Per sink: accepted events delivered and missing, deliveries the client never heard of, extra copies."""
    return {
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


async def read_batch_shapes(urls: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per stage, from its /metrics: batches handled, mean events per batch, and mean ms per batch in each
    step of the commit sequence. At a fixed rate, fewer and larger batches mean less per-batch overhead."""
    from prometheus_client.parser import text_string_to_metric_families

    shapes: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for label, url in urls.items():
            try:
                async with session.get(url) as resp:
                    text = await resp.text()
            except (aiohttp.ClientError, TimeoutError):
                continue
            sums: dict[str, float] = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in ("hifi_batch_events_sum", "hifi_batch_events_count"):
                        sums[sample.name.removeprefix("hifi_batch_events_")] = sample.value
                    elif sample.name.startswith("hifi_batch_phase_seconds_") and not sample.name.endswith("_bucket"):
                        kind = sample.name.removeprefix("hifi_batch_phase_seconds_")
                        sums[f"{sample.labels['phase']}_{kind}"] = sample.value
            batches = sums.get("count", 0.0)
            if not batches:
                continue
            events = int(sums.get("sum", 0.0))
            shape = {"batches": int(batches), "events": events, "events_per_batch": round(events / batches, 1)}
            for key in sorted(sums):
                if key.endswith("_sum") and sums.get(key.removesuffix("_sum") + "_count"):
                    phase = key.removesuffix("_sum")
                    shape[f"{phase}_ms"] = round(1000 * sums[key] / sums[f"{phase}_count"], 2)
            shapes[label] = shape
    return shapes


def auditor_vs_truth(summary: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The auditor's own lag and loss beside the sinks' ground truth, and by how much they differ.

    The auditor's lag runs from the collector's ingest to the sender's ack, the bench's from the client's
    intended send time to the receipt: the difference is the client-to-collector leg plus the receiver's
    side. Its counts include its canaries, taken out here. Its lag covers the whole run, warm-up included,
    so it is set beside the sinks' p95 over the whole run."""
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
            "p95_ms": None if p95 is None else p95 - result["whole_run_p95_ms"],
        },
    }


DRAIN_IDLE_S = 10.0
DRAIN_MAX_S = 300.0


Progress = Callable[[], Awaitable[tuple[int, bool]]]  # events received over the sinks; all accepted arrived


def local_progress(sinks: list[SinkTruth], accepted: set[str]) -> Progress:
    """`drain`'s view of sinks in this process."""

    async def progress() -> tuple[int, bool]:
        return sum(len(s.seen) for s in sinks), all(accepted <= s.seen.keys() for s in sinks)

    return progress


async def drain(progress: Progress) -> bool:
    """After the load: wait while the sinks still receive, so a backlog is delivered late (and counted
    in the latencies) rather than reported missing. Stops when every accepted event reached every sink
    (True), after `DRAIN_IDLE_S` without a new event, or after `DRAIN_MAX_S` (False: `missing` then holds
    what was still undelivered, in the topics or lost)."""
    started = last_progress = time.monotonic()
    received, complete = await progress()
    while not complete:
        now = time.monotonic()
        if now - last_progress > DRAIN_IDLE_S or now - started > DRAIN_MAX_S:
            return False
        await asyncio.sleep(0.5)
        now_received, complete = await progress()
        if now_received > received:
            received, last_progress = now_received, time.monotonic()
    return True


def redis_pid(redis: LocalRedis) -> int | None:
    """The Redis server's pid: from the pid file of one this tooling started, else by its port."""
    if redis.pid_file.exists():
        return int(redis.pid_file.read_text())
    found = subprocess.run(
        ["pgrep", "-f", f"redis-server.*:{redis.port}"], capture_output=True, text=True
    ).stdout.split()
    return int(found[0]) if found else None
