"""sender: one process and one consumer group per sink. Wires the sink, its delivered ledger and
the SinkDelivery step (services/sender/delivery.py) into a StageRunner."""

from __future__ import annotations

from typing import Any

from mode import Service

from shared.alerts import Alerter
from shared.service import ServiceContext
from shared.stage import StageRunner
from shared.tables import TableBrowser, add_table_views
from shared.web import add_common_views

from .delivery import SinkDelivery
from .sinks import SinkSender, make_sink


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
    return build_sender(ctx)[0]


def build_sender(ctx: ServiceContext) -> tuple[Any, SinkDelivery, StageRunner]:
    """The sender's app, with its delivery and runner wired together (tests drive the two directly)."""
    assert ctx.sink is not None
    sink_config = ctx.config.sinks[ctx.sink]
    app = ctx.create_app()
    sink = make_sink(
        sink_config, ctx.settings.broker, ctx.settings.redis_url, str(app.conf.id), ctx.config.dedupe.window_s
    )
    dedupe = ctx.config.dedupe
    ledger = ctx.key_window("delivered-ledger")
    stage = ctx.spec.label(ctx.sink)
    delivery = SinkDelivery(
        sink,
        ledger,
        ctx.metrics,
        Alerter(stage),
        pass_through=dedupe.on_redis_down == "pass-through",
        receipts_topic=ctx.topics.receipts,
        alert_after_s=ctx.config.audit.outage_alert_after_s,
    )
    runner = StageRunner(
        app,
        stage,
        delivery.handle,
        ctx.metrics,
        ctx.topics.dlq(stage),
        source=ctx.source_topic,
        batch_max=sink_config.batch_max,
        batch_linger_s=sink_config.linger_s,
        states=[ledger],
        # A request in flight at a revocation ends (acked: marked and published; failed: given up) before
        # the handover, instead of being cancelled after the sink may have taken it.
        revoke_grace_s=sink_config.timeout_s + 1.0,
        # A transactional Kafka sink commits the input offsets in its transactions; a plain commit could
        # land after a pending one and move the group back below what the sink delivered.
        commits_offsets=not getattr(sink, "transactional", False),
        hold_dead_letters=delivery.hold_dead_letters,
    )

    # A transactional sink commits no source offset past a dead letter the runner has not written yet.
    delivery.durable_offset = runner.done.get
    runner.attach(ctx)

    # A dependency of the runner: open before its first batch, closed only after its last one.
    runner.add_dependency(SinkLifecycle(sink))
    browser = TableBrowser(app, ctx.settings, {"delivered-ledger": ledger}, {"sink-state": delivery.state_rows})
    add_table_views(app, browser)
    add_common_views(app, stage, ctx.metrics, delivery.stats, ctx.settings, ready=runner.ready)
    return app, delivery, runner
