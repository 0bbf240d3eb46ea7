"""auditor: receipts and tallies in; lag, loss and the on-time SLI out, as an API, a dashboard,
Prometheus metrics and Sentry alerts.

The auditor is a read-only view: it reads the tallies and receipts topics with its own consumer
(every partition, no group, nothing committed), from one hour plus the settle delay back, so a
restarted auditor rebuilds the same state. Buckets older than where it started reading are not
reconciled (their early tallies were not read). Run one replica.

It also injects canaries: every `canary_interval_s` one flagged event per tenant, written to the raw
topic like the collector would, so lag and loss stay measured when traffic is quiet.

One module per job: reader.py (tallies and receipts in), ledger.py (the counts), loss.py (confirming
shortfalls and offset gaps), sli.py (lag and the on-time SLI), canaries.py, probes.py (broker, DLQs);
this module wires them and serves the summary.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from faust import web
from prometheus_client import Gauge

from shared.alerts import Alerter
from shared.audit import Receipt, Tally, as_receipt, as_tally
from shared.errors import TransientError
from shared.service import ServiceContext
from shared.trace import TraceIndex
from shared.web import add_common_views, denied

from .canaries import Canaries
from .ledger import LossLedger
from .loss import LossConfirmation
from .probes import Probes
from .reader import LOOKBACK_S, AuditReader
from .sli import DeliverySLIs

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


class Auditor:
    """The auditor's jobs, fed by its reader and timers: the ledger, the SLIs, loss confirmation, canaries,
    probes, the trace index; and the summary of them all (`/audit`)."""

    def __init__(self, ctx: ServiceContext, alerter: Alerter) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.audit = ctx.config.audit
        self.topics = ctx.topics
        self.alerter = alerter
        r = ctx.metrics.registry
        self.ledger = LossLedger(ctx.config.subscribers, self.audit.bucket_s, self.audit.settle_s)
        self.slis = DeliverySLIs(ctx.config, alerter, r)
        self.loss = LossConfirmation(ctx, self.ledger, self.slis, alerter, r)
        self.probes = Probes(ctx, alerter, r)
        self.canaries = Canaries(ctx.config, ctx.topics)
        # What tallies and receipts say about each event, for `hifi trace` and /trace (shared/trace.py).
        # Its own Redis URL: under maxmemory the index must not evict or starve the dedupe claims and ledgers.
        self.trace = TraceIndex(
            ctx.settings.trace_index_url, ctx.settings.namespace, self.audit.trace_ttl_s, registry=r
        )
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

    # -- input -----------------------------------------------------------------------------------

    def on_receipt(self, value: Receipt | dict[str, Any]) -> None:
        receipt = as_receipt(value)
        try:  # a malformed trace costs the trace, never the lag and SLI samples
            self.trace.add_receipt(receipt)
        except Exception:
            self.trace.unreadable += 1
            log.exception("auditor: receipt of %s unreadable for the trace index", receipt.sink)
        self.slis.on_receipt(receipt)

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
        await self.loss.confirm(now)
        self.ledger.forget_before(int(now - LOOKBACK_S))
        self._show_quarantined()
        self.slis.update(now)

    def _show_quarantined(self) -> None:
        """The ledger's quarantine counts as gauges: its counts only grow, and its labels are capped."""
        for tenant, counts in self.ledger.quarantine.items():
            for event_type, n in counts.events.items():
                self.quarantined_gauge.labels(tenant, event_type).set(n)
            for event_type, rules in counts.rules.items():
                for rule, n in rules.items():
                    self.quarantined_rule_gauge.labels(tenant, event_type, rule).set(n)

    # -- output ----------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        now = time.time()
        ledger = self.ledger
        return {
            "at": now,
            "slo_target": self.audit.slo_target,
            "sinks": self.slis.summary(now),
            "loss": [
                r.to_json() for r in sorted(ledger.reports.values(), key=lambda r: r.bucket) if r.status == "lost"
            ],
            "overdue": [r.to_json() for r in ledger.reports.values() if r.status == "overdue"],
            "unconfirmed": [r.to_json() for r in ledger.pending() if r.status == "unconfirmed"],
            "lost_by_stage": ledger.lost_by_stage(),
            "filtered": ledger.filtered(),
            "quarantined": ledger.quarantined(),
            "quarantined_by_bucket": ledger.quarantined_by_bucket(),
            "surplus": sum(ledger.surplus.values()),
            "offset_gaps": sorted(self.loss.offset_gaps.values(), key=lambda g: (g["stage"], g["topic"], g["first"])),
            "stage_totals": {stage: dict(outcomes) for stage, outcomes in sorted(ledger.totals.items())},
            "buckets_open": sum(1 for b in ledger.buckets.values() if not b.settled),
            "buckets_settled": ledger.settled,
            "replayed_offsets_ignored": ledger.replayed,
            "dlq": self.probes.dlq_sizes,
            "canaries_sent": self.canaries.sent,
            "receipts": self.slis.receipts,
            "alerts_active": [list(k) for k in self.alerter.active],
        }


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
        await auditor.probes.check_dlq()

    @app.timer(1.0)
    async def probe_broker() -> None:
        await auditor.probes.probe_broker()

    if audit.canary_interval_s > 0:

        @app.timer(audit.canary_interval_s)
        async def canaries() -> None:
            await auditor.canaries.send(app.producer)

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
