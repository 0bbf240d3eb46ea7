"""The sink contract and `make_sink`; each sink type lives in its own module.

Each `SinkSender.deliver_batch` returns only once the destination acknowledged the whole batch; otherwise
it raises TransientError (retry), PartialDelivery (some records acknowledged: retry the rest),
SinkMisconfigured (the whole sink refuses: page, retry) or PermanentSinkError (the request was refused:
the sender isolates the bad events and dead-letters only those). `probe` carries no event: it returns if
the destination answers at all, so the sender can tell a payload that keeps failing from a sink that is
down."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from shared.config import SinkConfig
from shared.errors import (
    TransientError,
)
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


class FileSink:
    """Rotating JSONL: appends to `events.jsonl`, fsyncs before acking, rotates past `rotate_bytes`."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self.dir = Path(config.options["path"])
        self.rotate_bytes = int(config.options["rotate_bytes"])
        self.current = self.dir / "events.jsonl"
        # The sender delivers partitions concurrently; one file is one stream, so appends (and the
        # rotation after them) take turns. Two at once could rotate a file under the other's feet and
        # fail a batch that was already written, which the retry would write twice.
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    async def deliver_batch(self, events: list[Event], source: Source | None = None) -> None:
        lines = "".join(json.dumps(sink_record(self.config.name, e), separators=(",", ":")) + "\n" for e in events)
        try:
            async with self.lock:
                await asyncio.to_thread(self._append, lines.encode())
        except OSError as exc:
            raise TransientError(f"file sink {self.config.name}: {exc}") from exc

    def _append(self, data: bytes) -> None:
        with open(self.current, "ab") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            size = fh.tell()
        if size >= self.rotate_bytes:
            # Sequence first, so rotated files sort in the order they were written.
            seq = len(list(self.dir.glob("events-*.jsonl"))) + 1
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            os.replace(self.current, self.dir / f"events-{seq:08d}-{stamp}.jsonl")

    async def probe(self) -> None:
        # As root, os.access says a plain file is writable: the directory must also still be one.
        if not await asyncio.to_thread(_writable_dir, self.dir):
            raise TransientError(f"file sink {self.config.name} probe: {self.dir} is not a writable directory")

    async def close(self) -> None:
        pass


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)


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
        return FileSink(config)
    if config.type == "postgres":
        from .postgres import PostgresSink

        return PostgresSink(config)
    if config.type == "s3_archive":
        from .archive import ArchiveSink

        return ArchiveSink(config)
    raise ValueError(f"unknown sink type {config.type}")
