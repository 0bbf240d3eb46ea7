"""The stage codec writes and reads events exactly as the stages before issue 16 did (tests/event_wire_v1.py,
frozen): the same bytes, key order included, and the same verdict on every input, so old and new stages share
topics during a rolling deploy and no event a stage wrote becomes a dead letter."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tests.event_wire_v1 as v1
from devtools.codec_bench import enriched_events
from shared.codec import decode_event, encode_event, pack
from shared.errors import InvalidEvent
from shared.event import Event

FIELDS = [f.name for f in dataclasses.fields(v1.Event)]

texts = st.text(max_size=12)
ints = st.integers(-(2**63), 2**64 - 1)
floats = st.floats() | st.sampled_from([0.0, -0.0, 1.7e12, 2.0**53 + 1, math.nan, math.inf])
scalars = st.none() | st.booleans() | ints | floats | texts | st.binary(max_size=8)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts | ints, inner, max_size=4),
    max_leaves=12,
)
str_maps = st.dictionaries(texts, values, max_size=4)
violations = st.lists(st.dictionaries(st.sampled_from(["pointer", "rule"]), texts, max_size=2), max_size=2)

# Each field: mostly what Hifi writes there, sometimes anything (what an older or broken writer might).
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "event_id": texts | values,
    "type": texts | values,
    "ts": floats | ints | st.booleans() | st.sampled_from(["12", "1e3", "nan", " 5 ", "x"]) | values,
    "tenant": texts | values,
    "payload": str_maps | st.none() | values,
    "device_id": st.none() | texts | values,
    "session_id": st.none() | texts | values,
    "context": str_maps | st.none() | values,
    "enrichment": str_maps | st.none() | values,
    "ingest_ts": floats | ints | st.booleans() | st.none() | values,
    "stages": st.dictionaries(texts, floats | ints, max_size=3) | st.none() | values,
    "canary": st.booleans() | st.integers(-1, 2) | values,
    "consent": st.lists(texts, max_size=3) | st.none() | values,
    "schema_version": st.none() | texts | values,
    "schema_violations": st.none() | violations | values,
}
REQUIRED = ("event_id", "type", "ts", "tenant")


@st.composite
def wire_maps(draw: st.DrawFn) -> bytes:
    """A msgpack map shaped like an event: fields present or not, of the right type or not, in any order,
    with unknown, repeated or non-string keys now and then."""
    pairs: list[tuple[Any, Any]] = []
    for name, strategy in FIELD_VALUES.items():
        if draw(st.integers(0, 9)) < (9 if name in REQUIRED else 5):
            pairs.append((name, draw(strategy)))
    pairs += draw(st.lists(st.tuples(texts | ints | st.sampled_from(REQUIRED), values), max_size=2))
    order = draw(st.permutations(range(len(pairs))))
    return _map(pairs[i] for i in order)


def _map(pairs: Any) -> bytes:
    pairs = list(pairs)
    body = b"".join(msgpack.packb(k, use_bin_type=True) + msgpack.packb(v, use_bin_type=True) for k, v in pairs)
    n = len(pairs)
    header = bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")
    return header + body


def verdict(decode: Any, data: bytes | None) -> tuple[Any, ...]:
    """What a stage makes of `data`: the event's fields (repr: 1 and 1.0 and True differ, NaN equals itself),
    or the dead letter's reason, detail and event id."""
    try:
        event = decode(data)
    except InvalidEvent as exc:
        return ("dead letter", exc.reason, exc.detail, exc.event_id)
    return ("event", repr([(name, getattr(event, name)) for name in FIELDS]))


def hifi_event(draw: st.DrawFn) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """An event's positional head and keyword fields, as Hifi builds them: every optional field absent or set."""
    kwargs = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "payload": str_maps,
                "device_id": st.none() | texts,
                "session_id": st.none() | texts,
                "context": str_maps,
                "enrichment": str_maps,
                "ingest_ts": floats | st.integers(0, 2**53),
                "stages": st.dictionaries(texts, floats, max_size=3),
                "canary": st.booleans(),
                "consent": st.lists(texts, max_size=3),
                "schema_version": st.none() | texts,
                "schema_violations": st.none() | violations,
            },
        )
    )
    head = draw(st.tuples(texts.filter(bool), texts.filter(bool), floats | st.integers(0, 2**53), texts.filter(bool)))
    return head, kwargs


@given(st.data())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_encode_event_writes_the_bytes_of_the_stages_before(data):
    head, kwargs = hifi_event(data.draw)
    now, before = Event(*head, **kwargs), v1.Event(*head, **kwargs)
    assert encode_event(now) == v1.encode_event(before)
    assert now.to_wire() == before.to_wire() and list(now.to_wire()) == list(before.to_wire())
    assert pack(now.to_wire()) == encode_event(now)  # the router and sinks start from to_wire: the same record
    msgspec.msgpack.decode(encode_event(now), type=Event)  # the typed fast path reads it alone, no fallback
    assert verdict(decode_event, encode_event(now)) == verdict(v1.decode_event, v1.encode_event(before))


@given(wire_maps())
@settings(max_examples=800, suppress_health_check=[HealthCheck.too_slow])
@example(msgpack.packb({"event_id": "e", "type": "t", "ts": 5, "tenant": "a"}))
@example(msgpack.packb({"event_id": "e", "type": "t", "ts": True, "tenant": "a", "canary": "yes"}))
@example(msgpack.packb({"event_id": "e", "type": "t", "ts": "12", "tenant": "a", "device_id": 7}))
@example(msgpack.packb({"event_id": "", "type": "t", "ts": 1.0, "tenant": "a"}))
@example(msgpack.packb({"event_id": "e", "type": "t", "ts": 1.0}))
@example(msgpack.packb({"event_id": "e", "type": "t", "ts": 1.0, "tenant": "a", "payload": None, "zz": 1}))
@example(msgpack.packb({"event_id": "e", "type": "t", "ts": 1.0, "tenant": "a", "ingest_ts": None}))
@example(msgpack.packb({"event_id": "e", "type": "t", "ts": 2**64 - 1, "tenant": "a", "stages": {"c": 1}}))
@example(msgpack.packb({"event_id": "e", "type": "t", "ts": 1.0, "tenant": "a", "consent": ["a", 1]}))
@example(msgpack.packb({"event_id": "e", "type": "t", "ts": 1.0, "tenant": "a", "schema_violations": 3}))
@example(msgpack.packb({"event_id": "e", "type": "t", "ts": 1.0, "tenant": "a", 1: 2}))
@example(msgpack.packb([1, 2]))
def test_decode_event_agrees_with_the_stages_before_on_every_map(data):
    assert verdict(decode_event, data) == verdict(v1.decode_event, data)


@given(st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_decode_event_agrees_on_damaged_bytes(data):
    """Bytes cut, spliced or overwritten anywhere (invalid UTF-8 in an unknown field, a map that ends early)."""
    blob = bytearray(data.draw(wire_maps()))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(blob)))
        action = data.draw(st.sampled_from(["set", "insert", "cut"]))
        byte = data.draw(st.sampled_from([0xFF, 0xC1, 0xC0, 0x80, 0xA1, 0xED, 0x00, 0xC3]) | st.integers(0, 255))
        if action == "set" and at < len(blob):
            blob[at] = byte
        elif action == "insert":
            blob.insert(at, byte)
        else:
            del blob[at:]
    assert verdict(decode_event, bytes(blob)) == verdict(v1.decode_event, bytes(blob))


REQUIRED_PAIRS = _map([("event_id", "e"), ("type", "t"), ("ts", 1.0), ("tenant", "a"), ("zz", 0)])[
    :-1
]  # the map, its last value to follow


@pytest.mark.parametrize(
    "data",
    [
        None,
        b"",
        b"\xc1",
        b"\x91" * 10_000,
        pack({"a": 1}) + b"x",
        # an unknown field a typed decoder would skip unread: invalid UTF-8, a timestamp of a wrong length
        REQUIRED_PAIRS + b"\xa2\xff\xfe",
        REQUIRED_PAIRS + b"\xd5\xff\x00\x01",
    ],
)
def test_what_is_not_an_event_is_dead_lettered_as_before(data):
    assert verdict(decode_event, data)[0] == "dead letter"
    assert verdict(decode_event, data) == verdict(v1.decode_event, data)


def test_every_event_a_stage_writes_reads_back_equal_and_identical_to_before():
    events = enriched_events(400)
    for event in events:
        blob = encode_event(event)
        assert blob == v1.encode_event(v1.decode_event(blob))
        assert decode_event(blob) == event
        assert msgspec.msgpack.decode(blob, type=Event) == event
        assert verdict(decode_event, blob) == verdict(v1.decode_event, blob)
