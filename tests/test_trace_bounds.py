"""The trace's records and index stay bounded: receipts and tallies under Kafka's request size with their
counts complete, one event id's hash capped, sink error text kept out, a slow Redis off the read path."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry

from devtools.redis import LocalRedis
from services.auditor.app import Auditor
from services.auditor.ledger import LossLedger
from services.sender.delivery import SinkDelivery
from shared.alerts import Alerter
from shared.audit import accepted_tallies, batch_tallies, error_code, trace_note
from shared.codec import pack, unpack
from shared.config import HifiConfig, Settings
from shared.dlq import DeadLetter
from shared.errors import PermanentSinkError
from shared.event import Event
from shared.service import ServiceContext
from shared.step import Record
from shared.trace import CHUNK, COALESCE_S, TraceIndex
from tests.helpers import tenant_block

MAX_VALUE = 900_000  # under Kafka's 1 MB max.request.size with headroom for the record's framing
STAGES = {"collector": 1.0, "enricher": 2.0, "deduplicator": 3.0, "router": 4.0}


def long_id(i: int) -> str:
    return f"{i:08d}".ljust(128, "x")


def records(n: int, outcome: str, topic: str = "in", partition: int = 0) -> list[Record]:
    out = []
    for i in range(n):
        tenant = "acme" if i % 3 else "globex"
        event = Event(long_id(i), "click", 1.0, tenant, ingest_ts=1000.0 + i, stages=dict(STAGES))
        message = ConsumerRecord(topic, partition, i, 0, 0, b"k", b"v", None, 1, 1, [])
        out.append(Record(event, message, outcome=outcome))
    return out


def test_tallies_of_10000_skipped_events_stay_under_the_request_size_and_count_every_one():
    batch = records(10_000, "skipped")
    outputs = batch_tallies("sender.hook", "tallies", 10, [r.message for r in batch], batch, [])
    values = [unpack(o.value) for o in outputs]
    assert max(len(o.value) for o in outputs) < MAX_VALUE, [len(o.value) for o in outputs]
    ledger = LossLedger(lambda tenant: ("hook",), bucket_s=10, settle_s=30)
    for value in values:
        ledger.add_tally(value)
    assert sum(ledger.totals["sender.hook"].values()) == 10_000 and ledger.replayed == 0
    assert sum(run[3] for v in values for run in v["runs"]) == 10_000
    assert sorted(row[0] for v in values for row in v.get("events", ())) == list(range(10_000))


def test_the_collectors_accepted_tally_of_10000_events_is_split_with_its_count():
    where = {"topic": "raw", "ingest_ts": 1.0, "events": [[long_id(i), i % 4, i] for i in range(10_000)]}
    values = accepted_tallies("collector", "acme", 0, 10_000, where)
    assert max(len(v) for v in values) < MAX_VALUE
    tallies = [unpack(v) for v in values]
    assert sum(t["runs"][0][3] for t in tallies) == 10_000
    assert sum(len(t["accepted"]["events"]) for t in tallies) == 10_000


def test_receipts_for_10000_events_stay_under_the_request_size_and_list_every_one():
    sender = SimpleNamespace(receipts_topic="receipts", replay_of={}, name="hook")
    outputs = SinkDelivery._receipts(sender, records(10_000, "delivered"), 5000.0, 1)  # type: ignore[arg-type]
    assert max(len(o.value) for o in outputs) < MAX_VALUE, [len(o.value) for o in outputs]
    values = [unpack(o.value) for o in outputs]
    assert all(len(v["events"]) == len(v["trace"]) for v in values)
    assert sorted(row[0] for v in values for row in v["events"]) == sorted(long_id(i) for i in range(10_000))


def test_a_sink_error_text_stays_out_of_the_tally():
    (record,) = records(1, "dead_lettered")
    error = PermanentSinkError("sink said 400: {'email': 'jane@example.com'} is invalid", status=400)
    note = trace_note(record, DeadLetter(record.message, error, 3))
    assert "jane" not in repr(note)
    assert note["reason"] == "PermanentSinkError" and note["error"] == "status 400" and note["attempts"] == 3


async def test_one_event_ids_hash_stays_capped(redis_server, namespace):
    index = TraceIndex(redis_server.url, namespace, ttl_s=60)
    try:
        for i in range(500):  # a client that sends every event as "undefined"
            row = ["undefined", "acme", 1.0, 1, False]
            index.add_receipt(unpack(pack({"sink": "hook", "delivered_ts": 5.0 + i, "events": [row],
                                           "trace": [["k", STAGES, f"s:0:{i}"]]})))  # fmt: skip
            index.add_tally({"stage": "deduplicator", "topic": "e", "partition": 0, "first": i, "runs": [], "at": 1.0,
                             "events": [[i, "undefined", "dup", "acme", {"claim": "e:0:0"}]]})  # fmt: skip
            await index.write_pending()
        assert await index.client.hlen(index.key("undefined")) <= index.max_fields + 1
        found = await index.lookup("undefined")
        assert found["tenants"]["acme"]["more_facts"] > 0
    finally:
        await index.close()


async def test_a_second_delivery_keeps_the_first_and_ties_break_on_partition_and_offset(redis_server, namespace):
    index = TraceIndex(redis_server.url, namespace, ttl_s=60)
    try:
        accepted = {"topic": "raw", "ingest_ts": 1000.0, "events": [["tie", 3, 9], ["tie", 1, 20], ["tie", 1, 4]]}
        index.add_tally({"stage": "collector", "runs": [["acme", 0, "accepted", 3]], "at": 1.0, "accepted": accepted})
        for acked, source in ((2000.0, "s:0:1"), (3000.0, "s:1:7")):
            index.add_receipt({"sink": "hook", "delivered_ts": acked, "events": [["tie", "acme", 1000.0, 1, False]],
                               "trace": [[f"k{source}", {"router": acked - 10}, source]]})  # fmt: skip
        await index.write_pending()
        path = (await index.lookup("tie"))["tenants"]["acme"]
        assert (path["accepted"]["partition"], path["accepted"]["offset"], path["accepted"]["copies"]) == (1, 4, 3)
        hook = path["sinks"]["hook"]
        assert (hook["acked_ts"], hook["source"], hook["deliveries"]) == (2000.0, "s:0:1", 2)
        assert path["stages"] == {"router": 1990.0}
    finally:
        await index.close()


def make_auditor(tmp_path: Path, settings: Settings) -> Auditor:
    config = tmp_path / "hifi.yaml"
    config.write_text(
        "tenants:\n" + tenant_block("acme", "acme-key-0001", ["hook"]) + "sinks:\n"
        '  hook: {type: webhook, url: "http://127.0.0.1:1/in"}\n'
    )
    ctx = ServiceContext(name="auditor", settings=settings, config=HifiConfig.load(config))
    return Auditor(ctx, Alerter("auditor"))


def test_trace_index_url_comes_from_its_own_setting(redis_server, namespace, tmp_path):
    settings = Settings.from_env({"HIFI_REDIS_URL": "redis://127.0.0.1:6404/3", "HIFI_NAMESPACE": namespace})
    assert settings.trace_index_url == "redis://127.0.0.1:6404/4"  # default: same server, the next db
    own = Settings.from_env({"HIFI_REDIS_URL": "redis://a:1/0", "HIFI_TRACE_REDIS_URL": "redis://b:2/5"})
    assert own.trace_index_url == "redis://b:2/5"
    auditor = make_auditor(tmp_path, own)
    assert auditor.trace.client.connection_pool.connection_kwargs["host"] == "b"


async def test_a_bad_events_row_does_not_cost_the_ledger_its_counts(redis_server, namespace, tmp_path):
    auditor = make_auditor(tmp_path, Settings(redis_url=redis_server.url, namespace=namespace))
    try:
        tally = {"stage": "deduplicator", "topic": "e", "partition": 0, "first": 0, "at": 1.0,
                 "runs": [["acme", 100, "out", 5], ["acme", 100, "dup", 1]], "events": [[5, "x"]]}  # fmt: skip
        try:
            auditor.on_tally(tally)
        except Exception:
            pass  # the reader logs it; what matters is whether the ledger counted
        assert sum(auditor.ledger.totals["deduplicator"].values()) == 6
    finally:
        await auditor.trace.close()


async def test_a_slow_redis_does_not_hold_up_the_auditors_reading(redis_server, namespace, tmp_path):
    auditor = make_auditor(tmp_path, Settings(redis_url=redis_server.url, namespace=namespace))
    index = auditor.trace
    real_write = index._write

    async def slow_write(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(3.0)
        return await real_write(*args, **kwargs)

    index._write = slow_write  # type: ignore[method-assign]
    try:
        started = time.monotonic()
        for i in range(3):
            events = [[i, f"e{i}", "dup", "acme", {}]]
            auditor.on_tally({"stage": "deduplicator", "topic": "e", "partition": 0, "first": i, "at": 1.0,
                              "runs": [["acme", 100, "dup", 1]], "events": events})  # fmt: skip
            await asyncio.wait_for(index.flush(), 5.0)  # what the reader awaits after each batch
        assert time.monotonic() - started < 1.0
        deadline = time.monotonic() + 10
        while not (await index.lookup("e2"))["found"]:  # written in the background
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    finally:
        await index.close()


async def test_dropped_facts_are_counted_and_logged_once_per_episode(redis_server, namespace, caplog):
    registry = CollectorRegistry()
    index = TraceIndex("redis://127.0.0.1:1/0", namespace, ttl_s=60, max_pending=2, registry=registry)
    try:
        with caplog.at_level(logging.WARNING, logger="shared.trace"):
            for event_id in ("a", "b", "c", "d"):
                index.add_receipt({"sink": "hook", "delivered_ts": 5.0, "events": [[event_id, "acme", 1.0, 1, False]],
                                   "trace": [["k", {}, "s:0:0"]]})  # fmt: skip
        assert index.dropped == 2 and registry.get_sample_value("hifi_trace_facts_dropped_total") == 2  # c, d
        assert sum("dropping facts" in r.getMessage() for r in caplog.records) == 1  # one line per episode
    finally:
        await index.close()


async def test_the_index_stops_writing_near_the_servers_maxmemory(namespace, port_base, tmp_path):
    """On a server shared with dedupe claims (noeviction), the index's facts must not be what runs it out.

    A Redis of its own: maxmemory is server-wide, and on the suite's shared server it would make every other
    test's index (and dedupe claims) meet a full server while this test runs."""
    server = LocalRedis(url=f"redis://127.0.0.1:{port_base + 9}/0", data_dir=tmp_path / "redis")
    server.ensure()
    index = TraceIndex(server.url, namespace, ttl_s=60)
    try:
        used = int((await index.client.info("memory"))["used_memory"])
        await index.client.config_set("maxmemory", str(int(used * 1.1)))  # 91 % full: past the 80 % ceiling
        index.add_receipt({"sink": "hook", "delivered_ts": 5.0, "events": [["full", "acme", 1.0, 1, False]],
                           "trace": [["k", {}, "s:0:0"]]})  # fmt: skip
        assert await index.write_pending() == 0 and index.dropped == 1  # the one delivery's fact
        assert not (await index.lookup("full"))["found"]
    finally:
        await index.close()
        server.stop()


def test_an_error_chain_that_loops_or_a_cause_that_is_not_an_error_still_gives_a_code():
    """Review of the split: `error_code` walked `__cause__` with no end (a loop froze the stage's event loop)
    and read `.__cause__` on whatever a third-party error kept in `cause` (a crash in the publish path)."""
    looped = ValueError("x")
    looped.__cause__ = looped
    assert error_code(looped) == "ValueError"

    class Odd(Exception):
        cause = "the text of something"

    assert error_code(Odd("y")) == "Odd"


async def test_a_backlog_stops_at_the_chunk_where_the_server_fills_up(redis_server, namespace):
    """The ceiling is asked again before each chunk of a backlog, not once per write: past it, the rest is
    dropped and counted, and what was written stays."""

    class FillsAfterOneChunk(TraceIndex):
        readings = iter([False, True])

        async def _memory_full(self, fresh: bool = False) -> bool:
            return next(self.readings)

    index = FillsAfterOneChunk(redis_server.url, namespace, ttl_s=60)
    try:
        for i in range(CHUNK + 10):
            index.add_receipt({"sink": "hook", "delivered_ts": 5.0, "events": [[f"e{i}", "acme", 1.0, 1, False]],
                               "trace": [["k", {}, f"s:0:{i}"]]})  # fmt: skip
        assert await index.write_pending() == CHUNK
        assert index.dropped == 10  # the second chunk's facts (one per delivery), counted
        assert (await index.lookup("e0"))["found"] and not (await index.lookup(f"e{CHUNK}"))["found"]
    finally:
        await index.close()


async def test_a_chunk_of_500_events_is_one_script_call_of_a_few_arguments(redis_server, namespace):
    """Issue 16: redis-py built the script call in Python with every field and value (and key) as its own
    argument, 30 % of the auditor's CPU; a chunk now travels as one msgpack argument the script unpacks."""
    index = TraceIndex(redis_server.url, namespace, ttl_s=60)
    real_write = index._write
    calls: list[int] = []

    async def counting_write(keys: Any = None, args: Any = None, client: Any = None) -> Any:
        calls.append(len(keys or ()) + len(args or ()))
        return await real_write(keys=keys, args=args, client=client)

    index._write = counting_write  # type: ignore[method-assign]
    try:
        for i in range(CHUNK):
            index.add_receipt({"sink": "hook", "delivered_ts": 5.0, "events": [[f"e{i}", "acme", 1.0, 1, False]],
                               "trace": [["k", {"router": 4.0}, f"s:0:{i}"]]})  # fmt: skip
        assert await index.write_pending() == CHUNK
        assert calls == [3]
        path = (await index.lookup(f"e{CHUNK - 1}"))["tenants"]["acme"]
        assert path["stages"] == {"router": 4.0} and path["sinks"]["hook"]["source"] == f"s:0:{CHUNK - 1}"
    finally:
        await index.close()


async def test_a_hash_near_its_cap_keeps_its_first_facts_and_counts_the_rest(redis_server, namespace):
    """Facts that fit are written in the order they came, updates to facts the hash holds always land, and the
    rest are counted in `#more` with what the auditor already counted before writing."""
    index = TraceIndex(redis_server.url, namespace, ttl_s=60, max_fields=4)
    key = index.key("near")
    try:
        index._put("near", "a", {"n": 1})
        index._put("near", "b", {"n": 1})
        await index.write_pending()
        for field in ("c", "a", "d", "e"):  # room for 2 new: c and d; a is an update; e is over
            index._put("near", field, {"n": 2})
        await index.write_pending()
        assert await index.client.hkeys(key) == [b"a", b"b", b"c", b"d", b"#more"]
        assert unpack(await index.client.hget(key, "a")) == {"n": 2} and await index.client.hget(key, "#more") == b"1"
        for field in "fghij":  # f to i fill the pending entry (its own cap): j is counted there
            index._put("near", field, {"n": 3})
        await index.write_pending()
        fields = await index.client.hgetall(key)
        assert sorted(fields) == [b"#more", b"a", b"b", b"c", b"d"] and int(fields[b"#more"]) == 1 + 4 + 1
        assert 0 < await index.client.pttl(key) <= 60_000
        assert await index.client.hlen(key) <= index.max_fields + 1
    finally:
        await index.close()


async def test_a_delivery_is_one_fact_and_a_hash_from_before_reads_the_same(redis_server, namespace):
    """Issue 16: each delivery wrote a `path` fact (stamps) beside its `sink` fact, repeating tenant, ack and
    source; now the sink fact carries the stamps. A hash the previous version wrote (live for trace_ttl_s after
    an upgrade) must read back exactly as one written now."""
    index = TraceIndex(redis_server.url, namespace, ttl_s=60)
    stages = {"router": 40.0, "collector": 10.0, "enricher": 20.0, "deduplicator": 30.0}
    accepted = {"topic": "raw", "ingest_ts": 10.0, "events": [["new", 2, 7]]}
    try:
        index.add_tally({"stage": "collector", "runs": [["acme", 0, "accepted", 1]], "at": 1.0, "accepted": accepted})
        for sink, acked in (("hook", 90.0), ("files", 80.0)):
            index.add_receipt({"sink": sink, "delivered_ts": acked, "events": [["new", "acme", 10.0, 2, False]],
                               "trace": [[f"{sink}:acme:new", stages, f"out.{sink}:0:5"]]})  # fmt: skip
        await index.write_pending()
        assert await index.client.hlen(index.key("new")) == 3  # accepted, and one fact per sink

        old = dict(await index.client.hgetall(index.key("new")))  # the same facts as the previous version wrote
        for field, value in list(old.items()):
            fact = unpack(value)
            if fact["kind"] == "sink":
                stamps = fact.pop("stages")
                old[field] = pack(fact)
                path = {"kind": "path", "tenant": "acme", "stages": stamps, "acked_ts": fact["acked_ts"],
                        "source": fact["source"]}  # fmt: skip
                old[f"path|acme|{fact['source']}".encode()] = pack(path)
        await index.client.hset(index.key("old"), mapping=old)
        new_trace, old_trace = await index.lookup("new"), await index.lookup("old")
        assert {**old_trace, "event_id": "new"} == new_trace
        shown = new_trace["tenants"]["acme"]
        assert list(shown["stages"]) == ["collector", "enricher", "deduplicator", "router"]
        assert shown["sinks"]["files"]["acked_ts"] == 80.0 and shown["sinks"]["hook"]["attempts"] == 2
    finally:
        await index.close()


async def test_a_tally_row_with_an_id_that_is_not_a_string_costs_no_other_events_trace(redis_server, namespace):
    """Tally rows are read loosely (a bad row from a buggy or future writer costs that row): the writer must
    not lose the whole pending batch over one such id."""
    index = TraceIndex(redis_server.url, namespace, ttl_s=60)
    try:
        index.add_receipt(
            {"sink": "hook", "delivered_ts": 5.0, "events": [["good", "acme", 1.0, 1, False]],
             "trace": [["k", {"collector": 1.0}, "s:0:1"]]}
        )  # fmt: skip
        index.add_tally(
            {"stage": "router", "topic": "t", "partition": 0, "first": 1, "runs": [], "at": 1.0,
             "events": [[1, 12345, "dlq", "acme", None]]}
        )  # fmt: skip
        assert await index.write_pending() == 2
        assert (await index.lookup("good"))["found"]
    finally:
        await index.close()


async def test_an_events_facts_flushed_by_three_reads_leave_in_one_script_call(redis_server, namespace):
    """Issue 16: the writer woke on every flush (every read of tallies and receipts) and wrote an event's
    collector fact and each sink's receipt in a call of their own; it now holds facts COALESCE_S, so the
    three arrive in one call, and `hifi trace` finds them that much later."""
    index = TraceIndex(redis_server.url, namespace, ttl_s=60)
    real_write = index._write
    calls: list[float] = []

    async def counting_write(keys: Any = None, args: Any = None, client: Any = None) -> Any:
        calls.append(time.monotonic())
        return await real_write(keys=keys, args=args, client=client)

    index._write = counting_write  # type: ignore[method-assign]
    accepted = {"topic": "raw", "ingest_ts": 10.0, "events": [["e1", 2, 7]]}
    try:
        started = time.monotonic()
        index.add_tally({"stage": "collector", "runs": [["acme", 0, "accepted", 1]], "at": 1.0, "accepted": accepted})
        await index.flush()
        for sink in ("hook", "files"):
            await asyncio.sleep(0.05)  # the next read of the auditor's consumer
            index.add_receipt({"sink": sink, "delivered_ts": 11.0, "events": [["e1", "acme", 10.0, 1, False]],
                               "trace": [[f"{sink}:acme:e1", {"router": 4.0}, f"out.{sink}:0:5"]]})  # fmt: skip
            await index.flush()
        await asyncio.sleep(COALESCE_S + 1.0)  # long past the window: a second call would have been made
        assert index.written == 1
        assert len(calls) == 1, calls
        assert calls[0] - started >= COALESCE_S
        assert await index.client.hlen(index.key("e1")) == 3
    finally:
        await index.close()
