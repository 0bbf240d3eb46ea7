"""The sink contract and `make_sink`; each sink type lives in its own module.

Each `SinkSender.deliver_batch` returns only once the destination acknowledged the whole batch; otherwise
it raises TransientError (retry), PartialDelivery (some records acknowledged: retry the rest),
SinkMisconfigured (the whole sink refuses: page, retry) or PermanentSinkError (the request was refused:
the sender isolates the bad events and dead-letters only those). `probe` carries no event: it returns if
the destination answers at all, so the sender can tell a payload that keeps failing from a sink that is
down."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from shared.config import SinkConfig
from shared.event import Event


def sink_record(sink: str, event: Event) -> dict[str, Any]:
    """What a destination receives: the event plus a key it can dedupe on."""
    record = event.to_wire()
    record["idempotency_key"] = idempotency_key(sink, event)
    return record


def idempotency_key(sink: str, event: Event) -> str:
    return f"{sink}:{event.tenant}:{event.event_id}"


@dataclass(frozen=True)
class Source:
    """Where a batch was read: one source partition, and each event's offset in it (same order).

    `commit_offset`: where a successor may start once this part is delivered (the first offset of the
    source batch still undelivered or not yet dead-lettered durably); None: past the last of `offsets`.
    """

    topic: str
    partition: int
    offsets: list[int]
    commit_offset: int | None = None


class SinkSender(Protocol):
    config: SinkConfig

    async def start(self) -> None: ...

    async def deliver_batch(self, events: list[Event], source: Source | None = None) -> None: ...

    async def probe(self) -> None: ...

    async def close(self) -> None: ...


# Answers about the sink, not about the events: a bad credential, URL, method or content type must not pour
# the stream into the DLQ.
SINK_WIDE_STATUSES = frozenset({401, 403, 404, 405, 407, 410, 415})


def make_sink(
    config: SinkConfig,
    bootstrap: str,
    redis_url: str,
    group_id: str | None = None,
    dedupe_window_s: float = 86_400.0,
) -> SinkSender:
    """`group_id`: the sender's consumer group, whose offsets a transactional Kafka sink commits."""
    if config.type == "webhook":
        from .webhook import WebhookSink  # each sink module imports this one

        return WebhookSink(config)
    if config.type == "kafka":
        from .kafka_sink import KafkaSink

        return KafkaSink(config, bootstrap, group_id)
    if config.type == "redis_stream":
        from .redis_stream import RedisStreamSink

        return RedisStreamSink(config, redis_url, dedupe_window_s)
    if config.type == "file":
        from .file_sink import FileSink

        return FileSink(config)
    if config.type == "postgres":
        from .postgres import PostgresSink

        return PostgresSink(config)
    if config.type == "s3_archive":
        from .archive import ArchiveSink

        return ArchiveSink(config)
    raise ValueError(f"unknown sink type {config.type}")
