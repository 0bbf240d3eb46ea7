"""The auditor's bookkeeping: the loss ledger, the on-time SLI and sliding lag histograms.

Pure data structures, fed by `services.auditor.app` from the tallies and receipts topics, so they
can be tested without a broker.

Reconciliation of one (tenant, 10 s event-time bucket), per sink the tenant subscribes to, once the
bucket has settled (its end + `settle_s`):

    accepted = delivered + deduplicated + dead-lettered (any stage) + unrouted

`delivered` counts sink acknowledgements, events the delivered ledger had already seen (their
first delivery's tally was lost in a crash) and canaries a sink drops. A shortfall is placed at the
first hop where a stage read fewer events than its upstream stage passed on. It starts
`unconfirmed`: the auditor then compares it with that stage's consumer lag. Events still waiting in
the stage's input topic are `overdue` (late, not lost: the SLO burn alert covers them); a shortfall
the backlog cannot explain is **loss**, and pages. An excess
is **surplus** (copies a crash replayed that a later stage removed), reported but not paged.
Tallies for an already settled bucket are **late**: the bucket is reconciled again and the late count
is kept with it.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

ACCEPTING = ("collector", "canary")
STAGES = ("enricher", "deduplicator", "router")
DELIVERED = ("delivered", "skipped", "canary_dropped")


class SlidingHdr:
    """Lag percentiles over the last `span_s`: a ring of `slots` HDR histograms, merged on read."""

    def __init__(self, span_s: float, slots: int = 12) -> None:
        self.slot_s = span_s / slots
        self.slots: deque[tuple[int, HdrHistogram]] = deque(maxlen=slots)

    def record(self, lag_ms: float, now: float | None = None) -> None:
        slot = int((now if now is not None else time.time()) // self.slot_s)
        if not self.slots or self.slots[-1][0] != slot:
            self.slots.append((slot, HdrHistogram(1, 3_600_000, 2)))
        self.slots[-1][1].record_value(max(1, min(int(lag_ms), 3_600_000)))

    def percentiles(self, now: float | None = None) -> dict[str, float]:
        oldest = int((now if now is not None else time.time()) // self.slot_s) - (self.slots.maxlen or 1) + 1
        merged = HdrHistogram(1, 3_600_000, 2)
        for slot, histogram in self.slots:
            if slot >= oldest:
                merged.add(histogram)
        count = merged.get_total_count()
        if count == 0:
            return {"count": 0}
        return {
            "count": count,
            "p50_ms": merged.get_value_at_percentile(50),
            "p95_ms": merged.get_value_at_percentile(95),
            "p99_ms": merged.get_value_at_percentile(99),
            "max_ms": merged.get_max_value(),
        }


class OnTimeWindow:
    """On-time and total counts in 10 s slots for the last hour: the SLI and its burn rates."""

    SLOT_S = 10

    def __init__(self) -> None:
        self.slots: deque[list[int]] = deque(maxlen=360)  # [slot, on_time, total]

    def add(self, on_time: int, total: int, now: float | None = None) -> None:
        slot = int((now if now is not None else time.time()) // self.SLOT_S)
        if not self.slots or self.slots[-1][0] != slot:
            self.slots.append([slot, 0, 0])
        self.slots[-1][1] += on_time
        self.slots[-1][2] += total

    def ratio(self, window_s: float, now: float | None = None) -> tuple[float | None, int]:
        oldest = int((now if now is not None else time.time()) // self.SLOT_S) - int(window_s // self.SLOT_S) + 1
        on_time = total = 0
        for slot, good, count in self.slots:
            if slot >= oldest:
                on_time += good
                total += count
        return (on_time / total if total else None), total


def burn_rate(ratio: float | None, target: float) -> float:
    """How fast the error budget burns: 1.0 spends exactly the budget over the SLO period."""
    return 0.0 if ratio is None else (1.0 - ratio) / (1.0 - target)


@dataclass
class SinkSLI:
    lag_1m: SlidingHdr = field(default_factory=lambda: SlidingHdr(60, 12))
    lag_1h: SlidingHdr = field(default_factory=lambda: SlidingHdr(3600, 12))
    on_time: OnTimeWindow = field(default_factory=OnTimeWindow)
    delivered: int = 0
    late: int = 0
    lost: int = 0
    canaries: int = 0


@dataclass
class Bucket:
    counts: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    settled: bool = False
    late: int = 0


@dataclass
class LossReport:
    tenant: str
    sink: str
    bucket: int
    accepted: int
    accounted: int
    lost: int
    stage: str
    detail: str
    late: int = 0
    status: str = "unconfirmed"  # -> overdue (still waiting upstream) | lost | recovered (late events)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class LossLedger:
    """Counts per (stage, tenant, bucket, outcome), each source offset counted once."""

    def __init__(self, subscribers: Callable[[str], tuple[str, ...]], bucket_s: int, settle_s: float) -> None:
        self.subscribers = subscribers
        self.bucket_s = bucket_s
        self.settle_s = settle_s
        self.buckets: dict[tuple[str, int], Bucket] = {}
        self.high_water: dict[tuple[str, str, int], int] = {}  # (stage, topic, partition) -> last offset counted
        self.reports: dict[tuple[str, str, int], LossReport] = {}
        self.surplus: dict[tuple[str, str, int], int] = {}
        self.totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.replayed = 0
        self.settled = 0
        self.trust_from = 0  # buckets before this (epoch s) may have tallies from before the auditor read on

    def add_tally(self, tally: dict[str, Any]) -> list[tuple[str, int]]:
        """Count a tally; return the (tenant, bucket) keys that were already settled (late counts)."""
        stage = tally["stage"]
        skip = 0
        if "topic" in tally:
            key = (stage, tally["topic"], tally["partition"])
            first = tally["first"]
            counted = self.high_water.get(key, first - 1)
            skip = max(0, counted - first + 1)
        offset_count = 0
        late: list[tuple[str, int]] = []
        for tenant, bucket_start, outcome, n in tally["runs"]:
            offset_count += n
            if skip >= n:
                skip -= n
                self.replayed += n
                continue
            n -= skip
            self.replayed += skip
            skip = 0
            self.totals[stage][outcome] += n
            bucket = self.buckets.setdefault((tenant, bucket_start), Bucket())
            bucket.counts[stage][outcome] += n
            if bucket.settled:
                bucket.late += n
                late.append((tenant, bucket_start))
        if "topic" in tally:
            key = (stage, tally["topic"], tally["partition"])
            self.high_water[key] = max(self.high_water.get(key, -1), tally["first"] + offset_count - 1)
        return late

    def due(self, now_s: float) -> list[tuple[str, int]]:
        return [
            key
            for key, bucket in self.buckets.items()
            if not bucket.settled and key[1] + self.bucket_s + self.settle_s <= now_s
        ]

    def reconcile(self, tenant: str, bucket_start: int) -> list[LossReport]:
        """Settle one bucket; return the loss found per sink (possibly none)."""
        bucket = self.buckets[(tenant, bucket_start)]
        first_settle = not bucket.settled
        bucket.settled = True
        if first_settle:
            self.settled += 1
        if tenant == "?" or bucket_start < self.trust_from:
            return []
        c = bucket.counts
        accepted = sum(c[s]["accepted"] for s in ACCEPTING)
        stage_in = {s: sum(c[s].values()) for s in STAGES}
        upstream_dlq = c["enricher"]["dlq"] + c["deduplicator"]["dlq"] + c["router"]["dlq"]
        found = []
        for sink in self.subscribers(tenant):
            sender = f"sender.{sink}"
            delivered = sum(c[sender][o] for o in DELIVERED)
            accounted = delivered + c[sender]["dlq"] + upstream_dlq + c["deduplicator"]["dup"] + c["router"]["unrouted"]
            key = (tenant, sink, bucket_start)
            if accounted > accepted:
                self.surplus[key] = accounted - accepted
            lost = accepted - accounted
            if lost <= 0:
                if key in self.reports:  # late events filled the gap
                    self.reports[key].lost = 0
                    self.reports[key].late = bucket.late
                    self.reports[key].status = "recovered"
                continue
            hops = [
                ("collector", accepted, "enricher", stage_in["enricher"]),
                ("enricher", c["enricher"]["out"], "deduplicator", stage_in["deduplicator"]),
                ("deduplicator", c["deduplicator"]["out"], "router", stage_in["router"]),
                ("router", c["router"]["out"], sender, sum(c[sender].values())),
            ]
            stage, detail = "unknown", "every hop balances; counts diverge inside a stage"
            for upstream, passed, downstream, read in hops:
                if read < passed:
                    stage = downstream
                    detail = f"{upstream} passed on {passed}, {downstream} read {read}"
                    break
            previous = self.reports.get(key)
            report = LossReport(tenant, sink, bucket_start, accepted, accounted, lost, stage, detail, bucket.late)
            if previous is not None and previous.status in ("lost", "overdue") and previous.stage == stage:
                report.status = previous.status
            self.reports[key] = report
            found.append(report)
        return found

    def pending(self) -> list[LossReport]:
        """Shortfalls not yet confirmed as loss."""
        return [r for r in self.reports.values() if r.lost > 0 and r.status in ("unconfirmed", "overdue")]

    def forget_before(self, bucket_start: int) -> None:
        for key in [k for k, b in self.buckets.items() if b.settled and k[1] < bucket_start]:
            del self.buckets[key]
        for key in [k for k in self.reports if k[2] < bucket_start]:
            del self.reports[key]
        for key in [k for k in self.surplus if k[2] < bucket_start]:
            del self.surplus[key]

    def lost_by_stage(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for report in self.reports.values():
            if report.status == "lost":
                out[report.stage] += report.lost
        return dict(out)
