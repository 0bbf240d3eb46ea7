"""router: unique -> one topic per sink. Each event is written once to every sink its tenant
subscribes to; an event of a tenant with no subscriptions is counted, not forwarded."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter

from shared.codec import encode_event
from shared.config import HifiConfig
from shared.errors import InvalidEvent
from shared.service import ServiceContext
from shared.stage import DeadLetter, Output, Record, StageRunner, StepResult
from shared.topics import Topics
from shared.web import add_common_views


class Router:
    def __init__(self, config: HifiConfig, topics: Topics, unrouted: Counter) -> None:
        self.config = config
        self.topics = topics
        self.unrouted = unrouted

    async def handle(self, records: list[Record]) -> StepResult:
        result = StepResult()
        for record in records:
            event = record.event
            if event.tenant not in self.config.tenants:
                result.dead.append(DeadLetter(record.message, InvalidEvent("unknown_tenant", event.tenant)))
                continue
            sinks = self.config.subscribers(event.tenant)
            if not sinks:
                record.outcome = "unrouted"
                self.unrouted.labels(event.tenant).inc()
                continue
            event.stamp("router")
            value = encode_event(event)
            for sink in sinks:
                result.outputs.append(Output(self.topics.sink(sink), event.partition_key, value))
        return result


def build(ctx: ServiceContext) -> Any:
    app = ctx.create_app()
    unrouted = Counter(
        "hifi_events_unrouted", "Events of tenants with no subscribed sink", ["tenant"], registry=ctx.metrics.registry
    )
    router = Router(ctx.config, ctx.topics, unrouted)
    runner = StageRunner(app, "router", router.handle, ctx.metrics, ctx.topics.dlq("router"), source=ctx.source_topic)

    runner.attach(ctx)

    def stats() -> dict[str, Any]:
        m = ctx.metrics
        return {
            "in": m.total(m.events_in),
            "out": m.total(m.events_out),
            "unrouted": m.total(unrouted),
            "dead_lettered": m.total(m.dead_lettered),
            "subscriptions": {t.name: list(t.sinks) for t in ctx.config.tenants.values()},
        }

    add_common_views(app, "router", ctx.metrics, stats, ctx.settings, ready=runner.ready)
    return app
