"""The key window's changelog records are typed (shared/window_changelog.py) and keep the untyped wire
layout: a rolling upgrade restores from records the old code wrote, and the old code reads the new ones."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaProducer

from shared.codec import pack, unpack
from shared.keywindow import RocksKeyWindow
from shared.topics import ensure_topics
from shared.window_changelog import ChangelogEntry, decode_changelog, encode_changelog


def _anchor(partition: int) -> Any:
    return SimpleNamespace(partition=partition)


def test_a_changelog_record_keeps_the_untyped_layout() -> None:
    """Byte for byte what the untyped writer packed ([[key, first_seen_ms, claim], ...]), and the old
    reader's unpacking of it gives the same triples."""
    now = time.time() * 1000
    entries = [ChangelogEntry("t:e1", now, "raw:0:7"), ChangelogEntry("hook:t:e2", now + 1.5, "")]
    old_bytes = pack([["t:e1", now, "raw:0:7"], ["hook:t:e2", now + 1.5, ""]])
    assert encode_changelog(entries) == old_bytes
    assert [(str(k), float(t), str(c)) for k, t, c in unpack(encode_changelog(entries))] == [
        ("t:e1", now, "raw:0:7"),
        ("hook:t:e2", now + 1.5, ""),
    ]
    assert decode_changelog(old_bytes) == entries


def test_an_old_record_with_an_integer_timestamp_still_decodes() -> None:
    """The old reader took any number for first_seen (float(t)); so does the typed one."""
    assert decode_changelog(pack([["k", 1_700_000_000_000, "c"]])) == [ChangelogEntry("k", 1.7e12, "c")]


async def test_a_store_restores_from_a_changelog_the_old_code_wrote(kafka, namespace, tmp_path) -> None:
    """A rolling upgrade: the changelog holds records packed by the untyped writer, then one written by
    the typed one; a fresh store (a new pod, no checkpoint) restores every entry, claims included, and
    skips an unreadable record as before."""
    changelog = f"{namespace}.window.changelog"
    await ensure_topics(kafka.bootstrap, [changelog], 1, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        now = time.time() * 1000
        await producer.send_and_wait(changelog, pack([["old-1", now, "raw:0:1"], ["old-2", now, ""]]), partition=0)
        await producer.send_and_wait(changelog, pack([["bad", None, 3]]), partition=0)  # unreadable: skipped
        await producer.send_and_wait(changelog, None, key=b"x", partition=0)  # a tombstone: skipped too
        writer = RocksKeyWindow("w", tmp_path / "writer", changelog, kafka.bootstrap, 600.0, 1, "g")
        await writer.assign([0])
        assert await writer.claim(["new-1"], ["raw:0:9"], [_anchor(0)]) == [True]
        for out in writer.changelog():
            await producer.send_and_wait(out.topic, out.value, key=out.key, partition=out.partition)
        writer.revoke([0])

        fresh = RocksKeyWindow("w", tmp_path / "fresh", changelog, kafka.bootstrap, 600.0, 1, "g")
        await fresh.assign([0])
        keys = ["old-1", "old-2", "new-1", "bad"]
        assert await fresh.seen(keys, [_anchor(0)] * 4) == [True, True, True, False]
        assert await fresh.holders(keys[:3], [_anchor(0)] * 3) == ["raw:0:1", "", "raw:0:9"]
        assert fresh.applied[0] == 4  # the next changelog offset: every record was read, the skipped two included
        fresh.revoke([0])
    finally:
        await producer.stop()


def test_a_record_no_version_wrote_is_refused_so_the_restore_skips_it() -> None:
    """An extra field or a missing value was never written by any version: refused, as the untyped code did."""
    with pytest.raises(msgspec.DecodeError):
        decode_changelog(pack([["k", 1.0, "c", 1]]))
    with pytest.raises(msgspec.DecodeError):
        decode_changelog(None)
