"""Chaos verification: what each sink should hold against what it holds (missing, duplicates, and
whether a duplicate falls in a sender's kill window), dead letters against the pills and refused events,
and late seconds per fault window (mixed into `ChaosRun`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer

from devtools.chaos_faults import SLA_MS, FaultRecord, Kill
from devtools.chaos_truth import WebhookTruth
from shared import pipeline as layout
from shared.dlq import DeadLetterQueues

if TYPE_CHECKING:
    from devtools.chaos_truth import SinkTruth


def kills_of_sender(kills: list[Kill], sink: str) -> list[Kill]:
    """The kills of any worker of sink `sink`'s sender: `sender.<sink>`, or a second one, `sender.<sink>#2`."""
    return [k for k in kills if k.label.split("#")[0] == f"sender.{sink}"]


class ChaosVerify(FaultRecord):
    """The run measured against ground truth: `drain` waits for the sinks, `report` says whether it passed."""

    rate: float
    faulted_sink: str
    sinks: dict[str, SinkTruth]
    refused_by_faulted: Callable[[str], bool] | None
    namespace: str

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
            kills = kills_of_sender(self.kills, name)
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
            out["late_s_by_second_of_window"] = self._late_by_second_of_window(self.sinks["healthy"])
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
        first copy later than the SLA), the late seconds before the fault began (the start-up and any scale-out:
        the machine, not a fault) and the late seconds after it began outside every window."""
        late = [ingest for ingest, arrived in _first_copies(sink) if arrived - ingest > SLA_MS]
        out: dict[str, float] = {}
        inside: set[int] = set()
        for name, start, end in self.windows:
            hits = [i for i, ingest in enumerate(late) if start <= ingest <= end + 3_000]
            inside.update(hits)
            out[name] = round(len(hits) / self.rate, 2)
        before = {i for i, ingest in enumerate(late) if i not in inside and ingest < (self.fault_start_ms or 0)}
        out["before the fault"] = round(len(before) / self.rate, 2)
        out["outside windows"] = round((len(late) - len(inside) - len(before)) / self.rate, 2)
        return out

    def _late_by_second_of_window(self, sink: SinkTruth) -> dict[str, dict[int, float]]:
        """Where in each fault window its late seconds were: per second of ingest after the window began (only
        seconds with late events), e.g. a broker kill's stall apart from its restart 30 s later."""
        first = _first_copies(sink)
        out: dict[str, dict[int, float]] = {}
        for name, start, end in self.windows:
            seconds: dict[int, int] = {}
            for ingest, arrived in first:
                if start <= ingest <= end + 3_000 and arrived - ingest > SLA_MS:
                    second = int((ingest - start) // 1000)
                    seconds[second] = seconds.get(second, 0) + 1
            out[name] = {second: round(n / self.rate, 2) for second, n in sorted(seconds.items())}
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


def _first_copies(sink: SinkTruth) -> list[tuple[float, float]]:
    """(ingest time, arrival time) in ms of the first copy of each event the sink received."""
    first: dict[str, tuple[float, float]] = {}
    for e, arrived in zip(sink.received, sink.arrival_ms, strict=True):
        first.setdefault(e["event_id"], (e["ingest_ts"], arrived))
    return list(first.values())
