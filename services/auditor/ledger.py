"""The auditor's bookkeeping: the loss ledger (the on-time SLI and lag histograms are in sli.py).

Pure data structures, fed by `services.auditor.app` from the tallies and receipts topics, so they
can be tested without a broker.

Reconciliation of one (tenant, 10 s event-time bucket), per sink the tenant subscribes to, once the
bucket has settled (its end + `settle_s`):

    accepted = delivered + deduplicated + dead-lettered (any stage) + unrouted + filtered (this sink)
               + quarantined

The router passes an event on to a sink unless that sink's filter took it out (`filtered:<sinks>`
outcomes, shared.audit.filtered_outcome): the router->sender hop expects the rest.

`delivered` counts sink acknowledgements, events the delivered ledger had already seen (their
first delivery's tally was lost in a crash) and canaries a sink drops. Each hop is also checked on
its own (a stage read fewer events than its upstream stage passed on), so copies a replay added at
one hop cannot hide events missing at another: the shortfall is the larger of the two, and is
placed at the first short hop. Tallies are counted by the source offsets they cover, each offset
once, in whatever order they arrive (`OffsetRanges`). A shortfall starts
`unconfirmed`: the auditor then compares it with that stage's consumer lag. Events still waiting in
the stage's input topic are `overdue` (late, not lost: the SLO burn alert covers them); a shortfall
the backlog cannot explain is **loss**, and pages. An excess
is **surplus** (copies a crash replayed that a later stage removed), reported but not paged.
Tallies for an already settled bucket are **late**: the bucket is reconciled again and the late count
is kept with it.

Quarantined events are also counted per tenant, type and rule (`QuarantineCounts`, bounded), from the
notes of the deduplicator's tallies, each source offset once: since the auditor started, and per bucket
(for as long as the ledger holds the bucket), so an operator sees when violations started.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from shared import pipeline
from shared.audit import Run, Tally, as_tally, bucket_of, filtered_sinks
from shared.outcome import DELIVERED, REPLAYED, Outcome

COLLECTOR = pipeline.COLLECTOR.name
ACCEPTING = (COLLECTOR, "canary", "replay")  # replay: failed events re-submitted (shared/quarantine.py)
HOPS = tuple(s.name for s in pipeline.HOPS)  # each tallies what it read, passed on and dead-lettered
DEDUPLICATOR, ROUTER = pipeline.DEDUPLICATOR.name, pipeline.ROUTER.name  # they drop duplicates, unrouted events
# DELIVERED: what a sender counts as delivered. REPLAYED: `hifi replay` traffic in a sender's input, counted
# apart (totals), never in the live reconciliation (`replay_dlq` as `dlq` would settle a live event it is not).


def live_reads(counts: dict[str, int]) -> int:
    """A stage's reads of live traffic: `hifi replay` traffic is counted apart (REPLAYED)."""
    return sum(n for outcome, n in counts.items() if outcome not in REPLAYED)


def routed_to(router_counts: dict[str, int], sink: str) -> tuple[int, int]:
    """(filtered out for `sink`, passed on to `sink`) among what the router tallied as routed."""
    filtered, passed = 0, router_counts.get(Outcome.OUT, 0)
    for outcome, n in router_counts.items():
        sinks = filtered_sinks(outcome)
        if sink in sinks:
            filtered += n
        elif sinks:
            passed += n
    return filtered, passed


class OffsetRanges:
    """The offsets of one source partition a stage's tallies covered, as sorted disjoint [start, end) ranges.

    A tally counts only offsets no earlier tally covered: a batch replayed after a crash is counted
    once, and a tally re-sent after later ones landed still counts. Past `max_ranges` (gaps nothing
    will fill, e.g. transaction markers) the two oldest ranges merge, so memory stays bounded.
    """

    def __init__(self, max_ranges: int = 1000) -> None:
        self.ranges: list[list[int]] = []
        self.max_ranges = max_ranges

    def add(self, start: int, end: int) -> list[tuple[int, int]]:
        """Cover [start, end); return the parts of it that were not covered before."""
        new: list[tuple[int, int]] = []
        cursor = start
        for lo, hi in self.ranges:
            if hi <= cursor:
                continue
            if lo >= end:
                break
            if lo > cursor:
                new.append((cursor, lo))
            cursor = max(cursor, hi)
            if cursor >= end:
                break
        if cursor < end:
            new.append((cursor, end))
        if new:
            self._insert(start, end)
        return new

    def _insert(self, start: int, end: int) -> None:
        merged: list[list[int]] = []
        placed = False
        for lo, hi in self.ranges:
            if hi < start or (placed and lo > end):
                merged.append([lo, hi])
            elif lo > end:
                merged.append([start, end])
                merged.append([lo, hi])
                placed = True
            else:  # overlapping or adjacent: absorb
                start, end = min(start, lo), max(end, hi)
        if not placed:
            merged.append([start, end])
            merged.sort()
        while len(merged) > self.max_ranges:
            merged[0:2] = [[merged[0][0], merged[1][1]]]
        self.ranges = merged


OTHER = "(other)"  # the label past a tenant's cap of distinct types, or a type's cap of distinct rules
NO_BREAKDOWN = "(no breakdown)"  # quarantined by a deduplicator from before the per type and rule note


class QuarantineCounts:
    """One tenant's quarantined events per type, and per type and rule (an event breaking several rules
    counts once under each). At most `max_labels` types, and rules per type; the rest count under OTHER,
    so a tenant sending ever new types cannot grow the auditor's memory."""

    def __init__(self, max_labels: int) -> None:
        self.max_labels = max_labels
        self.events: dict[str, int] = {}
        self.rules: dict[str, dict[str, int]] = {}

    def add(self, event_type: str, rules: list[str]) -> tuple[str, list[str]]:
        """Count one event; return the labels it was counted under (OTHER past a cap)."""
        event_type = bounded(self.events, event_type, self.max_labels)
        self.events[event_type] = self.events.get(event_type, 0) + 1
        per_rule = self.rules.setdefault(event_type, {})
        labels = []
        for rule in rules:
            rule = bounded(per_rule, rule, self.max_labels)
            per_rule[rule] = per_rule.get(rule, 0) + 1
            labels.append(rule)
        return event_type, labels

    def to_json(self) -> dict[str, Any]:
        return {t: {"events": n, "rules": dict(self.rules.get(t, {}))} for t, n in self.events.items()}


def bounded(seen: dict[str, int], label: str, max_labels: int) -> str:
    """`label`, or OTHER once `seen` holds `max_labels` labels besides OTHER."""
    if label in seen or len(seen) - (OTHER in seen) < max_labels:
        return label
    return OTHER


@dataclass
class Bucket:
    counts: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    settled: bool = False
    late: int = 0
    quarantine: QuarantineCounts | None = None  # its quarantined events per type and rule


def bucket_of_offset(first: int, runs: list[Run], offset: int) -> tuple[str, int] | None:
    """The (tenant, bucket) of the run of a tally (starting at source offset `first`) that covers `offset`."""
    for run in runs:
        if first <= offset < first + run.count:
            return run.tenant, run.bucket
        first += run.count
    return None


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
    quarantined: dict[str, Any] = field(default_factory=dict)  # the bucket's QuarantineCounts, as JSON

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class LossLedger:
    """Counts per (stage, tenant, bucket, outcome), each source offset counted once."""

    def __init__(
        self,
        subscribers: Callable[[str], tuple[str, ...]],
        bucket_s: int,
        settle_s: float,
        max_quarantine_labels: int = 100,
    ) -> None:
        self.subscribers = subscribers
        self.bucket_s = bucket_s
        self.settle_s = settle_s
        self.buckets: dict[tuple[str, int], Bucket] = {}
        self.covered: dict[tuple[str, str, int], OffsetRanges] = {}  # (stage, topic, partition) -> offsets counted
        self.reports: dict[tuple[str, str, int], LossReport] = {}
        self.surplus: dict[tuple[str, str, int], int] = {}
        self.totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.replayed = 0
        self.settled = 0
        self.trust_from = 0  # buckets before this (epoch s) may have tallies from before the auditor read on
        self.max_quarantine_labels = max_quarantine_labels
        # tenant -> per type and rule, since the auditor started (per bucket too: Bucket.quarantine)
        self.quarantine: dict[str, QuarantineCounts] = {}
        # Offsets whose quarantine breakdown was counted, apart from `covered`: a split tally's events may ride
        # in another part than their runs.
        self.quarantine_seen: dict[tuple[str, str, int], OffsetRanges] = {}

    def add_tally(self, value: Tally | dict[str, Any]) -> list[tuple[str, int]]:
        """Count a tally; return the (tenant, bucket) keys that were already settled (late counts)."""
        tally = as_tally(value)
        stage = tally.stage
        fresh: list[tuple[int, int]] | None = None  # offsets not counted before; None: no offsets (collector)
        offset = 0
        if tally.topic is not None:
            key = (stage, tally.topic, tally.partition or 0)
            first = tally.first or 0
            ranges = self.covered.setdefault(key, OffsetRanges())
            fresh = ranges.add(first, first + tally.count)
            offset = first
        late: list[tuple[str, int]] = []
        for run in tally.runs:
            n = run.count
            if fresh is not None:
                new = sum(max(0, min(hi, offset + n) - max(lo, offset)) for lo, hi in fresh)
                self.replayed += n - new
                offset += n
                n = new
                if n == 0:
                    continue
            self.totals[stage][run.outcome] += n
            bucket = self.buckets.setdefault((run.tenant, run.bucket), Bucket())
            bucket.counts[stage][run.outcome] += n
            if bucket.settled:
                bucket.late += n
                late.append((run.tenant, run.bucket))
        if fresh is not None:
            self._count_quarantined(key, tally)
        return late

    def _count_quarantined(self, key: tuple[str, str, int], tally: Tally) -> None:
        """The breakdown of the quarantined events a tally lists (`shared.quarantine`), each offset once."""
        for row in tally.event_rows():  # a malformed row costs its breakdown, never the counts of the rest
            if row.outcome != Outcome.QUARANTINED:
                continue
            seen = self.quarantine_seen.setdefault(key, OffsetRanges())
            if not seen.add(row.offset, row.offset + 1):
                continue  # a replayed batch's tally
            counts = self.quarantine.get(row.tenant)
            if counts is None:
                counts = self.quarantine[row.tenant] = QuarantineCounts(self.max_quarantine_labels)
            note = row.note or {}
            event_type, rules = str(note.get("event_type", NO_BREAKDOWN)), [str(r) for r in note.get("rules", ())]
            # a bucket counts under the tenant's labels: its own cap per bucket would hold ~360x as many
            event_type, rules = counts.add(event_type, rules)
            where = bucket_of_offset(tally.first or 0, tally.runs, row.offset) or self._bucket_of_row(row.tenant, note)
            if where is not None:
                bucket = self.buckets.setdefault(where, Bucket())
                if bucket.quarantine is None:
                    bucket.quarantine = QuarantineCounts(self.max_quarantine_labels)
                bucket.quarantine.add(event_type, rules)

    def _bucket_of_row(self, tenant: str, note: dict[str, Any]) -> tuple[str, int] | None:
        """A row's bucket from its ingest time, as its tally's runs bucketed it (`shared.audit.batch_tallies`):
        a split tally's rows may ride in a piece whose runs do not cover them."""
        ingest_ts = note.get("ingest_ts")
        if not isinstance(ingest_ts, int | float) or ingest_ts <= 0:
            return None  # bucketed by the message's timestamp, which the row does not carry
        return tenant, bucket_of(ingest_ts, self.bucket_s)

    def quarantined(self) -> dict[str, dict[str, Any]]:
        """Quarantined events per tenant, type and rule: {tenant: {type: {events, rules: {rule: n}}}}."""
        return {tenant: counts.to_json() for tenant, counts in sorted(self.quarantine.items())}

    def quarantined_by_bucket(self) -> dict[str, dict[int, dict[str, Any]]]:
        """Quarantined events per tenant, bucket (start, epoch s), type and rule, of the buckets still held."""
        out: dict[str, dict[int, dict[str, Any]]] = {}
        for (tenant, start), bucket in sorted(self.buckets.items()):
            if bucket.quarantine is not None:
                out.setdefault(tenant, {})[start] = bucket.quarantine.to_json()
        return out

    def gaps(self) -> list[tuple[str, str, int, int, int]]:
        """Offsets between two ranges a stage's tallies covered: (stage, topic, partition, start, end).

        Either a tally still on its way (a re-sent batch) or input the stage never read: the auditor
        tells them apart by the stage's committed offset and time."""
        return [
            (stage, topic, partition, before[1], after[0])
            for (stage, topic, partition), covered in self.covered.items()
            for before, after in zip(covered.ranges, covered.ranges[1:], strict=False)
        ]

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
        accepted = sum(c[s][Outcome.ACCEPTED] for s in ACCEPTING)
        upstream_dlq = sum(c[s][Outcome.DLQ] for s in HOPS)
        found = []
        for sink in self.subscribers(tenant):
            sender = pipeline.SENDER.label(sink)
            delivered = sum(c[sender][o] for o in DELIVERED)
            filtered, routed = routed_to(c[ROUTER], sink)
            accounted = (
                delivered
                + c[sender][Outcome.DLQ]
                + upstream_dlq
                + c[DEDUPLICATOR][Outcome.DUP]
                + c[ROUTER][Outcome.UNROUTED]
                + filtered
            )
            accounted += c[DEDUPLICATOR][Outcome.QUARANTINED]
            key = (tenant, sink, bucket_start)
            path = [*HOPS, sender]
            hops = [(COLLECTOR, accepted, path[0], sum(c[path[0]].values()))] + [
                (
                    up,
                    routed if up == ROUTER else c[up][Outcome.OUT],
                    down,
                    sum(n for o, n in c[down].items() if o not in REPLAYED),
                )
                for up, down in pairwise(path)
            ]
            # Per hop, so copies a replay added at one hop cannot hide events missing at another.
            short = [(up, passed, down, read) for up, passed, down, read in hops if read < passed]
            lost = max(accepted - accounted, sum(passed - read for _, passed, _, read in short))
            if accounted + lost > accepted:
                self.surplus[key] = accounted + lost - accepted
            else:
                self.surplus.pop(key, None)
            if lost <= 0:
                if key in self.reports:  # late events filled the gap
                    self.reports[key].lost = 0
                    self.reports[key].late = bucket.late
                    self.reports[key].status = "recovered"
                continue
            stage, detail = "unknown", "every hop balances; counts diverge inside a stage"
            if short:
                upstream, passed, stage, read = short[0]
                detail = f"{upstream} passed on {passed}, {stage} read {read}"
            previous = self.reports.get(key)
            report = LossReport(tenant, sink, bucket_start, accepted, accounted, lost, stage, detail, bucket.late)
            report.quarantined = bucket.quarantine.to_json() if bucket.quarantine is not None else {}
            if previous is not None and previous.status in ("lost", "overdue") and previous.stage == stage:
                report.status = previous.status
            self.reports[key] = report
            found.append(report)
        return found

    def filtered(self) -> dict[str, dict[str, int]]:
        """Events each sink's filter took out, per sink and tenant (every bucket still held)."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for (tenant, _), bucket in self.buckets.items():
            for outcome, n in bucket.counts[ROUTER].items():
                for sink in filtered_sinks(outcome):
                    out[sink][tenant] += n
        return {sink: dict(tenants) for sink, tenants in out.items()}

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
