"""Dead letters: list the dead-letter topics, show their letters, replay them at a chosen rate.

A replay writes each letter's original bytes, key and headers back to the stage's input topic, plus
a `hifi-replay-of` header naming the claim it may take over: the message the letter came from
(`topic:partition:offset`), or, for an enricher letter that already carried one, that header's claim. Event
ids are kept, so dedupe makes replays idempotent; the deduplicator lets a replay take over the claim
its dead-lettered original made, so the replay passes once (see `shared/keywindow.py`). Progress is
committed in a consumer group per stage, so a replay can be stopped and resumed without repeating itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord

from shared import pipeline
from shared.app import durable_producer
from shared.codec import pack, unpack
from shared.errors import HifiError, InvalidEvent
from shared.event import now_ms
from shared.publish import TOO_LARGE, Output
from shared.topics import Topics

REPLAY_OF = "hifi-replay-of"
# Stages whose dead-lettered messages never reached the deduplicator (the enricher), in pipeline order.
BEFORE_DEDUPE = frozenset(s.name for s in pipeline.EVENT_PATH[: pipeline.EVENT_PATH.index(pipeline.DEDUPLICATOR)])


class UnknownStage(HifiError):
    pass


def replay_headers(letter: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The original headers, and the claim at the deduplicator this replay may take over.

    A letter of a stage before the deduplicator (the enricher) that already names a claim (a failed or
    dead-letter replay on its way there) keeps it: that claim still holds the event id, its own message
    never reached the deduplicator. Any other names its own message, which made (or took over) the claim."""
    original = [(k, bytes(v)) for k, v in letter.get("original_headers", [])]
    inherited = replay_of(original)
    headers = [(k, v) for k, v in original if k != REPLAY_OF]
    if inherited is not None and letter.get("stage") in BEFORE_DEDUPE:
        return [*headers, (REPLAY_OF, inherited.encode())]
    source = f"{letter['topic']}:{letter['partition']}:{letter['offset']}"
    return [*headers, (REPLAY_OF, source.encode())]


def replay_of(headers: Sequence[tuple[str, bytes]] | None) -> str | None:
    """The claim of the dead-lettered message a record replays, or None for an ordinary record."""
    for key, value in headers or ():
        if key == REPLAY_OF:
            return value.decode(errors="replace")
    return None


def stage_input(topics: Topics, stage: str, sinks: list[str]) -> str:
    """The topic the stage labelled `stage` consumes, where its dead letters are replayed to."""
    labels = stages(sinks)
    if stage not in labels:
        raise UnknownStage(f"unknown stage {stage!r}; stages with dead letters: {', '.join(labels)}")
    spec, sink = pipeline.parse_label(stage)
    source = spec.source_topic(sink)
    assert source is not None  # a stage with dead letters consumes a topic
    return topics.name(source)


def stages(sinks: list[str]) -> list[str]:
    return pipeline.dead_letter_stages(sinks)


@dataclass
class DeadLetterQueues:
    bootstrap: str
    topics: Topics
    sinks: list[str]

    async def counts(self) -> dict[str, int]:
        """Letters currently retained per stage (end offset minus start offset, summed over partitions)."""
        names = {stage: self.topics.dlq(stage) for stage in stages(self.sinks)}
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        await admin.start()
        try:
            described = await admin.describe_topics(list(names.values()))
        finally:
            await admin.close()
        partitions = {t["topic"]: [p["partition"] for p in t["partitions"]] for t in described if not t["error_code"]}
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, request_timeout_ms=5000)
        await consumer.start()
        try:
            out = {}
            for stage, topic in names.items():
                tps = [TopicPartition(topic, p) for p in partitions.get(topic, [])]
                if not tps:
                    out[stage] = 0
                    continue
                ends = await consumer.end_offsets(tps)
                starts = await consumer.beginning_offsets(tps)
                out[stage] = sum(ends[tp] - starts[tp] for tp in tps)
            return out
        finally:
            await consumer.stop()

    async def read(self, stage: str, limit: int = 20) -> list[dict[str, Any]]:
        topic = self.topics.dlq(stage)
        stage_input(self.topics, stage, self.sinks)
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
        )
        await consumer.start()
        letters: list[dict[str, Any]] = []
        try:
            idle = 0
            while len(letters) < limit and idle < 3:
                batch = await consumer.getmany(timeout_ms=500, max_records=limit - len(letters))
                idle = 0 if batch else idle + 1
                for records in batch.values():
                    letters.extend(describe(r.value, r.partition, r.offset) for r in records)
        finally:
            await consumer.stop()
        return letters[:limit]

    async def replay(self, stage: str, rate: float = 100.0, limit: int | None = None) -> int:
        target = stage_input(self.topics, stage, self.sinks)
        consumer = AIOKafkaConsumer(
            self.topics.dlq(stage),
            bootstrap_servers=self.bootstrap,
            group_id=self.topics.dlq_replay_group(stage),
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        producer = durable_producer(self.bootstrap)
        await consumer.start()
        await producer.start()
        replayed = 0
        started = time.monotonic()
        try:
            idle = 0
            while (limit is None or replayed < limit) and idle < 4:
                batch = await consumer.getmany(timeout_ms=500, max_records=100)
                idle = 0 if batch else idle + 1
                for records in batch.values():
                    for record in records:
                        if limit is not None and replayed >= limit:
                            break
                        letter = unpack(record.value)
                        headers = replay_headers(letter)
                        await producer.send_and_wait(
                            target, letter["original_value"], key=letter.get("original_key"), headers=headers
                        )
                        # Commit each one after the broker has it: an interrupted replay resumes exactly here.
                        await consumer.commit({TopicPartition(record.topic, record.partition): record.offset + 1})
                        replayed += 1
                        if rate > 0:
                            await asyncio.sleep(max(0.0, started + replayed / rate - time.monotonic()))
        finally:
            await producer.stop()
            await consumer.stop()
        return replayed


def describe(value: bytes, partition: int, offset: int) -> dict[str, Any]:
    try:
        letter = unpack(value)
    except InvalidEvent as exc:
        return {"partition": partition, "offset": offset, "error": f"unreadable dead letter: {exc}"}
    original = letter.get("original_value")
    try:
        letter["original"] = unpack(original) if original is not None else None
    except InvalidEvent:
        letter["original"] = None
    letter["original_value"] = original[:200].hex() if isinstance(original, bytes) else original
    letter["original_key"] = letter["original_key"].decode(errors="replace") if letter.get("original_key") else None
    letter["original_headers"] = [[k, v.decode(errors="replace")] for k, v in letter.get("original_headers", [])]
    return {"partition": partition, "offset": offset, **letter}


@dataclass(slots=True)
class DeadLetter:
    """An input the stage cannot pass on, and why; it goes to the stage's DLQ topic as `dead_letter_value`."""

    message: ConsumerRecord  # type: ignore[type-arg]
    error: Exception
    attempts: int = 1
    first_failed_ms: float = field(default_factory=now_ms)


def dead_letter_value(stage: str, letter: DeadLetter) -> bytes:
    """A dead letter keeps the original bytes and headers, the error and the timestamps."""
    msg = letter.message
    error = letter.error
    return pack(
        {
            "stage": stage,
            "error_class": type(error).__name__,
            "error": str(error)[:2000],
            "reason": error.reason if isinstance(error, InvalidEvent) else type(error).__name__,
            "attempts": letter.attempts,
            "topic": msg.topic,
            "partition": msg.partition,
            "offset": msg.offset,
            "original_key": msg.key,
            "original_value": msg.value,
            "original_headers": [[k, v] for k, v in (msg.headers or [])],
            "original_timestamp_ms": msg.timestamp or 0,
            "first_failed_ms": letter.first_failed_ms,
            "dead_lettered_ms": time.time() * 1000,
        }
    )


def letter_output(stage: str, dlq: str, letter: DeadLetter) -> Output:
    """The record that dead-letters `letter` on the stage's DLQ topic, keyed and headed like its input."""
    return Output(
        dlq,
        letter.message.key,
        dead_letter_value(stage, letter),
        headers=list(letter.message.headers or []) or None,
    )


def letter_of_output(
    stage: str,
    dlq: str,
    out: Output,
    error: BaseException,
    source: ConsumerRecord | None,  # type: ignore[type-arg]
) -> Output:
    """A dead letter for an output the stage could not produce.

    It names `source`, the input the output was made from (same tenant and event id), so a replay (`hifi dlq
    replay`) runs that input through the stage again and carries `hifi-replay-of` = its topic:partition:offset,
    the claim the deduplicator honours. An output of no input (a receipt, a tally) keeps itself, offset -1.
    """
    reason = "record_too_large" if isinstance(error, TOO_LARGE) else "record_refused"
    detail = f"{type(error).__name__}: {len(out.value)} bytes for {out.topic}"
    if source is not None:
        letter = DeadLetter(source, InvalidEvent(reason, detail))
        headers = list(source.headers or []) or None
        return Output(dlq, source.key, dead_letter_value(stage, letter), headers=headers)
    message = ConsumerRecord(
        topic=out.topic,
        partition=-1 if out.partition is None else out.partition,
        offset=-1,
        timestamp=int(time.time() * 1000),
        timestamp_type=0,
        key=out.key,
        value=out.value,
        checksum=None,
        serialized_key_size=len(out.key or b""),
        serialized_value_size=len(out.value),
        headers=tuple(out.headers or ()),
    )
    letter = DeadLetter(message, InvalidEvent(reason, detail))
    return Output(dlq, out.key, dead_letter_value(stage, letter), headers=out.headers)


def truncated_letter(letter: Output, keep: int) -> Output:
    """The dead letter with its original value cut to `keep` bytes, plus that value's size and sha256."""
    fields = unpack(letter.value)
    original = fields.get("original_value") or b""
    fields.update(
        original_value=original[:keep],
        original_size=len(original),
        original_sha256=hashlib.sha256(original).hexdigest(),
        truncated=True,
        error=str(fields.get("error", ""))[:200],
    )
    if keep == 0:
        fields["original_headers"] = []
    return Output(letter.topic, letter.key, pack(fields))


class UnsendableDeadLetter(HifiError):
    """The DLQ topic refused even a truncated dead letter (its max.message.bytes is misconfigured)."""
