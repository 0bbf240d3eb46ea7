"""The collector's fast paths give the answers of the code they replaced (issue 16): `decode_json` those of
`json.loads` with the collector's hooks (errors and their messages included), `EventValidator` those of the
validator before its inline checks, on generated bodies and events."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
from hypothesis import example, given
from hypothesis import strategies as st

from services.collector.admission import FAST_JSON_MAX_BRACKETS, _reject_constant, decode_json
from shared.codec import unique_pairs
from shared.errors import InvalidEvent
from shared.event import Event, EventValidator, Limits, _printable


def reference_decode(body: bytes) -> Any:
    """The collector's JSON decoding before msgspec."""
    return json.loads(body, parse_constant=_reject_constant, object_pairs_hook=unique_pairs)


def outcome(decode: Any, body: bytes) -> tuple[str, Any]:
    try:
        return "value", typed(decode(body))
    except (ValueError, RecursionError) as exc:
        return type(exc).__name__, str(exc)


def typed(value: Any) -> Any:
    """`value` with each scalar's type (1, 1.0 and True are == in Python) and each map's order made visible."""
    if isinstance(value, dict):
        return ("map", [(key, typed(inner)) for key, inner in value.items()])
    if isinstance(value, list):
        return ("list", [typed(inner) for inner in value])
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


# Keys from a small alphabet, so that repeated keys are common; colons and escapes, so that they are counted.
# A key in a tuple is written as it is: an escaped colon, which decodes to the ":" the encoder writes plain.
keys = st.sampled_from(["a", "b", "a:b", ":", "é", 'x"y', ("raw", '"\\u003a"'), ("raw", '"a\\u003A"')]) | st.text(
    max_size=6
)
texts = st.text(
    st.characters() | st.sampled_from(["\ud800", "\udc00", ":", '"', "\\", "\x00", "\x7f", "é", "😀"]), max_size=12
)
numbers = (
    st.integers()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.sampled_from(["1e400", "-1e400", "-0", "-0.0", "1E2", "1.5e-400", "NaN", "Infinity"])
    | st.sampled_from(["9" * 4301, "-" + "9" * 4300, "9" * 4300])
)
# A JSON document as a tree whose maps are lists of pairs (a key may repeat) and whose raw tokens are strings.
documents = st.recursive(
    st.none() | st.booleans() | numbers | st.tuples(st.just("str"), texts),
    lambda inner: (
        st.lists(inner, max_size=5).map(lambda items: ("list", items))
        | st.lists(st.tuples(keys, inner), max_size=5).map(lambda pairs: ("map", pairs))
    ),
    max_leaves=40,
)


def render(doc: Any, ascii_only: bool, spaced: bool) -> str:
    comma, colon = (", ", ": ") if spaced else (",", ":")
    if isinstance(doc, tuple) and doc[0] == "str":
        return json.dumps(doc[1], ensure_ascii=ascii_only)
    if isinstance(doc, tuple) and doc[0] == "list":
        return "[" + comma.join(render(item, ascii_only, spaced) for item in doc[1]) + "]"
    if isinstance(doc, tuple) and doc[0] == "map":
        return (
            "{"
            + comma.join(
                (key[1] if isinstance(key, tuple) else json.dumps(key, ensure_ascii=ascii_only))
                + colon
                + render(value, ascii_only, spaced)
                for key, value in doc[1]
            )
            + "}"
        )
    if isinstance(doc, str):
        return doc  # a raw number token
    return json.dumps(doc, allow_nan=True)


@given(documents, st.booleans(), st.booleans(), st.sampled_from(["utf-8", "utf-16", "utf-8-sig"]))
@example(("map", [("a", 1), ("a", 2)]), True, False, "utf-8")
@example(("map", [("a:", 1), (("raw", '"a\\u003a"'), 2)]), True, False, "utf-8")
@example(("map", [(("raw", '"\\u003a"'), 1), ("a", 1), ("a", 2)]), True, False, "utf-8")  # one colon hides another
@example(("list", [("str", "\ud800")]), False, False, "utf-8")
@example(("list", ["1e400"]), True, False, "utf-8")
@example(("list", ["NaN"]), True, False, "utf-8")
def test_decode_json_answers_as_json_loads(doc, ascii_only, spaced, encoding):
    body = render(doc, ascii_only, spaced).encode(encoding, "surrogatepass")
    assert outcome(decode_json, body) == outcome(reference_decode, body)


@given(st.binary(max_size=300))
@example(b'{"a":1,"a":2}')
@example(b'["\xed\xa0\x80"]')  # a surrogate encoded in UTF-8, which json's surrogatepass decodes
@example(b"\xef\xbb\xbf[1]")
@example(b"[1]\x00")
def test_decode_json_answers_as_json_loads_on_any_bytes(body):
    assert outcome(decode_json, body) == outcome(reference_decode, body)


@given(documents, st.integers(0, 200), st.binary(min_size=1, max_size=3))
def test_decode_json_answers_as_json_loads_on_damaged_documents(doc, at, junk):
    body = render(doc, True, False).encode()
    at = min(at, len(body))
    assert outcome(decode_json, body[:at] + junk + body[at:]) == outcome(reference_decode, body[:at] + junk + body[at:])


def nesting_json_refuses() -> int:
    """The shallowest nesting json.loads raises RecursionError on, from this test's stack."""
    low, high = 1, 5000
    while low < high:
        depth = (low + high) // 2
        try:
            reference_decode(b"[" * depth + b"]" * depth)
            low = depth + 1
        except RecursionError:
            high = depth
    return low


def test_decode_json_fails_on_nesting_exactly_where_json_loads_does():
    limit = nesting_json_refuses()
    assert limit > FAST_JSON_MAX_BRACKETS  # else the bound does not keep msgspec away from json's limit
    for depth in (8, FAST_JSON_MAX_BRACKETS, *range(limit - 3, limit + 6), 5000):
        for body in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
            assert outcome(decode_json, body) == outcome(reference_decode, body), depth


LIMITS = Limits(max_id_chars=8, max_string_chars=16, max_payload_keys=6, max_depth=4, max_event_bytes=400)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**65), 2**65)
    | st.floats()
    | st.text(st.characters() | st.sampled_from(["\ud800", "é"]), max_size=20)
)
values = st.recursive(
    scalars | st.binary(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10) | st.integers(0, 3), inner, max_size=4)
    ),
    max_leaves=25,
)
ids = st.text(st.characters() | st.just("\ud800"), max_size=10) | st.none() | st.integers(0, 3)
events = st.fixed_dictionaries(
    {"event_id": ids, "type": ids, "ts": st.none() | st.integers(-1, 2 * 10**14) | st.floats() | st.just(True)},
    optional={
        "payload": values,
        "context": values,
        "device_id": ids,
        "session_id": ids,
        "consent": st.lists(ids, max_size=3) | ids,
        "schema_version": st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | ids,
        "extra": values,
    },
)


def answer(validator: Any, item: Any) -> Any:
    try:
        event = validator.validate(item, "acme")
    except InvalidEvent as exc:
        return exc.reason, exc.detail, exc.event_id
    return event


@given(events, st.sampled_from([LIMITS, Limits()]))
@example({"event_id": "e", "type": "t", "ts": 1, "payload": {"a": {"b": {"c": {"d": 1}}}}}, LIMITS)
@example({"event_id": "e", "type": "t", "ts": 1, "payload": {"a": [[[["x" * 17]]]]}}, LIMITS)
@example({"event_id": "e\ud800", "type": "t", "ts": 1, "context": {"k": ["\ud800"]}}, LIMITS)
@example(
    {"event_id": "e", "type": "t", "ts": 1, "payload": {"a": "x" * 16, "b": ["x" * 16], "c": [2**64 - 1, -(2**63)]}},
    LIMITS,
)
@example({"event_id": "e", "type": "t", "ts": 1, "payload": {"a": 2**64}}, LIMITS)
@example({"event_id": "e", "type": "t", "ts": 1, "payload": {"a": -(2**63) - 1}}, LIMITS)
@example({"event_id": "e", "type": "t", "ts": 1, "payload": {"a": [2**64]}}, LIMITS)
@example({"event_id": "e", "type": "t", "ts": 1, "payload": {"a": [-(2**63) - 1]}}, LIMITS)
@example({"event_id": "e", "type": "t", "ts": 1, "payload": {"a": "x" * 17}}, LIMITS)
@example({"event_id": "e", "type": "t", "ts": 1, "payload": {"a": ["x" * 17]}}, LIMITS)
@example({"event_id": "e", "type": "t", "ts": 1, "payload": {"a": math.inf}}, LIMITS)
@example({"event_id": "e", "type": "t", "ts": 1, "payload": {"a": [-math.nan]}}, LIMITS)
def test_the_validator_answers_as_before(item, limits):
    assert answer(EventValidator(limits), item) == answer(ReferenceValidator(limits), item)


class ReferenceValidator:
    """EventValidator as it was before its fast paths (issue 16), verbatim: the answers the new one must give."""

    CLIENT_FIELDS = frozenset(
        {"event_id", "type", "ts", "payload", "device_id", "session_id", "context", "consent", "schema_version"}
    )
    MAX_CONSENT = 32  # categories per event

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def validate(self, item: Any, tenant: str) -> Event:
        lim = self.limits
        if not isinstance(item, dict):
            raise InvalidEvent("not_an_object", f"each event must be an object, got {type(item).__name__}")
        raw_id = item.get("event_id")
        event_id = _printable(raw_id) if isinstance(raw_id, str) else None  # echoed in the answer: must encode
        unknown = set(item) - self.CLIENT_FIELDS
        if unknown:
            names = ", ".join(sorted(map(str, unknown))).encode("utf-8", "backslashreplace").decode()
            raise InvalidEvent("unknown_field", names, event_id)
        for name in ("event_id", "type"):
            value = item.get(name)
            if value is None:
                raise InvalidEvent("missing_field", name, event_id)
            if not isinstance(value, str) or not value.strip():
                raise InvalidEvent("wrong_type", f"{name} must be a non-empty string", event_id)
            if len(value) > lim.max_id_chars:
                raise InvalidEvent("string_too_long", f"{name} > {lim.max_id_chars} chars", event_id)
        ts = item.get("ts")
        if ts is None:
            raise InvalidEvent("missing_field", "ts", event_id)
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts) or ts < 0:
            raise InvalidEvent("wrong_type", "ts must be epoch milliseconds (a finite number >= 0)", event_id)
        if ts > 1e14:  # year 5138 in ms: a client sending micro/nanoseconds
            raise InvalidEvent("out_of_range", "ts must be epoch milliseconds", event_id)
        for name in ("device_id", "session_id"):
            value = item.get(name)
            if value is not None and (not isinstance(value, str) or len(value) > lim.max_id_chars):
                raise InvalidEvent("wrong_type", f"{name} must be a string of <= {lim.max_id_chars} chars", event_id)
        version = item.get("schema_version")
        if version is not None:
            if isinstance(version, bool) or not isinstance(version, str | int) or not str(version).strip():
                raise InvalidEvent("wrong_type", "schema_version must be a non-empty string or an integer", event_id)
            version = str(version)
            if len(version) > lim.max_id_chars:
                raise InvalidEvent("string_too_long", f"schema_version > {lim.max_id_chars} chars", event_id)
        payload = item.get("payload", {})
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            raise InvalidEvent("wrong_type", "payload must be an object", event_id)
        if len(payload) > lim.max_payload_keys:
            raise InvalidEvent("too_many_keys", f"payload has {len(payload)} > {lim.max_payload_keys} keys", event_id)
        context = item.get("context", {}) or {}
        if not isinstance(context, dict):
            raise InvalidEvent("wrong_type", "context must be an object", event_id)
        consent = item.get("consent") or []
        if (
            not isinstance(consent, list)
            or len(consent) > self.MAX_CONSENT
            or not all(isinstance(c, str) and 0 < len(c) <= lim.max_id_chars for c in consent)
        ):
            raise InvalidEvent(
                "wrong_type", f"consent must be a list of <= {self.MAX_CONSENT} category names", event_id
            )
        self._check_value(payload, 1, event_id)
        self._check_value(context, 1, event_id)
        try:
            encoded_size = len(msgpack.packb(item, use_bin_type=True))  # safe now: every value was checked
        except UnicodeEncodeError:  # JSON's "\ud800": a lone surrogate, which no UTF-8 encoder takes
            raise InvalidEvent(
                "invalid_string", "a string holds a lone UTF-16 surrogate (not valid Unicode)", event_id
            ) from None
        if encoded_size > lim.max_event_bytes:
            raise InvalidEvent("event_too_large", f"{encoded_size} > {lim.max_event_bytes} bytes", event_id)
        return Event(
            event_id=item["event_id"],
            type=item["type"],
            ts=float(ts),
            tenant=tenant,
            payload=payload,
            device_id=item.get("device_id"),
            session_id=item.get("session_id"),
            context=context,
            consent=consent,
            schema_version=version,
        )

    def _check_value(self, value: Any, depth: int, event_id: str | None) -> None:
        lim = self.limits
        if depth > lim.max_depth:
            raise InvalidEvent("too_deep", f"nesting deeper than {lim.max_depth}", event_id)
        if isinstance(value, dict):
            for key, inner in value.items():
                if not isinstance(key, str):
                    raise InvalidEvent("wrong_type", "object keys must be strings", event_id)
                if len(key) > lim.max_id_chars:
                    raise InvalidEvent("string_too_long", f"key > {lim.max_id_chars} chars", event_id)
                self._check_value(inner, depth + 1, event_id)
        elif isinstance(value, list):
            for inner in value:
                self._check_value(inner, depth + 1, event_id)
        elif isinstance(value, str):
            if len(value) > lim.max_string_chars:
                raise InvalidEvent("string_too_long", f"string > {lim.max_string_chars} chars", event_id)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidEvent("wrong_type", "NaN and Infinity are not allowed", event_id)
        elif isinstance(value, int):
            if not -(2**63) <= value < 2**64:
                raise InvalidEvent("out_of_range", "integers must fit in 64 bits", event_id)
        elif value is not None and not isinstance(value, bool):
            raise InvalidEvent("wrong_type", f"unsupported value type {type(value).__name__}", event_id)
