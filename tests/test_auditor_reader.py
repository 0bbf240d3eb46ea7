"""The auditor's reader starts at its lookback against the real broker and misses no record written while it starts."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from aiokafka import AIOKafkaProducer

from services.auditor.reader import AuditReader
from shared.audit import receipt
from shared.topics import ensure_topics


async def test_a_receipt_written_while_the_reader_finds_its_start_is_read(kafka, namespace) -> None:
    """A partition with nothing in the lookback answers None to offsets_for_times; the reader then started at
    the end offset it asked for after that answer, so a receipt written in between was skipped for good (a sink
    delivery missing from the trace and the loss ledger; seen once in CI)."""
    tallies, receipts = f"{namespace}.tallies", f"{namespace}.receipts"
    await ensure_topics(kafka.bootstrap, [tallies, receipts], 1, 1)
    seen: list[Any] = []
    flushed = asyncio.Event()

    async def flush() -> None:
        if seen:
            flushed.set()

    auditor: Any = SimpleNamespace(
        ctx=SimpleNamespace(settings=SimpleNamespace(broker=kafka.bootstrap)),
        topics=SimpleNamespace(tallies=tallies, receipts=receipts),
        audit=SimpleNamespace(settle_s=1, bucket_s=1),
        ledger=SimpleNamespace(trust_from=0),
        loss=SimpleNamespace(consumer=None),
        trace=SimpleNamespace(flush=flush, close=lambda: asyncio.sleep(0)),
        on_tally=lambda value: None,
        on_receipt=seen.append,
    )
    reader = AuditReader(auditor)
    await reader.on_start()
    consumer = reader.consumer
    assert consumer is not None
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    real = consumer.offsets_for_times

    async def then_a_receipt_lands(*args: Any, **kwargs: Any) -> Any:
        found = await real(*args, **kwargs)
        await producer.send_and_wait(
            receipts, receipt("hook", time.time() * 1000, [["e1", "acme", time.time() * 1000, 1, False]])
        )
        return found

    consumer.offsets_for_times = then_a_receipt_lands  # type: ignore[method-assign]
    task = asyncio.create_task(AuditReader._read(reader))
    try:
        await asyncio.wait_for(flushed.wait(), 20)
        assert [r.sink for r in seen] == ["hook"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await producer.stop()
        await consumer.stop()
