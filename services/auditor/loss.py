"""Loss confirmation: a ledger shortfall is loss only if no backlog can hold it, and offsets a stage's tallies
skipped are input it never read once its group committed past them. Confirmed losses page and count in
`hifi_events_lost`; confirmed gaps page as `offset_gap`."""

from __future__ import annotations

import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry, Counter

from shared.alerts import Alerter
from shared.dlq import UnknownStage, stage_input
from shared.service import ServiceContext

from .ledger import LossLedger, LossReport
from .sli import DeliverySLIs

log = logging.getLogger(__name__)


class LossConfirmation:
    """Turns the ledger's shortfalls and offset gaps into confirmed losses, from the stages' consumer groups."""

    def __init__(
        self, ctx: ServiceContext, ledger: LossLedger, slis: DeliverySLIs, alerter: Alerter, registry: CollectorRegistry
    ) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.audit = ctx.config.audit
        self.topics = ctx.topics
        self.ledger = ledger
        self.slis = slis
        self.alerter = alerter
        self.gap_seen: dict[tuple[str, str, int, int, int], float] = {}  # gap -> when first seen (epoch s)
        self.offset_gaps: dict[tuple[str, str, int, int, int], dict[str, Any]] = {}  # confirmed skipped input
        self.consumer: AIOKafkaConsumer | None = None  # the reader's, for end offsets
        self.lost_counter = Counter(
            "hifi_events_lost", "Events the loss ledger found missing", ["tenant", "sink", "stage"], registry=registry
        )

    async def confirm(self, now: float) -> None:
        await self._confirm_losses()
        await self._confirm_gaps(now)

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
        self.slis.lost(report.tenant, report.sink, report.lost)  # a lost event was not delivered on time
        self.alerter.fire(
            "loss_detected",
            f"{report.lost} events of tenant {report.tenant} for sink {report.sink} lost in bucket {report.bucket} "
            f"at {report.stage}: {report.detail}",
            key=report.sink,
            lost=report.lost,
            stage=report.stage,
            bucket=report.bucket,
        )
