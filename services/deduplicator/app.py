"""deduplicator: enriched -> unique. Drops an event whose (tenant, event_id) was seen in the window.

A replayed dead letter (header `hifi-replay-of`) passes if its original message still holds the
event id's claim (it was dead-lettered, not delivered), and takes the claim over, so replaying the
same letter twice delivers it once. Releasing the claim when dead-lettering would need every
dead-letter path (handler failures, refused produces) to reach the window, and a second replay
would pass again.

Schemas: an event passed as new is then checked against its tenant's schemas (shared/quarantine.py):
here re-sends are already gone, and the claim a quarantined event made is known, so its replay can take
it over. An `enforce` tenant's violating event is quarantined to `hifi.failed.<tenant>`.

Backends: RocksDB stores with a changelog (default; partition-local, so the input stays partitioned by the
event's key and every copy of an event meets in one partition) or Redis (SET NX GET PX, one
pipelined round trip per fetched batch).
"""

from __future__ import annotations

from typing import Any

from shared.alerts import Alerter, OutageClock
from shared.codec import encode_event
from shared.dlq import replay_of
from shared.errors import TransientError
from shared.keywindow import KeyWindow
from shared.outcome import Outcome
from shared.quarantine import FailedEvents, SchemaGate
from shared.service import ServiceContext
from shared.stage import Output, Record, StageRunner, StepResult
from shared.tables import TableBrowser, add_table_views
from shared.web import add_common_views, add_failed_views


class DedupeWindow:
    def __init__(
        self,
        window: KeyWindow,
        metrics: Any,
        output_topic: str,
        alerter: Alerter,
        pass_through: bool = False,
        alert_after_s: float = 30.0,
        gate: SchemaGate | None = None,
    ) -> None:
        self.window = window
        self.gate = gate
        self.output_topic = output_topic
        self.metrics = metrics
        self.pass_through = pass_through
        self.outage = OutageClock(alerter, "dedupe_store_unreachable", "the dedupe store", alert_after_s)
        self.passed_unchecked = 0

    async def handle(self, records: list[Record]) -> StepResult:
        keys = [r.event.dedupe_key for r in records]
        try:
            # A replayed dead letter may take over the claim its original message made (shared/dlq.py).
            inherited = [replay_of(r.message.headers) for r in records]
            fresh = await self.window.claim(
                keys, [r.source for r in records], records, inherited if any(inherited) else None
            )
            self.outage.ok()
        except TransientError as exc:
            self.outage.failed(exc)
            if not self.pass_through:
                raise  # pause: the runner retries with backoff; nothing moves until the store is back
            fresh = [True] * len(records)
            self.passed_unchecked += len(records)
        result = StepResult()
        copies: list[Record] = []
        for record, is_new in zip(records, fresh, strict=True):
            if is_new:
                failed = self.gate.quarantine(record) if self.gate is not None else None
                if failed is not None:
                    result.outputs.append(failed)
                    continue
                record.event.stamp("deduplicator")
                result.outputs.append(Output(self.output_topic, record.event.partition_key, encode_event(record.event)))
            else:
                record.outcome = Outcome.DUP
                copies.append(record)
                self.metrics.duplicates.labels("deduplicator", record.event.tenant).inc()
        if copies:
            await self._name_first_copies(copies)
        return result

    async def _name_first_copies(self, copies: list[Record]) -> None:
        """Which message holds each copy's claim, for `hifi trace`. Best effort: the drop stands without it."""
        try:
            holders = await self.window.holders([r.event.dedupe_key for r in copies], copies)
        except TransientError:
            return
        for record, holder in zip(copies, holders, strict=True):
            if holder:
                record.note = {"claim": holder}


def build(ctx: ServiceContext) -> Any:
    app = ctx.create_app()
    conf = ctx.config.dedupe
    window = ctx.key_window("dedupe-window")
    dedupe = DedupeWindow(
        window,
        ctx.metrics,
        ctx.topics.unique,
        Alerter("deduplicator"),
        pass_through=conf.on_redis_down == "pass-through",
        alert_after_s=ctx.config.audit.outage_alert_after_s,
        gate=SchemaGate(ctx.config, ctx.topics, ctx.metrics.registry),
    )
    runner = StageRunner(
        app,
        "deduplicator",
        dedupe.handle,
        ctx.metrics,
        ctx.topics.dlq("deduplicator"),
        source=ctx.source_topic,
        states=[window],
    )

    runner.attach(ctx)

    add_table_views(app, TableBrowser(app, ctx.settings, {"dedupe-window": window}))
    failed = FailedEvents(ctx.settings.broker, ctx.topics, list(ctx.config.tenants), ctx.config.audit.bucket_s)
    add_failed_views(app, failed, ctx.settings)

    def stats() -> dict[str, Any]:
        m = ctx.metrics
        return {
            "in": m.total(m.events_in),
            "out": m.total(m.events_out),
            "duplicates": m.total(m.duplicates),
            "quarantined": m.total(dedupe.gate.quarantined) if dedupe.gate is not None else 0,
            "dead_lettered": m.total(m.dead_lettered),
            "backend": conf.backend,
            "passed_unchecked": dedupe.passed_unchecked,
            "retries": m.total(m.retries),
        }

    add_common_views(app, "deduplicator", ctx.metrics, stats, ctx.settings, ready=runner.ready)
    return app
