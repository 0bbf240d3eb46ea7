"""FROZEN copy of the Event model and its stage codec as of 40a21ac (a dataclass; `to_wire` built a dict,
`decode_event` decoded generically, then `from_wire` checked each field in Python), for the tests of
tests/test_event_wire.py and the "before" of devtools/codec_bench.py: do not edit; it stands for the stages
already deployed, whose bytes a new stage must write and whose events it must read alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from shared.errors import InvalidEvent


def now_ms() -> float:
    return time.time() * 1000.0


def partition_key_of(tenant: str, device_id: Any, session_id: Any, event_id: str) -> bytes:
    return f"{tenant}:{device_id or session_id or event_id}".encode()


@dataclass(slots=True)
class Event:
    event_id: str
    type: str
    ts: float
    tenant: str
    payload: dict[str, Any] = field(default_factory=dict)
    device_id: str | None = None
    session_id: str | None = None
    context: dict[str, Any] = field(default_factory=dict)
    enrichment: dict[str, Any] = field(default_factory=dict)
    ingest_ts: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    canary: bool = False
    # Consent categories the client declared (e.g. analytics, ads): a sink may require some.
    consent: list[str] = field(default_factory=list)
    # Which version of its type's schema the client says it follows (shared/schemas.py); None: unversioned.
    schema_version: str | None = None
    # Set in a `warn` tenant when the event broke its schema: delivered, flagged with each violation's
    # pointer and rule (not its message, which may quote a value).
    schema_violations: list[dict[str, str]] | None = None

    @property
    def dedupe_key(self) -> str:
        """Event ids are unique per tenant, not across tenants."""
        return f"{self.tenant}:{self.event_id}"

    @property
    def partition_key(self) -> bytes:
        """One device (or session) stays in one partition, so its events stay in order.

        Every copy of an event carries the same device/session, so copies also meet in one
        partition and a partition-local dedupe table sees them all.
        """
        return partition_key_of(self.tenant, self.device_id, self.session_id, self.event_id)

    def stamp(self, stage: str) -> None:
        self.stages[stage] = now_ms()

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "event_id": self.event_id,
            "type": self.type,
            "ts": self.ts,
            "tenant": self.tenant,
            "payload": self.payload,
            "ingest_ts": self.ingest_ts,
            "stages": self.stages,
        }
        if self.device_id is not None:
            wire["device_id"] = self.device_id
        if self.session_id is not None:
            wire["session_id"] = self.session_id
        if self.context:
            wire["context"] = self.context
        if self.enrichment:
            wire["enrichment"] = self.enrichment
        if self.canary:
            wire["canary"] = True
        if self.consent:
            wire["consent"] = self.consent
        if self.schema_version is not None:
            wire["schema_version"] = self.schema_version
        if self.schema_violations is not None:
            wire["schema_violations"] = self.schema_violations
        return wire

    @classmethod
    def from_wire(cls, data: Any) -> Event:
        """Rebuild an event read from a topic; anything malformed is an InvalidEvent (dead-letter)."""
        if not isinstance(data, dict):
            raise InvalidEvent("not_a_map", f"expected a map, got {type(data).__name__}")
        try:
            return cls(
                event_id=_req_str(data, "event_id"),
                type=_req_str(data, "type"),
                ts=float(data["ts"]),
                tenant=_req_str(data, "tenant"),
                payload=_opt_map(data, "payload"),
                device_id=data.get("device_id"),
                session_id=data.get("session_id"),
                context=_opt_map(data, "context"),
                enrichment=_opt_map(data, "enrichment"),
                ingest_ts=float(data.get("ingest_ts", 0.0)),
                stages=_opt_map(data, "stages"),
                canary=bool(data.get("canary", False)),
                consent=_opt_strings(data, "consent"),
                schema_version=_opt_str(data, "schema_version"),
                schema_violations=data.get("schema_violations"),
            )
        except KeyError as exc:
            raise InvalidEvent("missing_field", str(exc), event_id=str(data.get("event_id"))) from None
        except (TypeError, ValueError) as exc:
            raise InvalidEvent("wrong_type", str(exc), event_id=str(data.get("event_id"))) from None


def _req_str(data: dict[str, Any], name: str) -> str:
    value = data[name]
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string")
    return value


def _opt_strings(data: dict[str, Any], name: str) -> list[str]:
    value = data.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a list of strings")
    return value


def _opt_str(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string")
    return value


def _opt_map(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a map")
    return value


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def unpack(data: bytes) -> Any:
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
        raise InvalidEvent("undecodable", f"{type(exc).__name__}: {exc}") from None


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event.to_wire())


def decode_event(data: bytes | None) -> Event:
    if data is None:
        raise InvalidEvent("undecodable", "empty message value")
    return Event.from_wire(unpack(data))
