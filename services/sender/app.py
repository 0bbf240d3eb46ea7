"""sender: one process and one consumer group per sink. Delivers batches to the destination and
acks its input only after the destination acknowledged; a delivered ledger (sink + event id, kept
for the dedupe window) stops a replay from delivering twice."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import sentry_sdk
from mode import Service

from shared.errors import PermanentSinkError, TransientError
from shared.event import now_ms
from shared.keywindow import KeyWindow, RedisKeyWindow, TableKeyWindow
from shared.metrics import LagWindow, StageMetrics
from shared.retry import Backoff
from shared.service import ServiceContext
from shared.stage import DeadLetter, Record, StageRunner, StepResult
from shared.web import add_common_views

from .sinks import SinkSender, make_sink

log = logging.getLogger(__name__)

BASE_WEB_PORT = 6070
STAGES = ("collector", "enricher", "deduplicator", "router")


class SinkDelivery:
    def __init__(self, sink: SinkSender, ledger: KeyWindow, metrics: StageMetrics) -> None:
        self.sink = sink
        self.name = sink.config.name
        self.ledger = ledger
        self.metrics = metrics
        self.lag = LagWindow()
        self.stage_lag = {stage: LagWindow() for stage in (*STAGES[1:], "sender")}
        self.skipped = 0
        self.drop_canaries = bool(sink.config.options.get("drop_canaries", False))

    def _key(self, record: Record) -> str:
        return f"{self.name}:{record.event.dedupe_key}"

    async def handle(self, records: list[Record]) -> StepResult:
        seen = await self.ledger.seen([self._key(r) for r in records], records)
        todo: list[Record] = []
        keys_in_batch: set[str] = set()
        for record, already in zip(records, seen, strict=True):
            key = self._key(record)
            if already or key in keys_in_batch or (self.drop_canaries and record.event.canary):
                self.skipped += 1
                continue
            keys_in_batch.add(key)
            todo.append(record)
        if not todo:
            return StepResult()
        try:
            await self.sink.deliver_batch([r.event for r in todo])
        except PermanentSinkError as exc:
            return StepResult(dead=[DeadLetter(r.message, exc) for r in todo])
        acked = now_ms()
        await self._mark_delivered(todo)
        for record in todo:
            event = record.event
            self.metrics.delivered.labels(self.name, event.tenant).inc()
            if event.ingest_ts:
                self.lag.record(acked - event.ingest_ts)
                self.metrics.end_to_end_lag.labels(self.name).observe((acked - event.ingest_ts) / 1000)
            previous = event.stages.get("collector")
            for stage in STAGES[1:]:
                at = event.stages.get(stage)
                if previous is not None and at is not None:
                    self.stage_lag[stage].record(at - previous)
                previous = at if at is not None else previous
            if previous is not None:
                self.stage_lag["sender"].record(acked - previous)
        return StepResult()

    async def _mark_delivered(self, records: list[Record]) -> None:
        """The sink has acked: failing the batch now would deliver twice, so only this step is retried.

        Never raises: an event the sink acknowledged is delivered, whatever happens to the ledger.
        """
        backoff = Backoff()
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.ledger.mark([self._key(r) for r in records], records)
                return
            except TransientError as exc:
                delay = backoff.delay(attempt)
                log.warning("sender %s: ledger write failed (attempt %d): %s", self.name, attempt, exc)
                await asyncio.sleep(delay)
            except Exception as exc:  # a bug: report it, keep the delivery
                log.exception("sender %s: ledger write failed; a replay of these events could re-deliver", self.name)
                sentry_sdk.capture_exception(exc)
                return

    def stats(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "sink": self.name,
            "type": self.sink.config.type,
            "delivered": m.total(m.delivered),
            "skipped_already_delivered": self.skipped,
            "dead_lettered": m.total(m.dead_lettered),
            "lag": self.lag.percentiles(),
            "stage_lag_p95_ms": {s: w.percentiles().get("p95_ms") for s, w in self.stage_lag.items()},
        }


class SinkLifecycle(Service):
    """Opens the sink's connections with the worker and closes them after the agents stopped."""

    def __init__(self, sink: SinkSender) -> None:
        super().__init__()
        self.sink = sink

    async def on_start(self) -> None:
        await self.sink.start()

    async def on_stop(self) -> None:
        await self.sink.close()


def build(ctx: ServiceContext) -> Any:
    assert ctx.sink is not None
    sink_config = ctx.config.sinks[ctx.sink]
    port = BASE_WEB_PORT + list(ctx.config.sinks).index(ctx.sink)
    app = ctx.create_app(f"hifi-sender-{ctx.sink}", port)
    sink = make_sink(sink_config, ctx.settings.broker, ctx.settings.redis_url)
    ledger: KeyWindow
    if ctx.config.dedupe.backend == "redis":
        ledger = RedisKeyWindow(
            ctx.settings.redis_url, f"hifi:{ctx.settings.namespace}:delivered:", ctx.config.dedupe.window_s
        )
    else:
        table = app.Table("delivered-ledger", partitions=ctx.settings.partitions, key_type=str, value_type=bytes)
        ledger = TableKeyWindow(table, ctx.config.dedupe.window_s)
    delivery = SinkDelivery(sink, ledger, ctx.metrics)
    runner = StageRunner(
        app,
        f"sender.{ctx.sink}",
        delivery.handle,
        ctx.metrics,
        ctx.topics.dlq(f"sender.{ctx.sink}"),
        batch_max=sink_config.batch_max,
    )

    @app.agent(app.topic(ctx.topics.sink(ctx.sink)), name="deliver")
    async def deliver(stream: Any) -> None:
        await runner.run(stream)

    app.add_dependency(SinkLifecycle(sink))

    add_common_views(app, f"sender.{ctx.sink}", ctx.metrics, delivery.stats)
    return app
