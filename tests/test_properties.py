"""Property tests (Hypothesis): the codec round-trips, and the validator and the collector's request
decoding never raise anything but their typed errors, whatever the input."""

from __future__ import annotations

import json

import msgpack
from hypothesis import example, given
from hypothesis import strategies as st

from services.collector.app import Collector, RequestError
from shared.codec import decode_event, encode_event
from shared.config import HifiConfig, Settings, hash_api_key
from shared.errors import InvalidEvent
from shared.event import Event, EventValidator, Limits
from shared.service import ServiceContext

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50)
json_like = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
finite_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)

VALIDATOR = EventValidator(Limits())
CONFIG = HifiConfig.parse(
    {
        "tenants": {"acme": {"api_keys": [hash_api_key("k")]}},
        "sinks": {"f": {"type": "file", "path": "/tmp"}},
    }
)
COLLECTOR = Collector(ServiceContext("collector", Settings(), CONFIG))


@given(
    event_id=st.text(min_size=1, max_size=40),
    type_=st.text(min_size=1, max_size=20),
    ts=st.floats(0, 1e13),
    payload=st.dictionaries(st.text(max_size=10), finite_json, max_size=8),
    device=st.none() | st.text(max_size=20),
)
def test_codec_round_trips(event_id, type_, ts, payload, device):
    event = Event(event_id, type_, ts, "acme", payload, device_id=device, ingest_ts=ts, stages={"collector": ts})
    assert decode_event(encode_event(event)) == event


@given(json_like)
@example({"event_id": "e", "type": "t", "ts": 1, "payload": {"x": 2**64}})
@example({"event_id": "e", "type": "t", "ts": float("nan")})
def test_validator_raises_only_invalid_event(item):
    try:
        event = VALIDATOR.validate(item, "acme")
    except InvalidEvent as exc:
        assert exc.reason
    else:
        assert encode_event(event)  # whatever it accepts can be put on the wire


@given(st.binary(max_size=2000), st.sampled_from(["application/json", "application/msgpack", "text/plain"]))
@example(b"\xff\xfe", "application/json")
@example(b"[" * 5000 + b"]" * 5000, "application/json")
@example(msgpack.packb({"events": [{"a": 1}]}), "application/msgpack")
@example(b'{"events": [], "events": [1]}', "application/json")
def test_request_decoding_raises_only_request_errors(body, content_type):
    try:
        items = COLLECTOR.parse_body(content_type, body)
    except RequestError as exc:
        assert 400 <= exc.status < 500 and exc.reason
        return
    for item in items:
        try:
            VALIDATOR.validate(item, "acme")
        except InvalidEvent:
            pass


@given(st.lists(json_like, min_size=1, max_size=5))
def test_json_batches_decode_to_lists_or_request_errors(items):
    body = json.dumps(items, allow_nan=True).encode()
    try:
        assert isinstance(COLLECTOR.parse_body("application/json", body), list)
    except RequestError as exc:
        assert exc.status in (400, 413)
