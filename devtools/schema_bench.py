"""Per-event cost of schema validation on a realistic 0.67 KB event: `python -m devtools.schema_bench`.

Measures fastjsonschema and jsonschema (Draft 2020-12) on their own, then `SchemaGate.check` as the
deduplicator runs it (the fast path for valid events, the reference for invalid ones). Min of 3 repeats.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from typing import Any

import fastjsonschema
import msgpack
from jsonschema import Draft202012Validator
from prometheus_client import CollectorRegistry

from shared.config import HifiConfig, hash_api_key
from shared.event import Event
from shared.quarantine import SchemaGate
from shared.topics import Topics

PAYLOAD_SCHEMA = {
    "type": "object",
    "required": ["position_s", "bitrate_kbps", "title_id"],
    "properties": {
        "position_s": {"type": "number", "minimum": 0},
        "bitrate_kbps": {"type": "integer", "minimum": 0},
        "title_id": {"type": "string", "pattern": "^t-[0-9]+$"},
        "cdn": {"enum": ["akamai", "fastly", "cloudfront"]},
        "audio_lang": {"type": "string", "maxLength": 8},
        "subtitles": {"type": "boolean"},
        "player": {"type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "string"}}},
        "errors": {"type": "array", "items": {"type": "string"}},
    },
}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["event_id", "type", "ts", "payload"],
    "properties": {
        "event_id": {"type": "string"},
        "type": {"const": "play"},
        "ts": {"type": "number"},
        "device_id": {"type": "string"},
        "session_id": {"type": "string"},
        "payload": PAYLOAD_SCHEMA,
        "context": {"type": "object"},
    },
}
EVENT = {
    "event_id": "c1f3-0001-abcdef-123456",
    "type": "play",
    "ts": 1764150000000.0,
    "device_id": "roku-42",
    "session_id": "s-9",
    "payload": {
        "position_s": 12.5,
        "bitrate_kbps": 4500,
        "title_id": "t-123456",
        "cdn": "akamai",
        "audio_lang": "en",
        "subtitles": True,
        "player": {"name": "hifi-player", "version": "3.14.15"},
        "errors": ["none"],
        "buffer_ms": 250,
        "dropped_frames": 3,
        "resolution": "1920x1080",
        "extra": "x" * 300,
    },
    "context": {"user_agent": "Roku/DVP-12.5 (12.5.0.4178-88)", "ip": "203.0.113.9"},
}


def per_event_us(fn: Callable[[], Any], n: int = 20_000) -> float:
    return min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6


def as_event(doc: dict[str, Any]) -> Event:
    return Event(
        doc["event_id"],
        doc["type"],
        doc["ts"],
        "acme",
        payload=doc["payload"],
        device_id=doc["device_id"],
        session_id=doc["session_id"],
        context=doc["context"],
    )


def main() -> None:
    bad = dict(EVENT, payload=dict(EVENT["payload"], bitrate_kbps=-1, title_id="x"))  # 2 violations
    fast = fastjsonschema.compile({k: v for k, v in SCHEMA.items() if k != "$schema"})
    reference = Draft202012Validator(SCHEMA)
    tenant = {"api_keys": [hash_api_key("k")], "sinks": ["h"], "schemas": {"types": {"play": SCHEMA}}}
    config = HifiConfig.parse({"tenants": {"acme": tenant}, "sinks": {"h": {"type": "webhook", "url": "http://x/y"}}})
    gate = SchemaGate(config, Topics(), CollectorRegistry())
    good_event, bad_event = as_event(EVENT), as_event(bad)
    print(f"event: {len(msgpack.packb(EVENT))} bytes (msgpack)")
    for name, fn in [
        ("fastjsonschema, valid", lambda: fast(EVENT)),
        ("jsonschema Draft202012 is_valid, valid", lambda: reference.is_valid(EVENT)),
        ("jsonschema Draft202012 iter_errors, valid", lambda: list(reference.iter_errors(EVENT))),
        ("jsonschema Draft202012 iter_errors, 2 violations", lambda: list(reference.iter_errors(bad))),
        ("SchemaGate.check, valid (fast path)", lambda: gate.check(good_event, "c")),
        ("SchemaGate.check, 2 violations (failed record)", lambda: gate.check(bad_event, "c")),
    ]:
        print(f"{name:<50} {per_event_us(fn):8.1f} us/event")


if __name__ == "__main__":
    main()
