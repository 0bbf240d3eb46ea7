"""Probes: can the broker be reached (a bounded connect, so a dead broker pages in seconds), and are the
dead-letter queues growing (`hifi_dlq_size`, a `dlq_growth` warning)."""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Gauge

from shared.alerts import Alerter, OutageClock
from shared.dlq import DeadLetterQueues
from shared.service import ServiceContext

log = logging.getLogger(__name__)


class Probes:
    """The broker's reachability and the dead-letter queues' sizes, each on its own timer."""

    def __init__(self, ctx: ServiceContext, alerter: Alerter, registry: CollectorRegistry) -> None:
        self.ctx = ctx
        self.audit = ctx.config.audit
        self.alerter = alerter
        self.dlq_sizes: dict[str, int] = {}
        self.dlq_growing_since: dict[str, float] = {}
        self.queues = DeadLetterQueues(ctx.settings.broker, ctx.topics, list(ctx.config.sinks))
        self.broker_outage = OutageClock(
            alerter, "broker_unreachable", "the Kafka broker", self.audit.outage_alert_after_s
        )
        self.dlq_gauge = Gauge("hifi_dlq_size", "Dead letters retained per stage", ["stage"], registry=registry)

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
