"""The file sink's group commit: concurrent batches share one fsync, and none is acked before its fsync."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

from services.sender.file_sink import FileSink
from shared.config import SinkConfig
from shared.event import Event
from tests.helpers import read_file_sink


def batch(partition: int, n: int = 5) -> list[Event]:
    return [Event(f"p{partition}-{i}", "play", 1.0, "acme", {"i": i, "ua": "é"}) for i in range(n)]


async def test_concurrent_batches_share_an_fsync_and_ack_after_it(tmp_path: Path, monkeypatch) -> None:
    """A slow disk (fsync 50 ms): 8 partitions delivering at once are not 8 fsyncs in a row, and each batch
    returns only once an fsync covered every byte of it."""
    real_fsync = os.fsync
    synced: list[int] = []  # the file's size at each fsync: what is durable after it
    lock = threading.Lock()

    def slow_fsync(fd: int) -> None:
        size = os.fstat(fd).st_size
        time.sleep(0.05)
        real_fsync(fd)
        with lock:
            synced.append(size)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    sink = FileSink(SinkConfig("f", "file", {"path": str(tmp_path), "rotate_bytes": 1 << 30}))
    await sink.start()

    async def deliver(partition: int) -> None:
        await sink.deliver_batch(batch(partition))
        durable = max(synced, default=0)
        prefix = (tmp_path / "events.jsonl").read_bytes()[:durable].decode()
        for event in batch(partition):  # every line of this batch lies within what an fsync covered
            assert f'"event_id":"{event.event_id}"' in prefix, event.event_id

    started = time.monotonic()
    await asyncio.gather(*(deliver(p) for p in range(8)))
    elapsed = time.monotonic() - started
    assert len(synced) <= 3, f"{len(synced)} fsyncs for 8 concurrent batches"
    assert elapsed < 8 * 0.05, elapsed
    got = read_file_sink(tmp_path)
    assert sorted(r["event_id"] for r in got) == sorted(e.event_id for p in range(8) for e in batch(p))
    assert {r["payload"]["ua"] for r in got} == {"é"}
    for p in range(8):  # a batch's lines stay together and in order
        ids = [r["event_id"] for r in got if r["event_id"].startswith(f"p{p}-")]
        assert ids == [e.event_id for e in batch(p)]


async def test_a_failed_write_fails_every_batch_of_its_group(tmp_path: Path, monkeypatch) -> None:
    """No batch of a group whose fsync failed is acked: each raises TransientError (the sender retries it)."""
    from shared.errors import TransientError

    def broken_fsync(fd: int) -> None:
        time.sleep(0.02)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    sink = FileSink(SinkConfig("f", "file", {"path": str(tmp_path), "rotate_bytes": 1 << 30}))
    await sink.start()
    outcomes = await asyncio.gather(*(sink.deliver_batch(batch(p)) for p in range(4)), return_exceptions=True)
    assert all(isinstance(o, TransientError) for o in outcomes), outcomes
    monkeypatch.undo()
    await sink.deliver_batch(batch(9))  # the sink recovers once the disk does
