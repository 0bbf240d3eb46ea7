"""The file sink: rotating JSON lines, fsynced before the ack, with group commit.

The sender delivers its partitions concurrently into one file. Each batch is encoded on its own
(msgspec, about 5x json.dumps), then queued; one writer appends every batch queued so far in one
`write` and one `fsync`, and only then resolves each batch's future. A batch is never acked before
the fsync that covers it, and a failed write or fsync fails every batch of its group (each is
retried). The file is append-only, for readers that follow it (tail -F, log shippers, the bench's
FileTail): a failed fsync leaves the group's lines, and the retry appends them again (a reader dedupes
on `idempotency_key`); a write that stopped part way leaves a torn line, whose rest is written first
at the next write so the retry never appends after half a line. A rotation, or a close, that fails
after the fsync does not fail the group (its lines are durable, a retry would write them twice): it
is logged, and the rotation is tried again after the next write. A batch's lines stay together and in
order; batches of different partitions interleave.
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
        self._torn = b""  # the rest of the line a failed write left half in the file: written first next time
        self._torn_at = 0  # the file's size that rest belongs after

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
        # Unbuffered: after a failed write no bytes wait in a buffer to land after the torn line's rest.
        # Not `with`: a close that fails after the fsync must not fail the group.
        fh = open(self.current, "ab", buffering=0)
        try:
            size = self._write_and_sync(fh, data)
        finally:
            try:
                fh.close()
            except OSError as exc:  # after the fsync (NFS): the lines are durable, a retry would write them twice
                log.warning("file sink %s: could not close %s: %r", self.config.name, self.current, exc)
        if size >= self.rotate_bytes:
            try:
                self._rotate()
            except OSError as exc:  # the group is durable: acked, and the rotation is tried after the next write
                log.warning("file sink %s: could not rotate %s: %r", self.config.name, self.current, exc)

    def _write_and_sync(self, fh: Any, data: bytes) -> int:
        """Append `data` (after the rest of a torn line, if a failed write left one) and fsync; the file's size.

        Never cuts the file back: a reader may have read what is there already."""
        start = fh.tell()
        if self._torn and start != self._torn_at:  # rotated or written by someone else since: the rest fits nowhere
            log.error(
                "file sink %s: %s is %d bytes, not the %d a failed write left: its torn line stays torn",
                self.config.name,
                self.current,
                start,
                self._torn_at,
            )
            self._torn = b""
        data = self._torn + data
        counted = 0
        try:
            view = memoryview(data)
            while view:
                wrote = fh.write(view)
                counted += wrote
                view = view[wrote:]
        except BaseException:
            self._keep_torn_rest(fh, start, data, counted)
            raise
        self._torn = b""
        # A failure leaves the lines where a reader may have read them: the group fails, its retry appends them again.
        os.fsync(fh.fileno())
        return int(fh.tell())

    def _keep_torn_rest(self, fh: Any, start: int, data: bytes, counted: int) -> None:
        """After a write that stopped part way: keep the rest of the line it tore, to be written first next time."""
        try:
            written = os.fstat(fh.fileno()).st_size - start
        except OSError as exc:  # the disk is failing: trust the bytes write() reported
            log.error("file sink %s: could not stat %s after a failed write: %r", self.config.name, self.current, exc)
            written = counted
        if not 0 <= written <= len(data):
            # Someone else wrote to the file: its end is not ours to complete, and the torn line is left as it is.
            log.error(
                "file sink %s: %s grew by %d bytes in a write of %d: a torn line may be left",
                self.config.name,
                self.current,
                written,
                len(data),
            )
            self._torn = b""
            return
        mid_line = data[written - 1] != ord("\n") if written else bool(self._torn)
        self._torn = data[written : data.index(b"\n", written) + 1] if mid_line else b""
        self._torn_at = start + written

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
