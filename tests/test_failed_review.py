"""Findings of a review of schemas, quarantine and `hifi failed replay`, one test each: consent kept on
replay, a replay dead-lettered at the enricher still passes the deduplicator once, validation never
changes the event, /failed and warn-mode flags leak no value, a catastrophic pattern is refused at load,
and an interrupted replay leaves no event without its accepted tally."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry

from services.deduplicator.app import DedupeWindow
from services.enricher.app import Enricher
from shared import quarantine
from shared.alerts import Alerter
from shared.app import durable_producer
from shared.codec import encode_event, pack, unpack
from shared.config import HifiConfig, hash_api_key
from shared.dlq import REPLAY_OF, dead_letter_value, replay_headers
from shared.errors import ConfigError
from shared.event import Event, EventValidator, now_ms
from shared.metrics import StageMetrics
from shared.quarantine import FailedEvents, SchemaGate, replayed_event
from shared.redis_window import RedisKeyWindow
from shared.schemas import CompiledSchema, client_view
from shared.stage import DeadLetter, Record
from shared.topics import Topics, ensure_topics
from shared.transforms import parse_transform
from shared.web import redact_failed

EMAIL = "jane.doe.secret@example.com"


def config(schemas: dict[str, Any]) -> dict[str, Any]:
    return {
        "tenants": {"acme": {"api_keys": [hash_api_key("k")], "sinks": ["hook"], "schemas": schemas}},
        "sinks": {"hook": {"type": "webhook", "url": "http://127.0.0.1:1/x"}},
    }


def full_event(payload: dict[str, Any] | None = None) -> Event:
    return Event(
        "e-1",
        "play",
        1.0,
        "acme",
        payload=payload if payload is not None else {"title_id": "x"},
        device_id="d-1",
        session_id="s-1",
        context={"ip": "10.0.0.1"},
        consent=["analytics"],
        schema_version="2",
        ingest_ts=1000.0,
    )


STRICT = {"type": "object", "properties": {"payload": {"properties": {"title_id": {"pattern": "^t-"}}}}}


# 1. consent (and any client field) survives quarantine and replay
def test_the_client_view_and_a_replay_keep_every_client_field():
    event = full_event()
    assert set(client_view(event)) == EventValidator.CLIENT_FIELDS
    gate = SchemaGate(HifiConfig.parse(config({"types": {"play": STRICT}})), Topics("ns"), CollectorRegistry())
    out = gate.quarantine(Record(event, consumer_record("ns.hifi.enriched", 1, event, [])))
    assert out is not None
    replayed = replayed_event(unpack(out.value))
    for name in EventValidator.CLIENT_FIELDS:
        assert getattr(replayed, name) == getattr(event, name), name
    assert replayed.tenant == "acme" and replayed.ingest_ts > event.ingest_ts


# 3. validation must not fill schema defaults into the delivered event
def test_checking_an_event_never_changes_it():
    schema = {
        "type": "object",
        "properties": {
            "payload": {"type": "object", "properties": {"quality": {"type": "string", "default": "hd"}}},
            "context": {"type": "object", "properties": {"app": {"default": "web"}}},
        },
    }
    compiled = CompiledSchema("play", schema, "here")
    assert compiled.fast is not None
    event = full_event({"title_id": "t-1"})
    gate = SchemaGate(HifiConfig.parse(config({"types": {"play": schema}})), Topics("ns"), CollectorRegistry())
    assert gate.quarantine(Record(event, consumer_record("c", 0, event, []))) is None
    assert event.payload == {"title_id": "t-1"} and event.context == {"ip": "10.0.0.1"}


# 4. /failed: a message at an ancestor of a redacted field quotes the whole object
@pytest.mark.parametrize(
    "schema",
    [
        {"properties": {"payload": {"maxProperties": 1}}},
        {"properties": {"payload": {"not": {"required": ["email"]}}}},
        {"properties": {"payload": {"anyOf": [{"required": ["nope"]}, {"maxProperties": 0}]}}},
        {"properties": {"payload": {"type": "array"}}},
        {"properties": {"payload": {"enum": [1]}}},
        {"properties": {"payload": {"minProperties": 5}}},
        {"maxProperties": 1},
    ],
)
def test_the_failed_view_never_shows_a_redacted_value_in_a_message(schema):
    gate = SchemaGate(HifiConfig.parse(config({"types": {"play": schema}})), Topics("ns"), CollectorRegistry())
    event = full_event({"email": EMAIL, "title_id": "t-1"})
    out = gate.quarantine(Record(event, consumer_record("c", 0, event, [])))
    assert out is not None
    record = unpack(out.value)
    assert EMAIL in json.dumps(record["violations"])  # the fault: the message quotes the object
    shown = redact_failed(record, {"email"})
    assert EMAIL not in json.dumps(shown)
    assert all(v["pointer"] is not None and v["rule"] for v in shown["violations"])
    # a message about a field not redacted, in an object without one, is kept
    kept = redact_failed(record, {"other"})
    assert kept["violations"] == record["violations"]


# 5. warn mode: the delivered flag carries pointer and rule, never the value
def test_a_warn_flag_does_not_carry_values_past_the_sink_transform():
    schema = {"properties": {"payload": {"properties": {"email": {"type": "string", "maxLength": 5}}}}}
    gate = SchemaGate(
        HifiConfig.parse(config({"mode": "warn", "types": {"play": schema}})), Topics("ns"), CollectorRegistry()
    )
    event = full_event({"email": EMAIL})
    assert gate.quarantine(Record(event, consumer_record("c", 0, event, []))) is None
    assert event.schema_violations == [{"pointer": "/payload/email", "rule": "maxLength"}]
    wire = parse_transform([{"hash": "payload.email"}], "sinks.hook.transform").apply(event.to_wire(), b"k")
    assert EMAIL not in json.dumps(wire)
    assert gate.violations.labels("acme", "play", "maxLength", "warn")._value.get() == 1


# 6. a pattern with catastrophic backtracking is refused at load, naming the field
@pytest.mark.parametrize(
    "where, schema",
    [
        ("pattern", {"properties": {"payload": {"properties": {"a": {"pattern": "^([a-z0-9]+)*$"}}}}}),
        ("pattern", {"pattern": "^(a|aa)+$"}),
        ("pattern", {"items": {"pattern": "(x+x+)+y"}}),
        ("patternProperties", {"patternProperties": {"^(\\w+\\s?)*$": {}}}),
    ],
)
def test_a_catastrophic_pattern_is_refused_at_load(where, schema):
    with pytest.raises(ConfigError) as refused:
        CompiledSchema("play", schema, "tenants.acme.schemas.types.play")
    assert "tenants.acme.schemas.types.play" in str(refused.value) and where in str(refused.value)


@pytest.mark.parametrize("pattern", ["^t-[0-9]+$", "^[a-z]+(-[a-z]+)?$", "^(ab){1,3}c*$", "^x{2,5}$"])
def test_ordinary_patterns_still_load(pattern):
    CompiledSchema("play", {"pattern": pattern}, "here")


def consumer_record(topic: str, offset: int, event: Event, headers: list[tuple[str, bytes]]) -> Any:
    return ConsumerRecord(topic, 0, offset, 0, 0, event.partition_key, encode_event(event), None, 0, 0, headers)


# 2. a failed-replay dead-lettered at the enricher, replayed from the DLQ, passes the deduplicator once
async def test_a_failed_replay_dead_lettered_at_the_enricher_passes_the_deduplicator_once(redis_server, namespace):
    topics = Topics(namespace)
    window = RedisKeyWindow(redis_server.url, f"{namespace}:", window_s=60)
    gate = SchemaGate(HifiConfig.parse(config({"types": {"play": STRICT}})), topics, CollectorRegistry())
    dedupe = DedupeWindow(window, StageMetrics(), topics.unique, Alerter("test"), gate=gate)
    enricher = Enricher(HifiConfig.parse(config({"types": {"play": STRICT}})), topics.enriched)
    try:
        # the original is quarantined at the deduplicator, holding the claim enriched:0:5
        original = Record(full_event(), consumer_record(topics.enriched, 5, full_event(), []))
        await dedupe.handle([original])
        assert original.outcome == "quarantined"
        # `hifi failed replay` sends it to raw; the enricher dead-letters that message
        fixed = full_event({"title_id": "t-1"})
        at_raw = consumer_record(topics.raw, 9, fixed, [(REPLAY_OF, original.source.encode())])
        letter = unpack(dead_letter_value("enricher", DeadLetter(at_raw, RuntimeError("geo down"))))
        # `hifi dlq replay enricher` writes it back to raw with these headers; the enricher passes them on
        replay = consumer_record(topics.raw, 12, fixed, replay_headers(letter))
        enriched = await enricher.handle([Record(fixed, replay)])
        headers = list(enriched.outputs[0].headers or [])
        assert headers == [(REPLAY_OF, original.source.encode())]
        at_dedupe = Record(fixed, consumer_record(topics.enriched, 7, fixed, headers))
        await dedupe.handle([at_dedupe])
        assert at_dedupe.outcome == "out"  # the fault: "dup", a different heir than the claim's holder
        # the same letter replayed again is a copy
        again = Record(fixed, consumer_record(topics.enriched, 8, fixed, headers))
        await dedupe.handle([again])
        assert again.outcome == "dup"

        # a letter of the deduplicator itself: its message had taken the claim over, so it names itself
        taker = consumer_record(topics.enriched, 20, fixed, [(REPLAY_OF, b"someone-else")])
        own = unpack(dead_letter_value("deduplicator", DeadLetter(taker, RuntimeError("x"))))
        assert replay_headers(own)[-1] == (REPLAY_OF, f"{topics.enriched}:0:20".encode())
    finally:
        await window.close()


class FailsOnSend:
    """A real producer whose send to `topic` raises on the `nth` record (1-based)."""

    def __init__(self, producer: Any, topic: str, nth: int) -> None:
        self.producer, self.topic, self.nth, self.sent = producer, topic, nth, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.producer, name)

    async def send(self, topic: str, *args: Any, **kwargs: Any) -> Any:
        if topic == self.topic:
            self.sent += 1
            if self.sent == self.nth:
                raise ConnectionError("injected: the replay is interrupted")
        return await self.producer.send(topic, *args, **kwargs)


# 7. an interrupted replay leaves at most the in-flight chunk without its accepted tally
async def test_an_interrupted_failed_replay_has_tallied_what_it_sent(kafka, namespace, monkeypatch):
    topics = Topics(namespace)
    await ensure_topics(kafka.bootstrap, [topics.failed("acme"), topics.raw, topics.tallies], 1, 1)
    producer = durable_producer(kafka.bootstrap)
    await producer.start()
    try:
        for n in range(30):
            event = Event(f"{namespace}-{n}", "play", 1.0, "acme", ingest_ts=now_ms())
            record = {"tenant": "acme", "type": "play", "event_id": event.event_id, "event": client_view(event)}
            await producer.send_and_wait(topics.failed("acme"), pack({**record, "claim": f"c:0:{n}"}))
    finally:
        await producer.stop()
    wrapped: list[FailsOnSend] = []

    def failing_producer(bootstrap: str) -> FailsOnSend:
        wrapped.append(FailsOnSend(durable_producer(bootstrap), topics.raw, nth=25))
        return wrapped[0]

    monkeypatch.setattr(quarantine, "durable_producer", failing_producer)
    monkeypatch.setattr(quarantine, "REPLAY_CHUNK", 10)
    failed = FailedEvents(kafka.bootstrap, topics, ["acme"], bucket_s=10)
    with pytest.raises(ConnectionError):
        await failed.replay("acme", rate=0)
    on_raw = await count_records(kafka.bootstrap, topics.raw)
    tallies = [unpack(t) for t in await read_all(kafka.bootstrap, topics.tallies)]
    assert on_raw == 24
    assert sum(run[3] for tally in tallies for run in tally["runs"]) == on_raw  # the fault: 0 tallied
    assert len(tallies) >= 3  # per chunk of 10 as it was acknowledged, not once at the end


async def read_all(bootstrap: str, topic: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        values: list[bytes] = []
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            values += [m.value for m in batch.get(tp, [])]
        return values
    finally:
        await consumer.stop()


async def count_records(bootstrap: str, topic: str) -> int:
    return len(await read_all(bootstrap, topic))
