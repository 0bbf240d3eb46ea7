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


async def test_a_batch_of_claims_and_marks_reads_its_own_writes_and_queues_each_once(tmp_path) -> None:
    """A call writes each store once, after it read them all (one WriteBatch per partition), so a key repeated
    within the call must see the claim the call itself took: a copy in the same batch is a copy, the same
    message again is not, and an heir takes over a claim made earlier in the call. Each write reaches the
    changelog once, in order, and survives the store's close and reopen (as writes one key at a time did)."""
    window = RocksKeyWindow("w", tmp_path / "w", "unused.changelog", "127.0.0.1:1", 600.0, 2, "g")
    window.open([0, 1])
    p0, p1 = _anchor(0), _anchor(1)
    fresh = await window.claim(["k1", "k1", "k2", "k1", "k1"], ["m1", "m2", "m3", "m1", "m9"], [p0, p0, p0, p0, p1])
    assert fresh == [True, False, True, True, True], "a copy in the batch; the same message again; k1 of p1 apart"
    assert await window.holders(["k1", "k2", "k1"], [p0, p0, p1]) == ["m1", "m3", "m9"]
    fresh = await window.claim(["k1", "k1", "k1"], ["m4", "m5", "m4"], [p0, p0, p0], inherited=["m1", None, None])
    assert fresh == [True, False, True], "the heir holds k1 from there on, within the call"
    await window.mark(["a", "a", "b"], [p1, p1, p0])
    assert await window.seen(["a", "b", "c"], [p1, p0, p0]) == [True, True, False]

    records = {out.partition: decode_changelog(out.value) for out in window.changelog()}
    assert [(e.key, e.claim) for e in records[0]] == [("k1", "m1"), ("k2", "m3"), ("k1", "m4"), ("b", "")]
    assert [(e.key, e.claim) for e in records[1]] == [("k1", "m9"), ("a", ""), ("a", "")]
    assert window.changelog() == [], "queued once"

    window.revoke([0, 1])
    window.open([0, 1])
    assert await window.holders(["k1", "k2", "k1"], [p0, p0, p1]) == ["m4", "m3", "m9"]
    assert await window.claim(["k1"], ["m7"], [p0]) == [False]
    window.revoke([0, 1])


async def test_a_key_that_fails_part_way_keeps_the_marks_and_claims_before_it(tmp_path) -> None:
    """Writes one key at a time kept what came before a failing key; a batch written only at the end would drop
    it. A sender logs a failed mark and moves on (the sink acked): a dropped mark is a second delivery later."""
    window = RocksKeyWindow("w", tmp_path / "w", "unused.changelog", "127.0.0.1:1", 600.0, 1, "g")
    window.open([0])
    with pytest.raises(AttributeError):
        await window.mark(["x", "y"], [_anchor(0), object()])  # y's anchor names no partition: `_db` raises
    with pytest.raises(AttributeError):
        await window.claim(["k", "j"], ["m1", "m2"], [_anchor(0), object()])
    assert await window.seen(["x", "y", "k"], [_anchor(0)] * 3) == [True, False, True]
    assert [(e.key, e.claim) for e in decode_changelog(window.changelog()[0].value)] == [("x", ""), ("k", "m1")]
    window.revoke([0])
