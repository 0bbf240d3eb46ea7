"""The file sink's group commit: concurrent batches share one fsync, and none is acked before its fsync."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from services.sender.file_sink import FileSink
from shared.config import SinkConfig
from shared.errors import TransientError
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


class HalfWrite:
    """A real file whose second write stops halfway with ENOSPC: bytes reached the file, the write failed."""

    writes = 0

    def __init__(self, fh: Any) -> None:
        self.fh = fh

    def write(self, data: bytes) -> int:
        HalfWrite.writes += 1
        if HalfWrite.writes == 2:
            self.fh.write(bytes(data)[: len(data) // 2])
            self.fh.flush()
            raise OSError(28, "No space left on device")
        return self.fh.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)

    def __enter__(self) -> HalfWrite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()


async def deliver_as_the_sender_does(sink: FileSink, events: list[Event], attempts: int = 3) -> int:
    """Deliver, retrying a failed batch as the sender does; returns how many attempts failed."""
    from shared.errors import TransientError

    for failed in range(attempts):
        try:
            await sink.deliver_batch(events)
            return failed
        except TransientError:
            continue
    raise AssertionError(f"not delivered in {attempts} attempts")


def rotated(directory: Path) -> list[Path]:
    return list(directory.glob("events-*.jsonl"))


def lines_of(directory: Path) -> list[dict[str, Any]]:
    """Every line of every file, each of which must parse."""
    out = []
    for path in sorted(directory.glob("*.jsonl")):
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            try:
                out.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"{path.name}:{number} does not parse: {line[:80]!r}") from None
    return out


async def test_a_write_failing_halfway_leaves_no_torn_line(tmp_path: Path, monkeypatch) -> None:
    """ENOSPC after half a group reached the file: the retry must not append after a torn line (one
    unparseable line, one event lost at the reader), nor cut off what a reader following the file read
    already: the rest of the torn line is written first, then the retried group again."""
    import services.sender.file_sink as file_sink_module
    from devtools.bench_measure import FileTail

    HalfWrite.writes = 0
    monkeypatch.setattr(file_sink_module, "open", lambda *a, **k: HalfWrite(open(*a, **k)), raising=False)
    tail = FileTail(path=tmp_path / "events.jsonl")
    sink = FileSink(SinkConfig("f", "file", {"path": str(tmp_path), "rotate_bytes": 1 << 30}))
    await sink.start()
    await sink.deliver_batch(timed_batch(0))
    with pytest.raises(TransientError):
        await sink.deliver_batch(timed_batch(1))
    tail.poll()  # the reader holds half a line
    await sink.deliver_batch(timed_batch(1))
    await sink.deliver_batch(timed_batch(2))
    tail.poll()  # raises if a line it reads does not parse
    got = [r["event_id"] for r in lines_of(tmp_path)]
    ids = [[e.event_id for e in timed_batch(p)] for p in range(3)]
    torn = got[5:-10]  # the lines of the failed write, the torn one completed
    assert got[:5] == ids[0] and got[-10:] == ids[1] + ids[2] and 0 < len(torn) < 5 and torn == ids[1][: len(torn)]
    assert set(tail.seen) == {i for batch_ids in ids for i in batch_ids}


async def test_a_failed_rotation_after_the_fsync_acks_the_group(tmp_path: Path, monkeypatch) -> None:
    """The lines were durable when os.replace failed: failing the group made the sender write them again
    (a copy per retry). The rotation is retried at the next write instead."""
    real_replace = os.replace

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", broken_replace)
    sink = FileSink(SinkConfig("f", "file", {"path": str(tmp_path), "rotate_bytes": 100}))
    await sink.start()
    for p in range(3):
        await deliver_as_the_sender_does(sink, batch(p))
    got = [r["event_id"] for r in lines_of(tmp_path)]
    assert got == [e.event_id for p in range(3) for e in batch(p)], "a line was written twice"
    monkeypatch.setattr(os, "replace", real_replace)
    await sink.deliver_batch(batch(3))
    assert rotated(tmp_path), "the rotation was not retried"
    assert sorted(r["event_id"] for r in lines_of(tmp_path)) == sorted(e.event_id for p in range(4) for e in batch(p))


async def test_an_unexpected_error_in_the_writer_fails_its_group_and_the_writer_goes_on(
    tmp_path: Path, monkeypatch
) -> None:
    """Not an OSError (a bug, a codec error): the group's callers must not wait forever on unset futures."""

    def buggy_fsync(fd: int) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(os, "fsync", buggy_fsync)
    sink = FileSink(SinkConfig("f", "file", {"path": str(tmp_path), "rotate_bytes": 1 << 30}))
    await sink.start()
    async with asyncio.timeout(1):
        outcomes = await asyncio.gather(*(sink.deliver_batch(batch(p)) for p in range(3)), return_exceptions=True)
    assert all(isinstance(o, Exception) for o in outcomes), outcomes
    monkeypatch.undo()
    await sink.deliver_batch(batch(9))
    got = [r["event_id"] for r in lines_of(tmp_path)]  # the failed group's lines stay (append-only), unacked
    assert got[-5:] == [e.event_id for e in batch(9)], got


def timed_batch(partition: int, n: int = 5) -> list[Event]:
    """Events as the bench sends them: FileTail measures each one's latency from payload.intended_ms."""
    return [Event(f"p{partition}-{i}", "play", 1.0, "acme", {"intended_ms": 0, "ua": "é"}) for i in range(n)]


async def test_a_reader_following_the_file_survives_a_failed_fsync(tmp_path: Path, monkeypatch) -> None:
    """fsync fails (EIO) after a reader following the file already read the group's lines: cutting them off made
    the reader go on mid-line after the retry. The file stays append-only; a copy shares its idempotency_key."""
    from devtools.bench_measure import FileTail

    tail = FileTail(path=tmp_path / "events.jsonl")
    real_fsync = os.fsync
    failures = [OSError(5, "Input/output error")]

    def fsync_failing_once(fd: int) -> None:
        if failures:
            tail.poll()  # the reader saw the group's lines before the fsync failed
            raise failures.pop()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_failing_once)
    sink = FileSink(SinkConfig("f", "file", {"path": str(tmp_path), "rotate_bytes": 1 << 30}))
    await sink.start()
    with pytest.raises(TransientError):
        await sink.deliver_batch(timed_batch(0))
    await sink.deliver_batch(timed_batch(1, n=3))  # another partition's batch goes before the retry
    await sink.deliver_batch(timed_batch(0))
    await sink.deliver_batch(timed_batch(2))
    tail.poll()  # raises if a line it reads does not parse
    want = {e.event_id for p in (0, 2) for e in timed_batch(p)} | {e.event_id for e in timed_batch(1, n=3)}
    assert set(tail.seen) == want, sorted(want - set(tail.seen))
    keys: dict[str, set[str]] = {}
    for record in lines_of(tmp_path):
        keys.setdefault(record["event_id"], set()).add(record["idempotency_key"])
    assert all(len(k) == 1 for k in keys.values()), keys


class FailingClose:
    """A real file whose close fails (NFS reports a write-back error there) once its data was fsynced."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh

    def close(self) -> None:
        self.fh.close()
        raise OSError(5, "Input/output error")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)

    def __enter__(self) -> FailingClose:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def test_a_close_failing_after_the_fsync_acks_the_group(tmp_path: Path, monkeypatch) -> None:
    """The lines were durable when close() failed: failing the group made the sender write them again."""
    import services.sender.file_sink as file_sink_module

    monkeypatch.setattr(file_sink_module, "open", lambda *a, **k: FailingClose(open(*a, **k)), raising=False)
    sink = FileSink(SinkConfig("f", "file", {"path": str(tmp_path), "rotate_bytes": 1 << 30}))
    await sink.start()
    for p in range(2):
        assert await deliver_as_the_sender_does(sink, batch(p)) == 0
    assert [r["event_id"] for r in lines_of(tmp_path)] == [e.event_id for p in range(2) for e in batch(p)]
