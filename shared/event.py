"""The event model and the collector's validator: one definition for every stage.

An event travels as a msgpack map. Timestamps are Unix epoch milliseconds (floats): `ts` is the
client's clock, `ingest_ts` the collector's, and `stages[name]` the moment each stage emitted it,
so the sender can compute end-to-end and per-stage lag at sink acknowledgement.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from shared.errors import InvalidEvent


def now_ms() -> float:
    return time.time() * 1000.0


@dataclass(frozen=True)
class Limits:
    """Bounds on what a client may send; every one is checked before anything is produced."""

    max_body_bytes: int = 1_048_576
    max_events_per_batch: int = 500
    max_event_bytes: int = 32_768
    max_id_chars: int = 128
    max_string_chars: int = 8_192
    max_payload_keys: int = 200
    max_depth: int = 8


NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]


def _new_map() -> dict[str, Any]:
    """A fresh {} that msgspec does not take for a default: payload and stages are on the wire even when empty."""
    return {}


class _EventHead(msgspec.Struct, omit_defaults=True):
    """The fields an Event may be built with by position: `Event("e1", "play", ts, "acme", payload)`."""

    event_id: NonEmptyStr
    type: NonEmptyStr
    ts: float
    tenant: NonEmptyStr
    payload: dict[str, Any] = msgspec.field(default_factory=_new_map)


class Event(_EventHead, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """One event, and its wire form: a msgpack map of its fields in this order, `device_id` to the end left
    out while unset (None, empty, False), `payload`, `ingest_ts` and `stages` always written.

    msgspec decodes a map straight into an Event (shared/codec.py), strictly: a map these types refuse is
    read again by `from_wire`, which accepts what an older writer may have put there (a numeric string
    or a bool as `ts`, any `device_id`, a nil payload, an unknown field) exactly as before.
    `encode_event` writes the bytes `pack(to_wire())` did for fields of the declared types (an Event built
    with `canary=1` or `context=None` would not be: nothing builds one).
    """

    ingest_ts: float = msgspec.field(default_factory=float)  # a factory: 0.0 is written, not omitted
    stages: dict[str, Any] = msgspec.field(default_factory=_new_map)  # ms per stage; Any: an int stays an int
    device_id: str | None = None
    session_id: str | None = None
    context: dict[str, Any] = msgspec.field(default_factory=dict)
    enrichment: dict[str, Any] = msgspec.field(default_factory=dict)
    canary: bool = False
    # Consent categories the client declared (e.g. analytics, ads): a sink may require some.
    consent: list[str] = msgspec.field(default_factory=list)
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


def partition_key_of(tenant: str, device_id: Any, session_id: Any, event_id: str) -> bytes:
    """`tenant:device_id`, else `tenant:session_id`, else `tenant:event_id`: the key of every event topic.

    The router keys a sink's copy by the transformed fields (a hashed device id, not the raw one).
    """
    return f"{tenant}:{device_id or session_id or event_id}".encode()


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


def _printable(text: str | None) -> str | None:
    """`text`, unless it cannot be encoded as UTF-8 (then it cannot be echoed back either)."""
    if text is None:
        return None
    try:
        text.encode()
    except UnicodeEncodeError:
        return None
    return text


class EventValidator:
    """Turns one client-supplied item into an Event, or raises InvalidEvent with a machine reason."""

    CLIENT_FIELDS = frozenset(
        {"event_id", "type", "ts", "payload", "device_id", "session_id", "context", "consent", "schema_version"}
    )
    MAX_CONSENT = 32  # categories per event

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        # The msgpack stages put on the wire (msgspec's: the same bytes as msgpack.packb, ~4x faster to size).
        self._encoder = msgspec.msgpack.Encoder()

    def validate(self, item: Any, tenant: str) -> Event:
        lim = self.limits
        if not isinstance(item, dict):
            raise InvalidEvent("not_an_object", f"each event must be an object, got {type(item).__name__}")
        raw_id = item.get("event_id")
        # echoed in the answer: must encode (ASCII always does)
        event_id = (raw_id if raw_id.isascii() else _printable(raw_id)) if isinstance(raw_id, str) else None
        if not self.CLIENT_FIELDS.issuperset(item):
            unknown = set(item) - self.CLIENT_FIELDS
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
            if isinstance(version, int) and not -(2**63) <= version < 2**64:
                raise InvalidEvent("out_of_range", "integers must fit in 64 bits", event_id)
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
            encoded_size = len(self._encoder.encode(item))  # safe now: every value was checked
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
        """Depth first, in order, so the first fault found is the one reported; a map's or list's plain
        scalars (the common case: flat payloads) are checked inline rather than by a call apiece."""
        lim = self.limits
        if depth > lim.max_depth:
            raise InvalidEvent("too_deep", f"nesting deeper than {lim.max_depth}", event_id)
        if isinstance(value, dict):
            inline = depth < lim.max_depth  # an inner value at depth + 1 is not too deep
            for key, inner in value.items():
                if not isinstance(key, str):
                    raise InvalidEvent("wrong_type", "object keys must be strings", event_id)
                if len(key) > lim.max_id_chars:
                    raise InvalidEvent("string_too_long", f"key > {lim.max_id_chars} chars", event_id)
                kind = type(inner)
                if inline and (inner is None or kind is bool or (kind is str and len(inner) <= lim.max_string_chars)):
                    continue
                if inline and kind is int and -(2**63) <= inner < 2**64:
                    continue
                if inline and kind is float and math.isfinite(inner):
                    continue
                self._check_value(inner, depth + 1, event_id)
        elif isinstance(value, list):
            inline = depth < lim.max_depth
            for inner in value:
                kind = type(inner)
                if inline and (inner is None or kind is bool or (kind is str and len(inner) <= lim.max_string_chars)):
                    continue
                if inline and kind is int and -(2**63) <= inner < 2**64:
                    continue
                if inline and kind is float and math.isfinite(inner):
                    continue
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
