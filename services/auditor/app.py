"""auditor: receipts and tallies in; lag, loss and the on-time SLI out, as an API, a dashboard,
Prometheus metrics and Sentry alerts.

The auditor is a read-only view: it reads the tallies and receipts topics with its own consumer
(every partition, no group, nothing committed), from one hour plus the settle delay back, so a
restarted auditor rebuilds the same state. Buckets older than where it started reading are not
reconciled (their early tallies were not read). Run one replica.

It also injects canaries: every `canary_interval_s` one flagged event per tenant, written to the raw
topic like the collector would, so lag and loss stay measured when traffic is quiet.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from faust import web
from mode import Service
from prometheus_client import Counter, Gauge, Histogram

from shared.alerts import Alerter, OutageClock
from shared.audit import Receipt, Tally, accepted_tally, as_receipt, as_tally, bucket_of, decode_receipt, decode_tally
from shared.codec import encode_event
from shared.dlq import DeadLetterQueues, UnknownStage, stage_input
from shared.errors import TransientError
from shared.event import Event, now_ms
from shared.metrics import LAG_BUCKETS_S
from shared.service import ServiceContext
from shared.trace import TraceIndex
from shared.web import add_common_views, denied

from .ledger import LossLedger, LossReport, SinkSLI, burn_rate

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
LOOKBACK_S = 3600.0


class Auditor:
    def __init__(self, ctx: ServiceContext, alerter: Alerter) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.audit = ctx.config.audit
        self.topics = ctx.topics
        self.alerter = alerter
        self.ledger = LossLedger(ctx.config.subscribers, self.audit.bucket_s, self.audit.settle_s)
        self.sli: dict[tuple[str, str], SinkSLI] = {}
        self.dlq_sizes: dict[str, int] = {}
        self.dlq_growing_since: dict[str, float] = {}
        self.canaries_sent = 0
        self.receipts = 0
        self.gap_seen: dict[tuple[str, str, int, int, int], float] = {}  # gap -> when first seen (epoch s)
        self.offset_gaps: dict[tuple[str, str, int, int, int], dict[str, Any]] = {}  # confirmed skipped input
        self.consumer: AIOKafkaConsumer | None = None  # the reader's, for end offsets
        self.queues = DeadLetterQueues(ctx.settings.broker, ctx.topics, list(ctx.config.sinks))
        # What tallies and receipts say about each event, for `hifi trace` and /trace (shared/trace.py).
        # Its own Redis URL: under maxmemory the index must not evict or starve the dedupe claims and ledgers.
        self.trace = TraceIndex(
            ctx.settings.trace_index_url, ctx.settings.namespace, self.audit.trace_ttl_s, registry=ctx.metrics.registry
        )
        self.broker_outage = OutageClock(
            alerter, "broker_unreachable", "the Kafka broker", self.audit.outage_alert_after_s
        )
        r = ctx.metrics.registry
        self.on_time_gauge = Gauge(
            "hifi_on_time_ratio", "Share of events delivered within SLA", ["tenant", "sink", "window"], registry=r
        )
        self.burn_gauge = Gauge(
            "hifi_slo_burn_rate", "Error-budget burn rate of the on-time SLO", ["tenant", "sink", "window"], registry=r
        )
        self.lost_counter = Counter(
            "hifi_events_lost", "Events the loss ledger found missing", ["tenant", "sink", "stage"], registry=r
        )
        self.dlq_gauge = Gauge("hifi_dlq_size", "Dead letters retained per stage", ["stage"], registry=r)
        self.quarantined_gauge = Gauge(
            "hifi_audit_quarantined_events",
            "Quarantined events the deduplicator's tallies listed, per type (bounded: '(other)')",
            ["tenant", "type"],
            registry=r,
        )
        self.quarantined_rule_gauge = Gauge(
            "hifi_audit_quarantined_by_rule",
            "Quarantined events per type and rule they broke; an event breaking several counts under each",
            ["tenant", "type", "rule"],
            registry=r,
        )
        self.lag_histogram = Histogram(
            "hifi_delivery_lag_seconds",
            "Sink acknowledgement minus ingest, from receipts",
            ["tenant", "sink"],
            buckets=LAG_BUCKETS_S,
            registry=r,
        )

    # -- input -----------------------------------------------------------------------------------

    def on_receipt(self, value: Receipt | dict[str, Any]) -> None:
        receipt = as_receipt(value)
        try:  # a malformed trace costs the trace, never the lag and SLI samples
            self.trace.add_receipt(receipt)
        except Exception:
            self.trace.unreadable += 1
            log.exception("auditor: receipt of %s unreadable for the trace index", receipt.sink)
        sink = receipt.sink
        acked = receipt.delivered_ts
        now = time.time()
        # Grouped per tenant first: the windows, SLI counters and Prometheus child are touched once per
        # tenant and distinct lag, not once per event (per event this was most of the auditor's own time).
        per_tenant: dict[str, tuple[dict[int, int], list[float], list[int]]] = {}
        for row in receipt.events:
            tenant, lag, canary = row.tenant, max(0.0, acked - row.ingest_ts), row.canary
            group = per_tenant.get(tenant)
            if group is None:
                group = per_tenant[tenant] = ({}, [], [0])
            whole_ms = max(1, min(int(lag), 3_600_000))
            group[0][whole_ms] = group[0].get(whole_ms, 0) + 1
            group[1].append(lag)
            group[2][0] += bool(canary)
        for tenant, (counts, lags, (canaries,)) in per_tenant.items():
            sli = self.sli.setdefault((tenant, sink), SinkSLI())
            sli.lag_1m.record_counts(counts, now)
            sli.lag_1h.record_counts(counts, now)
            sli.delivered += len(lags)
            sli.canaries += canaries
            histogram = self.lag_histogram.labels(tenant, sink)
            sla_ms = self.config.sla_ms(tenant, sink)
            on_time = 0
            for lag in lags:
                histogram.observe(lag / 1000)
                on_time += lag <= sla_ms
            sli.late += len(lags) - on_time
            sli.on_time.add(on_time, len(lags), now)
            self.receipts += len(lags)

    def on_tally(self, value: Tally | dict[str, Any]) -> None:
        tally = as_tally(value)
        for tenant, bucket in self.ledger.add_tally(tally):
            self.ledger.reconcile(tenant, bucket)
        try:  # after the counts: a malformed `events` row costs the trace, never the ledger
            self.trace.add_tally(tally)
        except Exception:
            self.trace.unreadable += 1
            log.exception("auditor: tally %s:%s unreadable for the trace index", tally.stage, tally.first)

    # -- periodic --------------------------------------------------------------------------------

    async def settle(self) -> None:
        now = time.time()
        for tenant, bucket in self.ledger.due(now):
            self.ledger.reconcile(tenant, bucket)
        await self._confirm_losses()
        await self._confirm_gaps(now)
        self.ledger.forget_before(int(now - LOOKBACK_S))
        self._show_quarantined()
        for (tenant, sink), sli in self.sli.items():
            for window, seconds in (("5m", 300), ("1h", 3600)):
                ratio, _ = sli.on_time.ratio(seconds, now)
                if ratio is not None:
                    self.on_time_gauge.labels(tenant, sink, window).set(ratio)
                self.burn_gauge.labels(tenant, sink, window).set(burn_rate(ratio, self.audit.slo_target))
            self._check_burn(tenant, sink, sli, now)

    def _show_quarantined(self) -> None:
        """The ledger's quarantine counts as gauges: its counts only grow, and its labels are capped."""
        for tenant, counts in self.ledger.quarantine.items():
            for event_type, n in counts.events.items():
                self.quarantined_gauge.labels(tenant, event_type).set(n)
            for event_type, rules in counts.rules.items():
                for rule, n in rules.items():
                    self.quarantined_rule_gauge.labels(tenant, event_type, rule).set(n)

    def _check_burn(self, tenant: str, sink: str, sli: SinkSLI, now: float) -> None:
        """Multi-window burn alert: both the 5 min and the 1 h rate above the threshold (SRE workbook)."""
        short, short_n = sli.on_time.ratio(300, now)
        long, _ = sli.on_time.ratio(3600, now)
        fast = burn_rate(short, self.audit.slo_target)
        slow = burn_rate(long, self.audit.slo_target)
        key = f"{tenant}/{sink}"
        if short_n >= 10 and fast > self.audit.burn_alert and slow > self.audit.burn_alert:
            self.alerter.fire(
                "slo_burn",
                f"on-time SLO of {key} burning {fast:.0f}x (5 min) and {slow:.0f}x (1 h) its budget; "
                f"on time: {short:.2%} over 5 min",
                key=key,
                burn_5m=round(fast, 2),
                burn_1h=round(slow, 2),
            )
        elif fast < self.audit.burn_alert / 2:
            self.alerter.resolve("slo_burn", key=key)

    async def _confirm_losses(self) -> None:
        """A shortfall is loss only if the stage it was placed at has no backlog that could hold it."""
        pending = self.ledger.pending()
        if not pending:
            return
        by_stage: dict[str, list[LossReport]] = {}
        for report in pending:
            by_stage.setdefault(report.stage, []).append(report)
        for stage, reports in by_stage.items():
            try:
                backlog = await self.backlog(stage)
            except Exception as exc:
                log.warning("auditor: cannot read the backlog of %s yet: %r", stage, exc)
                continue
            waiting = sum(r.lost for r in reports)
            for report in reports:
                if backlog >= waiting:
                    report.status = "overdue"
                else:
                    report.status = "lost"
                    self._loss_found(report)

    async def _confirm_gaps(self, now: float) -> None:
        """Offsets a stage's tallies skipped are input it never read, once its group committed past them
        and no tally filled them for `settle_s` (copies elsewhere cannot hide them, unlike a bucket's counts)."""
        self.gap_seen = {gap: self.gap_seen.get(gap, now) for gap in self.ledger.gaps()}
        for gap in [g for g in self.offset_gaps if g not in self.gap_seen]:  # a late tally filled it
            del self.offset_gaps[gap]
            self.alerter.resolve("offset_gap", key=f"{gap[0]}/{gap[1]}/{gap[2]}")
        by_stage: dict[str, list[tuple[str, str, int, int, int]]] = {}
        for gap, seen in self.gap_seen.items():
            if gap not in self.offset_gaps and now - seen >= self.audit.settle_s:
                by_stage.setdefault(gap[0], []).append(gap)
        for stage, gaps in by_stage.items():
            try:
                committed = await self.committed_offsets(stage)
            except Exception as exc:
                log.warning("auditor: cannot read the committed offsets of %s yet: %r", stage, exc)
                continue
            for gap in gaps:
                _, topic, partition, start, end = gap
                offset = committed.get(TopicPartition(topic, partition))
                if offset is None or offset < end:
                    continue
                self.offset_gaps[gap] = {
                    "stage": stage,
                    "topic": topic,
                    "partition": partition,
                    "first": start,
                    "count": end - start,
                    "committed": offset,
                }
                self.alerter.fire(
                    "offset_gap",
                    f"{stage} committed past offsets {start}..{end - 1} of {topic}[{partition}] without tallying "
                    f"them: {end - start} events it did not read",
                    key=f"{stage}/{topic}/{partition}",
                    stage=stage,
                    count=end - start,
                )

    async def committed_offsets(self, stage: str) -> dict[TopicPartition, int]:
        """The offsets the stage's consumer group committed, per partition."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.ctx.settings.broker, request_timeout_ms=5000)
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(self.topics.stage_group(stage))
        finally:
            await admin.close()
        return {tp: meta.offset for tp, meta in committed.items() if meta is not None and meta.offset >= 0}

    async def backlog(self, stage: str) -> int:
        """Events in the stage's input topic that its consumer group has not committed past."""
        if self.consumer is None:
            return 0
        try:
            topic = stage_input(self.topics, stage, list(self.config.sinks))
        except UnknownStage:
            return 0
        admin = AIOKafkaAdminClient(bootstrap_servers=self.ctx.settings.broker, request_timeout_ms=5000)
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(self.topics.stage_group(stage))
            described = await admin.describe_topics([topic])
        finally:
            await admin.close()
        partitions = [p["partition"] for t in described for p in t["partitions"]]
        tps = [TopicPartition(topic, p) for p in partitions]
        ends = await self.consumer.end_offsets(tps)
        starts = await self.consumer.beginning_offsets(tps)
        backlog = 0
        for tp in tps:
            meta = committed.get(tp)
            position = meta.offset if meta is not None and meta.offset >= 0 else starts[tp]
            backlog += max(0, ends[tp] - max(position, starts[tp]))  # deleted events are not waiting
        return backlog

    def _loss_found(self, report: LossReport) -> None:
        self.lost_counter.labels(report.tenant, report.sink, report.stage).inc(report.lost)
        sli = self.sli.setdefault((report.tenant, report.sink), SinkSLI())
        sli.lost += report.lost
        sli.on_time.add(0, report.lost)  # a lost event was not delivered on time
        self.alerter.fire(
            "loss_detected",
            f"{report.lost} events of tenant {report.tenant} for sink {report.sink} lost in bucket {report.bucket} "
            f"at {report.stage}: {report.detail}",
            key=report.sink,
            lost=report.lost,
            stage=report.stage,
            bucket=report.bucket,
        )

    async def probe_broker(self) -> None:
        """Can any bootstrap server be reached? Bounded, so a dead broker is noticed in seconds."""
        error: Exception | None = None
        for server in self.ctx.settings.broker.split(","):
            host, _, port = server.rpartition(":")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2.0)
                writer.close()
                self.broker_outage.ok()
                return
            except (OSError, TimeoutError) as exc:
                error = exc
        assert error is not None
        log.warning("auditor: broker unreachable: %r", error)
        self.broker_outage.failed(error)

    async def check_dlq(self) -> None:
        if self.broker_outage.since is not None:
            return  # the probe pages for that; Kafka clients would only hang here
        try:
            sizes = await asyncio.wait_for(self.queues.counts(), 10.0)
        except Exception as exc:
            log.warning("auditor: could not read DLQ sizes: %r", exc)
            return
        now = time.monotonic()
        for stage, size in sizes.items():
            self.dlq_gauge.labels(stage).set(size)
            before = self.dlq_sizes.get(stage)
            if before is not None and size > before:
                self.dlq_growing_since[stage] = now
                self.alerter.fire(
                    "dlq_growth",
                    f"dead letters of {stage} grew from {before} to {size}; see `hifi dlq show {stage}`",
                    level="warning",
                    key=stage,
                    size=size,
                )
            elif now - self.dlq_growing_since.get(stage, now) > 10 * self.audit.dlq_check_s:
                self.dlq_growing_since.pop(stage, None)
                self.alerter.resolve("dlq_growth", key=stage)
        self.dlq_sizes = sizes

    async def send_canaries(self, producer: Any) -> None:
        """One canary per tenant with sinks; it reaches each of them, so every tenant/sink pair is traced."""
        ingest = now_ms()
        bucket = bucket_of(ingest, self.audit.bucket_s)
        for tenant in self.config.tenants.values():
            if not tenant.sinks:
                continue
            event = Event(
                event_id=f"canary-{uuid.uuid4().hex}",
                type="hifi.canary",
                ts=ingest,
                tenant=tenant.name,
                device_id="hifi-canary",
                ingest_ts=ingest,
                canary=True,
            )
            event.stamp("collector")
            try:
                sent = await producer.send(self.topics.raw, event.partition_key, encode_event(event), None, None, None)
                await sent
                tally = accepted_tally("canary", tenant.name, bucket, 1)
                await (await producer.send(self.topics.tallies, b"canary", tally, None, None, None))
                self.canaries_sent += 1
            except Exception as exc:
                log.warning("auditor: canary for %s not sent: %r", tenant.name, exc)

    # -- output ----------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        now = time.time()
        sinks: dict[str, Any] = {}
        for (tenant, sink), sli in sorted(self.sli.items()):
            short, short_n = sli.on_time.ratio(300, now)
            long, long_n = sli.on_time.ratio(3600, now)
            sinks.setdefault(sink, {})[tenant] = {
                "sla_ms": self.config.sla_ms(tenant, sink),
                "lag_1m": sli.lag_1m.percentiles(now),
                "lag_1h": sli.lag_1h.percentiles(now),
                "on_time_5m": short,
                "on_time_1h": long,
                "events_5m": short_n,
                "events_1h": long_n,
                "burn_5m": round(burn_rate(short, self.audit.slo_target), 3),
                "burn_1h": round(burn_rate(long, self.audit.slo_target), 3),
                "delivered": sli.delivered,
                "late": sli.late,
                "lost": sli.lost,
                "canaries": sli.canaries,
            }
        ledger = self.ledger
        return {
            "at": now,
            "slo_target": self.audit.slo_target,
            "sinks": sinks,
            "loss": [
                r.to_json() for r in sorted(ledger.reports.values(), key=lambda r: r.bucket) if r.status == "lost"
            ],
            "overdue": [r.to_json() for r in ledger.reports.values() if r.status == "overdue"],
            "unconfirmed": [r.to_json() for r in ledger.pending() if r.status == "unconfirmed"],
            "lost_by_stage": ledger.lost_by_stage(),
            "filtered": ledger.filtered(),
            "quarantined": ledger.quarantined(),
            "surplus": sum(ledger.surplus.values()),
            "offset_gaps": sorted(self.offset_gaps.values(), key=lambda g: (g["stage"], g["topic"], g["first"])),
            "stage_totals": {stage: dict(outcomes) for stage, outcomes in sorted(ledger.totals.items())},
            "buckets_open": sum(1 for b in ledger.buckets.values() if not b.settled),
            "buckets_settled": ledger.settled,
            "replayed_offsets_ignored": ledger.replayed,
            "dlq": self.dlq_sizes,
            "canaries_sent": self.canaries_sent,
            "receipts": self.receipts,
            "alerts_active": [list(k) for k in self.alerter.active],
        }


class AuditReader(Service):
    """Reads tallies and receipts from every partition, from LOOKBACK_S back; commits nothing."""

    def __init__(self, auditor: Auditor) -> None:
        super().__init__()
        self.auditor = auditor
        self.consumer: AIOKafkaConsumer | None = None

    async def on_start(self) -> None:
        a = self.auditor
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=a.ctx.settings.broker, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await self.consumer.start()
        self.auditor.consumer = self.consumer

    async def on_stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        await self.auditor.trace.close()

    @Service.task
    async def _read(self) -> None:
        a = self.auditor
        consumer = self.consumer
        assert consumer is not None
        topics = [a.topics.tallies, a.topics.receipts]
        tps = []
        for topic in topics:
            for _ in range(60):
                partitions = consumer.partitions_for_topic(topic)
                if partitions:
                    break
                await consumer._client.force_metadata_update()
                await asyncio.sleep(0.5)
            tps += [TopicPartition(topic, p) for p in sorted(partitions or [])]
        consumer.assign(tps)
        start_ms = int(time.time() * 1000 - (LOOKBACK_S + a.audit.settle_s) * 1000)
        a.ledger.trust_from = int(start_ms // 1000) + a.audit.bucket_s
        found = await consumer.offsets_for_times(dict.fromkeys(tps, start_ms))
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, found[tp].offset if found.get(tp) is not None else ends[tp])
        log.info("auditor: reading %s from %s", topics, time.strftime("%H:%M:%S", time.localtime(start_ms / 1000)))
        while not self.should_stop:
            try:  # returns empty while the broker is away; the auditor's probe reports that
                batch = await consumer.getmany(timeout_ms=200, max_records=2000)
            except Exception:
                log.exception("auditor: reading tallies and receipts failed")
                await asyncio.sleep(1.0)
                continue
            for tp, records in batch.items():
                for record in records:
                    try:
                        if tp.topic == a.topics.tallies:
                            a.on_tally(decode_tally(record.value))
                        else:
                            a.on_receipt(decode_receipt(record.value))
                    except Exception:  # one unreadable record must not stop the audit
                        log.exception("auditor: unreadable record %s@%d", tp, record.offset)
            await a.trace.flush()  # hands the facts to the index's writer: never waits on Redis


def build(ctx: ServiceContext) -> Any:
    app = ctx.create_app()
    alerter = Alerter("auditor")
    auditor = Auditor(ctx, alerter)
    app.add_dependency(AuditReader(auditor))
    audit = ctx.config.audit

    @app.timer(1.0)
    async def settle() -> None:
        await auditor.settle()

    @app.timer(audit.dlq_check_s)
    async def check_dlq() -> None:
        await auditor.check_dlq()

    @app.timer(1.0)
    async def probe_broker() -> None:
        await auditor.probe_broker()

    if audit.canary_interval_s > 0:

        @app.timer(audit.canary_interval_s)
        async def canaries() -> None:
            await auditor.send_canaries(app.producer)

    @app.page("/audit")
    async def audit_view(self: web.View, request: web.Request) -> web.Response:
        refused = denied(self, request, ctx.settings)
        return refused or self.json(auditor.summary())

    @app.page("/trace/{event_id}")
    async def trace_view(self: web.View, request: web.Request, event_id: str) -> web.Response:
        refused = denied(self, request, ctx.settings)
        if refused:
            return refused
        try:
            found = await auditor.trace.lookup(event_id, request.query.get("tenant") or None)
        except TransientError as exc:
            return self.json({"error": "unavailable", "detail": str(exc)}, status=503)
        return self.json(found)

    @app.page("/dashboard")
    async def dashboard(self: web.View, request: web.Request) -> web.Response:
        return self.html((STATIC / "dashboard.html").read_text())

    @app.page("/static/{name}")
    async def static(self: web.View, request: web.Request, name: str) -> web.Response:
        files = {"uPlot.iife.min.js": "application/javascript", "uPlot.min.css": "text/css"}
        if name not in files:
            return self.json({"error": "not found"}, status=404)
        return self.bytes((STATIC / name).read_bytes(), content_type=files[name])

    def stats() -> dict[str, Any]:
        s = auditor.summary()
        shown = {k: s[k] for k in ("lost_by_stage", "surplus", "buckets_settled", "receipts", "canaries_sent", "dlq")}
        index = auditor.trace
        shown["trace_index"] = {  # facts `hifi trace` will miss: dropped (Redis slow or away), unreadable
            "pending_events": len(index.pending),
            "written_events": index.written,
            "dropped_facts": index.dropped,
            "unreadable_records": index.unreadable,
        }
        return shown

    add_common_views(app, "auditor", ctx.metrics, stats, ctx.settings)
    return app
