"""Chaos faults: kill -9, restart, crash under a supervisor, redeploy, poison pills, and where the
broker leaders are; the methods a scenario calls on its run (mixed into `ChaosRun`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgpack
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

if TYPE_CHECKING:
    from devtools.chaos_truth import LoadGenerator, SinkTruth
    from devtools.kafka import LocalKafka
    from devtools.pipeline import PipelineProcesses
    from shared.topics import Topics


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


SLA_MS = 1000.0  # an event later than this at its sink is late (the on-time SLI)


def on_time_over(sink: SinkTruth, now_ms: float, span_s: float) -> bool:
    """The sink has received events for longer than `span_s`, and each it received in the last `span_s` arrived
    within the SLA. Reads from the end: a webhook receiver appends in arrival order."""
    cutoff = now_ms - span_s * 1000
    if not sink.arrival_ms or sink.arrival_ms[0] >= cutoff:
        return False
    for event, arrived in zip(reversed(sink.received), reversed(sink.arrival_ms), strict=True):
        if arrived < cutoff:
            return True
        if arrived - event["ingest_ts"] > SLA_MS:
            return False
    return True


class FaultRecord:
    """The run's state its faults write and its verification reads (`ChaosRun` sets them)."""

    kafka: LocalKafka
    load: LoadGenerator
    topics: Topics
    pills: int
    clean_exit: bool
    kills: list[Kill]
    fault_start_ms: float
    fault_end_ms: float
    notes: list[str]
    windows: list[tuple[str, float, float]]
    sinks: dict[str, SinkTruth]


class ChaosFaults(FaultRecord):
    """What a scenario does to its run; each fault records its kills, spans and notes for the report."""

    pipeline: PipelineProcesses

    async def until_on_time(self, steady_s: float = 10.0, bound_s: float = 60.0) -> None:
        """Wait until the healthy sink has been on time for `steady_s` (at most `bound_s`), so a fault's window
        counts what the fault cost, not a start-up's or a scale-out's backlog still draining. Noted either way."""
        began = time.monotonic()
        healthy = self.sinks["healthy"]
        while not on_time_over(healthy, time.time() * 1000, steady_s):
            if time.monotonic() - began > bound_s:
                self.notes.append(f"not on time for {steady_s:.0f}s within {bound_s:.0f}s: the fault began anyway")
                return
            await asyncio.sleep(0.5)
        self.notes.append(f"on time for {steady_s:.0f}s before the fault ({time.monotonic() - began:.0f}s waited)")

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
        self.windows.append((f"kill -9 {label}", self.kills[-1].killed_ms, time.time() * 1000))

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
