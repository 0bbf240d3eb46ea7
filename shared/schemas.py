"""Data contracts: per tenant, a JSON Schema (Draft 2020-12) per event type and optional version.

An event names its schema by `type` and, optionally, `schema_version` (a top-level field the client
sends): the schema `<type>@<version>` if the tenant declares one, else `<type>`. Neither: the type is
unknown, which the tenant's `unknown_types` policy allows or quarantines.

Schemas are validated against the client's view of the event (every field EventValidator.CLIENT_FIELDS
admits: event_id, type, ts, payload, device_id, session_id, context, consent, schema_version), not what
the pipeline added. Validation never changes the event: fastjsonschema is compiled without filling in
`default` values (the view shares the event's payload and context dicts). Each schema is compiled twice:
jsonschema's Draft202012Validator is the reference and lists every violation; fastjsonschema (about 25x
faster, see docs/BENCHMARKS.md) answers the common case "valid" when the schema uses only keywords
whose meaning it shares with Draft 2020-12, and the reference runs only when it says "invalid".
"""

from __future__ import annotations

import json
import re
import re._constants as sre_constants  # the parsed form of a pattern, to find nested quantifiers
import re._parser as sre_parser
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastjsonschema
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from shared.errors import ConfigError
from shared.event import Event, EventValidator

MODES = ("enforce", "warn")
UNKNOWN_TYPE_POLICIES = ("allow", "quarantine")
UNKNOWN_TYPE_RULE = "unknown_type"
MAX_VIOLATIONS = 50  # per event: bounds the failed record; the count of the rest is kept
MAX_MESSAGE_CHARS = 300
CLIENT_FIELDS = tuple(sorted(EventValidator.CLIENT_FIELDS))  # the client's view: every field it may send
REQUIRED_CLIENT_FIELDS = frozenset({"event_id", "type", "ts", "payload"})  # in the view even when empty

# Keywords fastjsonschema (drafts 4-7) applies exactly as Draft 2020-12 does. A schema using any other
# ($ref, $defs, format, prefixItems, unevaluated*, dependent*, array-form items) is checked by jsonschema alone.
FAST_SAFE_KEYWORDS = frozenset(
    {
        "$schema",
        "$comment",
        "title",
        "description",
        "default",
        "examples",
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "patternProperties",
        "propertyNames",
        "minProperties",
        "maxProperties",
        "items",
        "contains",
        "minItems",
        "maxItems",
        "uniqueItems",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minLength",
        "maxLength",
        "pattern",
        "allOf",
        "anyOf",
        "oneOf",
        "not",
        "if",
        "then",
        "else",
    }
)
_SCHEMA_MAPS = ("properties", "patternProperties")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
_SCHEMA_ONE = ("additionalProperties", "propertyNames", "items", "contains", "not", "if", "then", "else")


@dataclass(frozen=True, slots=True)
class Violation:
    pointer: str  # JSON pointer into the validated event (RFC 6901): "/payload/bitrate_kbps"
    rule: str  # the schema keyword that failed (`minimum`, `required`), or `unknown_type`
    message: str

    def to_wire(self) -> dict[str, str]:
        return {"pointer": self.pointer, "rule": self.rule, "message": self.message}

    def flag(self) -> dict[str, str]:
        """What a delivered event (warn mode) carries: no message, which may quote the value a sink's
        transform hashes or drops (the flag sits outside payload/context, where no transform reaches)."""
        return {"pointer": self.pointer, "rule": self.rule}


def fast_compatible(schema: Any) -> bool:
    """True if every keyword, at any depth, is one fastjsonschema applies as Draft 2020-12 does."""
    if isinstance(schema, bool):
        return True
    if not isinstance(schema, dict) or not set(schema) <= FAST_SAFE_KEYWORDS:
        return False
    if isinstance(schema.get("items"), list):
        return False
    for key in _SCHEMA_MAPS:
        if not all(fast_compatible(s) for s in schema.get(key, {}).values()):
            return False
    for key in _SCHEMA_LISTS:
        if not all(fast_compatible(s) for s in schema.get(key, [])):
            return False
    return all(fast_compatible(schema[key]) for key in _SCHEMA_ONE if key in schema)


def pointer(path: Iterable[Any]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


_VALUE_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # their contents are data, not schemas
_REPEATS = (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT)


def refuse_catastrophic_patterns(schema: Any, where: str, at: str = "") -> None:
    """ConfigError for a `pattern` (or `patternProperties` key) that can backtrack exponentially.

    Validation runs on the event loop, and Python's `re` cannot be interrupted: one such pattern against
    a crafted string ("a"*40 + "!" for `^([a-z0-9]+)*$`) would stop heartbeats and stall the group. A
    conservative static check: a repeated group may not contain a variable repeat, nor an alternation
    with an optional branch (`(a|aa)+`). It does not catch every slow pattern (overlapping alternatives,
    `\\d+\\d+x`-style polynomial ones are bounded by the collector's string length limit)."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            refuse_catastrophic_patterns(item, where, f"{at}/{i}")
        return
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        here = f"{at}/{pointer([key])[1:]}"
        if key in _VALUE_KEYWORDS:
            continue
        if key == "pattern" and isinstance(value, str):
            _refuse_if_nested(value, where, f"pattern at {here}")
        elif key == "patternProperties" and isinstance(value, dict):
            for regex in value:
                _refuse_if_nested(str(regex), where, f"patternProperties key {regex!r} at {here}")
        refuse_catastrophic_patterns(value, where, here)


def _refuse_if_nested(regex: str, where: str, what: str) -> None:
    try:
        parsed = sre_parser.parse(regex)
    except re.error:
        return  # not a regex Python reads: the schema check reports it
    if _nested_quantifier(parsed, inside_repeat=False):
        raise ConfigError(
            where,
            f"{what}: {regex[:100]!r} nests a quantifier inside a repeated group (catastrophic "
            "backtracking would stall the pipeline); rewrite it without a repeat or optional alternative "
            "inside a repeated group",
        )


def _nested_quantifier(items: Any, inside_repeat: bool) -> bool:
    for op, arg in items:
        if op in _REPEATS:
            low, high, body = arg
            variable = high != low
            if inside_repeat and variable:
                return True
            if _nested_quantifier(body, inside_repeat or high > 1):
                return True
        elif op == sre_constants.BRANCH:
            branches = arg[1]
            if inside_repeat and any(b.getwidth()[0] == 0 for b in branches):
                return True
            if any(_nested_quantifier(b, inside_repeat) for b in branches):
                return True
        elif op == sre_constants.SUBPATTERN:
            if _nested_quantifier(arg[3], inside_repeat):
                return True
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            if _nested_quantifier(arg[1], inside_repeat):
                return True
        elif op == sre_constants.ATOMIC_GROUP:
            if _nested_quantifier(arg, inside_repeat):
                return True
    return False


class CompiledSchema:
    """One schema, checked at load (a bad schema is a ConfigError naming `where`), compiled once."""

    def __init__(self, name: str, schema: Any, where: str) -> None:
        if not isinstance(schema, dict | bool):
            raise ConfigError(where, "a schema must be a JSON Schema object")
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            at = pointer(exc.absolute_path) or "/"
            raise ConfigError(where, f"not a valid Draft 2020-12 schema at {at}: {exc.message}") from None
        refuse_catastrophic_patterns(schema, where)
        self.name = name
        self.schema = schema
        self.reference = Draft202012Validator(schema)
        self.fast = None
        if fast_compatible(schema):
            body = {k: v for k, v in schema.items() if k != "$schema"} if isinstance(schema, dict) else schema
            self.fast = fastjsonschema.compile(body, use_default=False)

    def violations(self, document: dict[str, Any]) -> list[Violation]:
        if self.fast is not None:
            try:
                self.fast(document)
                return []
            except fastjsonschema.JsonSchemaValueException:
                pass  # the reference lists every violation, not just the first
        found = sorted(
            self.reference.iter_errors(document), key=lambda e: (list(map(str, e.absolute_path)), e.validator)
        )
        out = [Violation(pointer(e.absolute_path), str(e.validator), e.message[:MAX_MESSAGE_CHARS]) for e in found]
        if len(out) > MAX_VIOLATIONS:
            rest = len(out) - MAX_VIOLATIONS + 1
            out = [*out[: MAX_VIOLATIONS - 1], Violation("", "truncated", f"{rest} more violations not listed")]
        return out


@dataclass(frozen=True)
class TenantSchemas:
    """One tenant's contract: `enforce` quarantines violations, `warn` delivers them flagged."""

    mode: str = "enforce"
    unknown_types: str = "allow"
    schemas: dict[str, CompiledSchema] = field(default_factory=dict)  # "play" or "play@2"

    def schema_for(self, event: Event) -> CompiledSchema | None:
        if event.schema_version is not None:
            versioned = self.schemas.get(f"{event.type}@{event.schema_version}")
            if versioned is not None:
                return versioned
        return self.schemas.get(event.type)

    def check(self, event: Event) -> tuple[str | None, list[Violation]]:
        """(the schema's name or None if the type is unknown, the violations); unknown + allow: no violations."""
        schema = self.schema_for(event)
        if schema is None:
            if self.unknown_types == "allow":
                return None, []
            named = f"{event.type}@{event.schema_version}" if event.schema_version is not None else event.type
            return None, [Violation("/type", UNKNOWN_TYPE_RULE, f"no schema for {named[:200]!r}")]
        return schema.name, schema.violations(client_view(event))


def client_view(event: Event) -> dict[str, Any]:
    """The event as its client sent it: what a tenant's schemas describe, and what a replay rebuilds.

    Every field the collector accepts from a client (EventValidator.CLIENT_FIELDS), so none is lost on
    replay; an optional one left out when the client did not send it."""
    doc: dict[str, Any] = {}
    for name in CLIENT_FIELDS:
        value = getattr(event, name)
        if name in REQUIRED_CLIENT_FIELDS or value not in (None, {}, []):
            doc[name] = value
    return doc


# The keys of `tenants.<t>.schemas` (shared/config/ lists them in `config_keys()`).
SCHEMAS_KEYS = frozenset({"mode", "unknown_types", "types", "dir"})


def parse_tenant_schemas(raw: Any, where: str, base_dir: Path | None) -> TenantSchemas:
    """`tenants.<t>.schemas` from the config: mode, unknown_types, inline `types` and/or a `dir` of files."""
    if not isinstance(raw, dict):
        raise ConfigError(where, "must be a mapping")
    allowed = SCHEMAS_KEYS
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}", f"unknown field (allowed: {', '.join(sorted(allowed))})")
    mode = raw.get("mode", "enforce")
    if mode not in MODES:
        raise ConfigError(f"{where}.mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    unknown = raw.get("unknown_types", "allow")
    if unknown not in UNKNOWN_TYPE_POLICIES:
        raise ConfigError(
            f"{where}.unknown_types", f"must be one of {', '.join(UNKNOWN_TYPE_POLICIES)}, got {unknown!r}"
        )
    schemas: dict[str, CompiledSchema] = {}
    if "dir" in raw:
        if not isinstance(raw["dir"], str) or not raw["dir"]:
            raise ConfigError(f"{where}.dir", "must be a directory path")
        directory = Path(raw["dir"])
        if not directory.is_absolute():
            directory = Path.cwd() / directory
        if not directory.is_dir():
            raise ConfigError(f"{where}.dir", f"no such directory: {directory}")
        for path in sorted(directory.glob("*.json")):
            name = path.stem
            _schema_name(name, f"{where}.dir: {path.name}")
            try:
                schema = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{where}.dir: {path.name}", f"not readable JSON: {exc}") from None
            schemas[name] = CompiledSchema(name, schema, f"{where}.dir: {path.name}")
    types = raw.get("types", {})
    if not isinstance(types, dict):
        raise ConfigError(f"{where}.types", "must map an event type (or `type@version`) to a schema")
    for name, schema in types.items():
        _schema_name(name, f"{where}.types.{name}")
        if name in schemas:
            raise ConfigError(f"{where}.types.{name}", "also declared by a file in the schema dir")
        schemas[name] = CompiledSchema(name, schema, f"{where}.types.{name}")
    if not schemas and unknown == "allow":
        raise ConfigError(where, "declares no schema (add `types` or `dir`)")
    return TenantSchemas(mode, unknown, schemas)


def _schema_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not name or name.count("@") > 1 or name.startswith("@") or name.endswith("@"):
        raise ConfigError(where, "a schema is named by the event type, or `type@version`")
