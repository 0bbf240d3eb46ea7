"""Fetch on until a batch is full or its linger ran out: an archive sink wants few, large objects."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from shared.step import Ownership

log = logging.getLogger(__name__)

Fetched = dict[TopicPartition, list[ConsumerRecord]]  # type: ignore[type-arg]


async def linger(
    consumer: AIOKafkaConsumer,
    fetched: Fetched,
    owner: Ownership,
    current_owner: Callable[[], Ownership],
    batch_max: int,
    linger_s: float,
    stopping: Callable[[], bool],
    stage: str,
) -> tuple[Fetched, list[ConsumerRecord], Ownership]:  # type: ignore[type-arg]
    """Fetch on until `batch_max` events or `linger_s` passed (or a stop). A rebalance meanwhile drops what
    the old assignment fetched: its new owners read it again from the committed offsets. Nothing is acked
    before its batch is handled, so a kill while lingering only re-reads."""
    deadline = time.monotonic() + linger_s
    fetched = {tp: list(batch) for tp, batch in fetched.items()}
    messages = [m for batch in fetched.values() for m in batch]
    while not stopping() and len(messages) < batch_max:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            break
        try:
            more = await consumer.getmany(timeout_ms=min(100, left_ms), max_records=batch_max - len(messages))
        except KafkaError as exc:  # the batch in hand goes on; the main loop meets the error next
            log.warning("%s: fetch while lingering failed: %r", stage, exc)
            break
        if current_owner() is not owner:
            owner, fetched = current_owner(), {}
        for tp, batch in more.items():
            fetched.setdefault(tp, []).extend(batch)
        messages = [m for batch in fetched.values() for m in batch]
    return fetched, messages, owner
