"""The event model, the collector's validator and the msgpack codec."""

from __future__ import annotations

import math

import pytest

from shared.codec import decode_event, encode_event, pack
from shared.errors import InvalidEvent
from shared.event import Event, EventValidator, Limits

V = EventValidator(Limits())


def ok(**extra):
    return {"event_id": "e1", "type": "play", "ts": 1_700_000_000_000, **extra}


def reason(item, limits=None):
    validator = EventValidator(limits) if limits else V
    with pytest.raises(InvalidEvent) as err:
        validator.validate(item, "acme")
    return err.value.reason


def test_a_valid_event_becomes_an_event_of_the_tenant():
    event = V.validate(ok(payload={"a": [1, {"b": None}]}, device_id="d"), "acme")
    assert (event.tenant, event.event_id, event.payload, event.partition_key) == (
        "acme",
        "e1",
        {"a": [1, {"b": None}]},
        b"acme:d",
    )
    assert event.dedupe_key == "acme:e1"


@pytest.mark.parametrize(
    "item, expected",
    [
        ("str", "not_an_object"),
        ({"type": "t", "ts": 1}, "missing_field"),
        (ok(event_id=""), "wrong_type"),
        (ok(event_id=5), "wrong_type"),
        (ok(ts="now"), "wrong_type"),
        (ok(ts=True), "wrong_type"),
        (ok(ts=-1), "wrong_type"),
        (ok(ts=1e18), "out_of_range"),
        (ok(ts=math.inf), "wrong_type"),
        (ok(payload=[1]), "wrong_type"),
        (ok(payload={"x": math.nan}), "wrong_type"),
        (ok(payload={"x": 2**70}), "out_of_range"),
        (ok(payload={"x": "y" * 9000}), "string_too_long"),
        (ok(extra=1), "unknown_field"),
        (ok(event_id="x" * 200), "string_too_long"),
        (ok(schema_version=2**64), "out_of_range"),  # msgpack cannot encode it: it raised OverflowError (a 500)
        (ok(schema_version=-(2**63) - 1), "out_of_range"),
    ],
)
def test_each_malformed_event_gets_a_machine_readable_reason(item, expected):
    assert reason(item) == expected


def test_limits_bound_depth_keys_and_size():
    deep: dict = {}
    cursor = deep
    for _ in range(10):
        cursor["n"] = {}
        cursor = cursor["n"]
    assert reason(ok(payload=deep)) == "too_deep"
    assert reason(ok(payload={str(i): i for i in range(300)})) == "too_many_keys"
    assert reason(ok(payload={"x": "y" * 5000}), Limits(max_event_bytes=1000)) == "event_too_large"


def test_codec_round_trips_and_rejects_garbage():
    event = Event("e1", "play", 1.5, "acme", {"k": [1, "v"]}, device_id="d", ingest_ts=2.0, stages={"collector": 3.0})
    event.enrichment["ua"] = {"os": "iOS"}
    again = decode_event(encode_event(event))
    assert again == event
    for bad in (b"\xc1", b"", None, pack([1, 2]), pack({"event_id": "e"}), pack({**event.to_wire(), "ts": "x"})):
        with pytest.raises(InvalidEvent):
            decode_event(bad)


def test_the_stage_codec_writes_the_bytes_msgpack_writes_and_reads_them_back():
    """Stages of two versions share topics during a rolling deploy: msgspec's bytes must be msgpack's."""
    import msgpack

    from shared.codec import unpack

    event = Event(
        "e1",
        "page_view",
        1.7e12,
        "acme",
        {"url": "https://x.example/?q=é", "n": [1, -2, 2**63, -(2**63), 2**64 - 1, 0.1, 1e300, None, True]},
        device_id="d",
        context={"ip": "203.0.113.9", "nested": {"k": {"deep": [{"x": "y" * 70_000}]}}},
        ingest_ts=2.0,
        stages={"collector": 3.0},
        consent=["analytics"],
    )
    wire = event.to_wire()
    assert pack(wire) == msgpack.packb(wire, use_bin_type=True)
    assert unpack(msgpack.packb(wire, use_bin_type=True)) == wire
    for bad in (b"\xc1", b"", pack(wire) + b"x", pack(wire)[:-3], b"\x91" * 10_000):
        with pytest.raises(InvalidEvent):
            unpack(bad)
