"""Per-sink rules: which events a sink takes (filter, consent) and what it sees of them (transforms).

Declared under each sink in the config (`filter:`, `consent:`, `transform:`), compiled once at start
(`SinkRules.parse`), applied by the router as it fans an event out, so a sink's topic, its sender and
its dead letters only ever hold what that sink may see. Field predicates are JMESPath (no `eval`).

A transform never touches what the pipeline keys on (event_id, tenant, type, ts, ingest_ts, stages,
canary, consent): the sender's idempotency key and ledger marks are the same with or without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jmespath
import msgpack
from jmespath.exceptions import JMESPathError

from shared.errors import ConfigError
from shared.event import partition_key_of
from shared.masking import hmac_hex, mask_email, mask_ip
from shared.wire_writer import DROP, Path, WireWriter, apply_at

SECTIONS = ("payload", "context", "enrichment")  # maps a transform may change
IDENTIFIERS = ("device_id", "session_id")  # top-level fields a transform may hash, mask or drop
OPS = ("rename", "drop", "keep", "add", "hash", "mask_ip", "mask_email")


class Secrets:
    """Per-tenant HMAC keys for `hash`, read from the environment variables the config names."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        self._keys = dict(keys)

    def key(self, tenant: str) -> bytes:
        return self._keys[tenant]

    @classmethod
    def from_env(cls, secret_envs: Mapping[str, str], environ: Mapping[str, str], needed: set[str]) -> Secrets:
        """secret_envs: tenant -> variable name. Every tenant in `needed` must have a non-empty one."""
        keys = {}
        for tenant in sorted(needed):
            var = secret_envs.get(tenant)
            if var is None:
                raise ConfigError(f"tenants.{tenant}.pii_secret_env", "required: a sink it subscribes to hashes fields")
            value = environ.get(var, "")
            if not value:
                raise ConfigError(f"tenants.{tenant}.pii_secret_env", f"environment variable {var} is not set")
            keys[tenant] = value.encode()
        return cls(keys)


# -- transforms ----------------------------------------------------------------------------------


Step = Callable[[WireWriter, bytes], None]  # (event being written, its tenant's hash key or b"")


def _replace(paths: list[Path], fn: Callable[[Any], Any] | None) -> Step:
    """Replace each present, non-null field by fn(value) (None: by its HMAC); fn returning None drops it.

    A field holding a list is replaced element by element; an element fn cannot take leaves the list.
    """

    def step(w: WireWriter, key: bytes) -> None:
        def one(value: Any) -> Any:
            return hmac_hex(key, value) if fn is None else fn(value)

        def leaf(value: Any) -> Any:
            if value is None:
                return value
            if isinstance(value, list):
                return [new for new in (one(v) for v in value if v is not None) if new is not None]
            new = one(value)
            return DROP if new is None else new

        for path in paths:
            apply_at(w, path, leaf)

    return step


def _keep(paths: list[Path]) -> Step:
    tree: dict[str, Any] = {}
    for path in paths:
        node: Any = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
            if node is True:  # an ancestor is kept whole (payload.user covers payload.user.id)
                break
        else:
            node[path[-1]] = True  # the whole field, whatever narrower paths said

    def prune(value: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, sub in wanted.items():
            if name in value:
                inner = value[name]
                if sub is True:
                    out[name] = inner
                elif isinstance(inner, dict):
                    out[name] = prune(inner, sub)
                elif isinstance(inner, list):  # narrower paths apply to each map in it; other elements go
                    out[name] = [prune(item, sub) for item in inner if isinstance(item, dict)]
        return out

    def step(w: WireWriter, key: bytes) -> None:
        for section in SECTIONS:
            current = w.root.get(section)
            if current:
                kept = prune(current, tree.get(section, {}))
                w.root[section] = kept
                w.owned.add(id(kept))

    return step


@dataclass(frozen=True)
class Transform:
    """The ordered steps of one sink's `transform:` list."""

    steps: tuple[Step, ...] = ()
    hashes: bool = False  # it needs each tenant's secret

    def apply(self, wire: dict[str, Any], key: bytes = b"") -> dict[str, Any]:
        """A transformed copy of `wire` (which is left as it is); `key`: the tenant's secret, if it hashes."""
        if not self.steps:
            return wire
        writer = WireWriter(wire)
        for step in self.steps:
            step(writer, key)
        return writer.root


def _path(value: Any, where: str, identifiers: bool) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(where, "must be a field name such as payload.email")
    parts = tuple(value.split("."))
    if parts[0] in SECTIONS and len(parts) >= 2 and all(parts):
        return parts
    if identifiers and len(parts) == 1 and parts[0] in IDENTIFIERS:
        return parts
    allowed = "payload.<name>, context.<name> or enrichment.<name>" + (
        f" (or {', '.join(IDENTIFIERS)})" if identifiers else ""
    )
    raise ConfigError(where, f"{value!r} is not a field a transform may change: use {allowed}")


def _paths(value: Any, where: str, identifiers: bool) -> list[Path]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(where, "must be a field name or a non-empty list of them")
    return [_path(v, f"{where}[{i}]", identifiers) for i, v in enumerate(value)]


def parse_transform(raw: Any, where: str) -> Transform:
    if raw is None:
        return Transform()
    if not isinstance(raw, list):
        raise ConfigError(where, f"must be a list of steps, each one of: {', '.join(OPS)}")
    steps: list[Step] = []
    hashes = False
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in OPS:
            raise ConfigError(at, f"must be a one-key mapping, the key one of: {', '.join(OPS)}")
        op, arg = next(iter(item.items()))
        at = f"{at}.{op}"
        if op in ("rename", "add"):
            if not isinstance(arg, dict) or not arg:
                raise ConfigError(
                    at, "must be a non-empty mapping of field to " + ("new field" if op == "rename" else "value")
                )
            pairs = [(_path(k, f"{at}.{k}", False), v) for k, v in arg.items()]
            if op == "add":
                for k, v in arg.items():
                    check_json_safe(v, f"{at}.{k}")
            if op == "rename":
                moves = [(src, _path(dst, f"{at}.{'.'.join(src)}", False)) for src, dst in pairs]
                steps.append(_rename(moves))
            else:
                steps.append(_add(pairs))
        elif op == "drop":
            steps.append(_drop(_paths(arg, at, True)))
        elif op == "keep":
            steps.append(_keep(_paths(arg, at, False)))
        elif op == "hash":
            steps.append(_replace(_paths(arg, at, True), None))
            hashes = True
        elif op == "mask_ip":
            steps.append(_replace(_paths(arg, at, True), mask_ip))
        else:
            steps.append(_replace(_paths(arg, at, True), mask_email))
    return Transform(tuple(steps), hashes)


def check_json_safe(value: Any, where: str) -> None:
    """A value every event may carry to every sink (an `add` value, a tenant's metadata): JSON types only (a
    YAML date, a `yes:` or `~:` key, a NaN would make every event of the sink fail to encode or decode),
    checked by packing and unpacking it as the pipeline does."""

    def walk(v: Any, at: str) -> None:
        if v is None or isinstance(v, str | bool | int):
            return
        if isinstance(v, float):
            if not math.isfinite(v):
                raise ConfigError(where, f"{at}: {v} is not a JSON number")
            return
        if isinstance(v, list):
            for i, item in enumerate(v):
                walk(item, f"{at}[{i}]")
            return
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise ConfigError(where, f"{at}: map key {k!r} is not a string")
                walk(item, f"{at}.{k}")
            return
        raise ConfigError(
            where, f"{at}: a {type(v).__name__} is not a JSON value (quote it: a string, number, bool, list or map)"
        )

    walk(value, "value")
    try:
        msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False, strict_map_key=True)
    except (ValueError, TypeError, OverflowError, msgpack.PackException) as exc:  # e.g. an int over 64 bits
        raise ConfigError(where, f"cannot be encoded: {exc}") from None


def _rename(moves: list[tuple[Path, Path]]) -> Step:
    def step(w: WireWriter, key: bytes) -> None:
        for src, dst in moves:
            found, value = w.pop(src)
            if found:
                w.put(dst, value)

    return step


def _add(pairs: list[tuple[Path, Any]]) -> Step:
    def step(w: WireWriter, key: bytes) -> None:
        for path, value in pairs:
            w.put(path, value)

    return step


def _drop(paths: list[Path]) -> Step:
    """Remove each field, in every element of a list met on the way."""

    def step(w: WireWriter, key: bytes) -> None:
        for path in paths:
            apply_at(w, path, lambda _: DROP)

    return step


# -- filters and consent -------------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    tenants: frozenset[str] | None = None  # include only these (None: every tenant)
    exclude_tenants: frozenset[str] = frozenset()
    types: frozenset[str] | None = None
    exclude_types: frozenset[str] = frozenset()
    where: Any = None  # a compiled JMESPath expression; the event passes when its result is truthy
    where_text: str = ""
    consent: frozenset[str] = frozenset()  # categories an event must carry for this sink

    def rejects(self, tenant: str, type_: str, consent: list[str], wire: Mapping[str, Any]) -> str | None:
        """Why this sink does not take the event (tenant, type, consent, where), or None."""
        if (self.tenants is not None and tenant not in self.tenants) or tenant in self.exclude_tenants:
            return "tenant"
        if (self.types is not None and type_ not in self.types) or type_ in self.exclude_types:
            return "type"
        if self.consent and not self.consent.issubset(consent):
            return "consent"
        if self.where is not None:
            try:
                passed = _truthy(self.where.search(wire))
            except Exception:  # "high" > 0, ceil(1e999), ...: any error on this event is not a match
                passed = False
            if not passed:
                return "where"
        return None


def _truthy(value: Any) -> bool:
    """JMESPath's truth: false, null, empty strings, lists and maps are false; numbers (even 0) are true."""
    if value is None or value is False:
        return False
    if isinstance(value, str | list | dict):
        return bool(value)
    return True


def _names(value: Any, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(where, "must be a list of names")
    return frozenset(value)


# The keys of a sink's `filter` and `consent` (shared/config/ lists them in `config_keys()`).
FILTER_KEYS = frozenset({"tenants", "exclude_tenants", "types", "exclude_types", "where"})
CONSENT_KEYS = frozenset({"require"})
# The keys a sink's rules take from its spec (SinkRules.parse pops them before the sink type's options).
RULE_KEYS = frozenset({"filter", "consent", "transform"})


def parse_filter(raw: Any, consent_raw: Any, where: str, tenants: set[str]) -> Filter:
    spec = {} if raw is None else raw
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}.filter", "must be a mapping")
    allowed = FILTER_KEYS
    for key in spec:
        if key not in allowed:
            raise ConfigError(f"{where}.filter.{key}", f"unknown field (allowed: {', '.join(sorted(allowed))})")
    values: dict[str, Any] = {}
    for key in ("tenants", "exclude_tenants"):
        if key in spec:
            names = _names(spec[key], f"{where}.filter.{key}")
            unknown = sorted(names - tenants)
            if unknown:
                raise ConfigError(f"{where}.filter.{key}", f"unknown tenant {unknown[0]!r}")
            values[key] = names
    for key in ("types", "exclude_types"):
        if key in spec:
            values[key] = _names(spec[key], f"{where}.filter.{key}")
    if "where" in spec:
        text = spec["where"]
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{where}.filter.where", "must be a JMESPath expression, e.g. payload.kbps > `0`")
        try:
            values["where"] = jmespath.compile(text)
        except JMESPathError as exc:
            raise ConfigError(f"{where}.filter.where", f"not a valid JMESPath expression: {exc}") from None
        values["where_text"] = text
    if consent_raw is not None:
        if not isinstance(consent_raw, dict) or set(consent_raw) != CONSENT_KEYS:
            raise ConfigError(f"{where}.consent", "must be a mapping with one field, require: [categories]")
        values["consent"] = _names(consent_raw["require"], f"{where}.consent.require")
    return Filter(**values)


@dataclass(frozen=True)
class SinkRules:
    """What one sink takes and sees. The default takes everything, unchanged."""

    filter: Filter = field(default_factory=Filter)
    transform: Transform = field(default_factory=Transform)
    filters: bool = field(init=False)  # any filter or consent rule: computed once, read per event

    def __post_init__(self) -> None:
        object.__setattr__(self, "filters", self.filter != Filter())

    @classmethod
    def parse(cls, spec: dict[str, Any], where: str, tenants: set[str]) -> SinkRules:
        """Pop `filter`, `consent` and `transform` from a sink's raw spec and compile them."""
        rules_filter = parse_filter(spec.pop("filter", None), spec.pop("consent", None), where, tenants)
        return cls(rules_filter, parse_transform(spec.pop("transform", None), f"{where}.transform"))


def copy_key(copy: dict[str, Any]) -> bytes:
    """The Kafka key of a sink's copy: the pipeline's partition key over the ids the sink sees, so a hashed
    or dropped device id never reaches the sink topic's keys (one device still maps to one partition)."""
    return partition_key_of(copy["tenant"], copy.get("device_id"), copy.get("session_id"), copy["event_id"])


def sink_copy(rules: SinkRules, wire: dict[str, Any], secrets: Secrets) -> tuple[dict[str, Any] | None, str | None]:
    """What one sink gets of an event in wire form: (its copy, None), or (None, why its filter or consent rule
    keeps the event out). The copy is `wire` itself when the sink transforms nothing. Canaries skip filters.
    The router's fan-out and `hifi replay` both go through here, so a replay sees what the live sink saw."""
    if rules.filters and not wire.get("canary"):
        reason = rules.filter.rejects(wire["tenant"], wire["type"], wire.get("consent") or [], wire)
        if reason is not None:
            return None, reason
    transform = rules.transform
    if not transform.steps:
        return wire, None
    return transform.apply(wire, secrets.key(wire["tenant"]) if transform.hashes else b""), None
