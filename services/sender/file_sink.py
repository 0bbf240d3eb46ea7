"""The file sink: rotating JSON lines, fsynced before the ack, with group commit.

The sender delivers its partitions concurrently into one file. Each batch is encoded on its own
(msgspec, about 5x json.dumps), then queued; one writer appends every batch queued so far in one
`write` and one `fsync`, and only then resolves each batch's future. A batch is never acked before
the fsync that covers it, and a failed write or fsync fails every batch of its group (each is
retried) after cutting the file back to where the group began, so a retry never appends after a torn
line. A rotation that fails after the fsync does not fail the group (its lines are durable, a retry
would write them twice): it is logged and tried again after the next write. A batch's lines stay
together and in order; batches of different partitions interleave.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import msgspec

from shared.config import SinkConfig
from shared.errors import TransientError
from shared.event import Event

log = logging.getLogger(__name__)


def file_record(sink: str, event: Event) -> dict[str, Any]:
    """What a line holds: the event plus a key a reader can dedupe on (the same as every sink's)."""
    record = event.to_wire()
    record["idempotency_key"] = f"{sink}:{event.tenant}:{event.event_id}"
    return record


class FileSink:
    """Rotating JSONL: appends to `events.jsonl`, fsyncs before acking, rotates past `rotate_bytes`."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self.dir = Path(config.options["path"])
        self.rotate_bytes = int(config.options["rotate_bytes"])
        self.current = self.dir / "events.jsonl"
        self._encoder = msgspec.json.Encoder()
        self._queued: list[tuple[bytes, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.groups = 0  # fsyncs (group commits) so far, for tests and the bench

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    async def deliver_batch(self, events: list[Event], source: Any = None) -> None:
        lines = self._encoder.encode_lines([file_record(self.config.name, e) for e in events])
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued.append((lines, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_queued(), name=f"file-sink-{self.config.name}")
        # Shielded: a cancelled caller (a revoked partition) must not cancel a group other batches wait on.
        await asyncio.shield(done)

    async def _write_queued(self) -> None:
        """One writer at a time: two could rotate a file under the other's feet and fail a written batch."""
        while self._queued:
            group, self._queued = self._queued, []
            try:
                await asyncio.to_thread(self._append, b"".join(lines for lines, _ in group))
            except Exception as exc:  # any error, not only OSError: a caller must never wait on an unset future
                error = TransientError(f"file sink {self.config.name}: {exc!r}")
                for _, done in group:
                    if not done.done():
                        done.set_exception(error)
                continue
            self.groups += 1
            for _, done in group:
                if not done.done():
                    done.set_result(None)

    def _append(self, data: bytes) -> None:
        # Unbuffered: after a failed write no bytes wait in a buffer to land after the cut below.
        with open(self.current, "ab", buffering=0) as fh:
            start = fh.tell()
            try:
                view = memoryview(data)
                while view:
                    view = view[fh.write(view) :]
                os.fsync(fh.fileno())
            except BaseException:
                # Part of the group may be in the file: cut it off, or the retry appends after a torn line.
                os.ftruncate(fh.fileno(), start)
                os.fsync(fh.fileno())
                raise
            size = fh.tell()
        if size >= self.rotate_bytes:
            try:
                self._rotate()
            except OSError as exc:  # the group is durable: acked, and the rotation is tried after the next write
                log.warning("file sink %s: could not rotate %s: %r", self.config.name, self.current, exc)

    def _rotate(self) -> None:
        # Sequence first, so rotated files sort in the order they were written.
        seq = len(list(self.dir.glob("events-*.jsonl"))) + 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        os.replace(self.current, self.dir / f"events-{seq:08d}-{stamp}.jsonl")

    async def probe(self) -> None:
        # As root, os.access says a plain file is writable: the directory must also still be one.
        if not await asyncio.to_thread(_writable_dir, self.dir):
            raise TransientError(f"file sink {self.config.name} probe: {self.dir} is not a writable directory")

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)  # what was queued is written, not dropped


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)
