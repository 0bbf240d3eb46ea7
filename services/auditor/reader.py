"""The auditor's reader: tallies and receipts from every partition, decoded into their records."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, TopicPartition
from mode import Service

from shared.audit import decode_receipt, decode_tally

if TYPE_CHECKING:
    from .app import Auditor

log = logging.getLogger(__name__)

LOOKBACK_S = 3600.0
FETCH_WAIT_MS = 250  # how long the broker may hold a fetch for more records: the auditor's read delay at most
FETCH_MIN_BYTES = 256 * 1024


class AuditReader(Service):
    """Reads tallies and receipts from every partition, from LOOKBACK_S back; commits nothing."""

    def __init__(self, auditor: Auditor) -> None:
        super().__init__()
        self.auditor = auditor
        self.consumer: AIOKafkaConsumer | None = None

    async def on_start(self) -> None:
        a = self.auditor
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=a.ctx.settings.broker,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Nothing here needs the newest record within milliseconds (lag is stamped in the receipts, loss
            # settles after `settle_s`), and a fetch answered at once for every few records cost a third of the
            # auditor's CPU (issue 16): the broker answers after FETCH_WAIT_MS or once FETCH_MIN_BYTES are in.
            fetch_max_wait_ms=FETCH_WAIT_MS,
            fetch_min_bytes=FETCH_MIN_BYTES,
        )
        await self.consumer.start()
        self.auditor.loss.consumer = self.consumer

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
        # The ends first: a partition with nothing in the lookback starts at its end as it was before the
        # lookup, so a record written while the reader starts is read (asked after, the end skipped it).
        ends = await consumer.end_offsets(tps)
        found = await consumer.offsets_for_times(dict.fromkeys(tps, start_ms))
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
