"""Tenants' schemas on their own: startup checks name the field, every violation is listed with its
JSON pointer and rule, versions pick their schema, the fast path agrees with the reference, and the
ledger counts quarantined events as accounted for."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from services.auditor.ledger import LossLedger
from shared.codec import decode_event, encode_event, unpack
from shared.config import HifiConfig, hash_api_key
from shared.errors import ConfigError
from shared.event import Event, EventValidator, Limits
from shared.quarantine import SchemaGate
from shared.schemas import CompiledSchema, fast_compatible
from shared.step import Record
from shared.topics import Topics

PLAY = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["payload"],
    "properties": {
        "payload": {
            "type": "object",
            "required": ["title_id", "bitrate_kbps"],
            "properties": {
                "title_id": {"type": "string", "pattern": "^t-[0-9]+$"},
                "bitrate_kbps": {"type": "integer", "minimum": 0},
                "cdn": {"enum": ["akamai", "fastly"]},
            },
        }
    },
}
PLAY_V2 = copy.deepcopy(PLAY)
PLAY_V2["properties"]["payload"]["required"].append("cdn")


def config(schemas: dict[str, Any]) -> dict[str, Any]:
    return {
        "tenants": {"acme": {"api_keys": [hash_api_key("k")], "sinks": ["hook"], "schemas": schemas}},
        "sinks": {"hook": {"type": "webhook", "url": "http://127.0.0.1:1/x"}},
    }


def event(payload: dict[str, Any], type_: str = "play", version: str | None = None) -> Event:
    return Event("e-1", type_, 1.0, "acme", payload=payload, schema_version=version, ingest_ts=1000.0)


@pytest.mark.parametrize(
    "schemas, field",
    [
        ({"mode": "block", "types": {"play": PLAY}}, "tenants.acme.schemas.mode"),
        ({"unknown_types": "drop", "types": {"play": PLAY}}, "tenants.acme.schemas.unknown_types"),
        ({"types": {"play": {"type": "strin"}}}, "tenants.acme.schemas.types.play"),
        ({"types": {"play": {"minimum": "zero"}}}, "tenants.acme.schemas.types.play"),
        ({"types": {"play@": PLAY}}, "tenants.acme.schemas.types.play@"),
        ({"types": {"play": PLAY}, "colour": 1}, "tenants.acme.schemas.colour"),
        ({"dir": "/nonexistent/schemas"}, "tenants.acme.schemas.dir"),
        ({"mode": "warn"}, "tenants.acme.schemas"),
    ],
)
def test_a_bad_schema_or_mode_fails_at_start_naming_the_field(schemas, field):
    with pytest.raises(ConfigError) as err:
        HifiConfig.parse(config(schemas))
    assert err.value.field == field, err.value


def test_schemas_load_from_a_directory_and_a_bad_file_is_named(tmp_path):
    (tmp_path / "play.json").write_text(json.dumps(PLAY))
    (tmp_path / "play@2.json").write_text(json.dumps(PLAY_V2))
    loaded = HifiConfig.parse(config({"dir": str(tmp_path), "types": {"stop": {"type": "object"}}}))
    contract = loaded.tenants["acme"].schemas
    assert contract is not None and set(contract.schemas) == {"play", "play@2", "stop"}
    (tmp_path / "seek.json").write_text("{not json")
    with pytest.raises(ConfigError) as err:
        HifiConfig.parse(config({"dir": str(tmp_path)}))
    assert err.value.field == "tenants.acme.schemas.dir: seek.json"


def test_every_violation_is_listed_with_its_pointer_and_rule():
    contract = HifiConfig.parse(config({"types": {"play": PLAY}})).tenants["acme"].schemas
    assert contract is not None
    assert contract.check(event({"title_id": "t-1", "bitrate_kbps": 3000})) == ("play", [])
    name, found = contract.check(event({"title_id": "x/1", "bitrate_kbps": -5, "cdn": "ftp"}))
    assert name == "play"
    assert [(v.pointer, v.rule) for v in found] == [
        ("/payload/bitrate_kbps", "minimum"),
        ("/payload/cdn", "enum"),
        ("/payload/title_id", "pattern"),
    ]
    assert "-5 is less than the minimum of 0" in found[0].message
    _, missing = contract.check(event({}))
    assert sorted((v.pointer, v.rule) for v in missing) == [("/payload", "required"), ("/payload", "required")]


def test_the_event_version_picks_its_schema_and_unknown_types_follow_the_policy():
    raw = {"types": {"play": PLAY, "play@2": PLAY_V2}, "unknown_types": "quarantine"}
    contract = HifiConfig.parse(config(raw)).tenants["acme"].schemas
    assert contract is not None
    good_v1 = {"title_id": "t-1", "bitrate_kbps": 1}
    assert contract.check(event(good_v1)) == ("play", [])
    assert contract.check(event(good_v1, version="7")) == ("play", [])  # no play@7: the type's default
    name, found = contract.check(event(good_v1, version="2"))
    assert name == "play@2" and [(v.pointer, v.rule) for v in found] == [("/payload", "required")]
    assert contract.check(event({}, type_="pause")) == (None, [contract.check(event({}, "pause"))[1][0]])
    (unknown,) = contract.check(event({}, type_="pause"))[1]
    assert (unknown.pointer, unknown.rule) == ("/type", "unknown_type")
    allowing = HifiConfig.parse(config({"types": {"play": PLAY}})).tenants["acme"].schemas
    assert allowing is not None and allowing.check(event({}, type_="pause")) == (None, [])


def test_the_client_may_send_a_schema_version_and_it_travels_on_the_wire():
    validator = EventValidator(Limits())
    sent = validator.validate({"event_id": "a", "type": "play", "ts": 1, "schema_version": 2}, "acme")
    assert sent.schema_version == "2"
    assert decode_event(encode_event(sent)).schema_version == "2"
    with pytest.raises(Exception, match="schema_version"):
        validator.validate({"event_id": "a", "type": "play", "ts": 1, "schema_version": {"v": 2}}, "acme")


def test_keywords_fastjsonschema_reads_differently_send_a_schema_to_the_reference_alone():
    assert fast_compatible(PLAY)
    for unsafe in (
        {"$defs": {"a": {"type": "string"}}, "properties": {"x": {"$ref": "#/$defs/a"}}},
        {"properties": {"mail": {"type": "string", "format": "email"}}},
        {"prefixItems": [{"type": "string"}]},
        {"anyOf": [{"unevaluatedProperties": False}]},
    ):
        assert not fast_compatible(unsafe), unsafe
        assert CompiledSchema("x", unsafe, "here").fast is None
    with pytest.raises(ConfigError, match="not a valid Draft 2020-12 schema at /items"):
        CompiledSchema("x", {"items": [{"type": "string"}]}, "here")  # draft-07's tuple form


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["t-1", "t-123", "akamai", "fastly"]),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["title_id", "bitrate_kbps", "cdn", "other"]), values, max_size=4))
def test_the_fast_path_agrees_with_the_draft_2020_12_reference(payload):
    compiled = CompiledSchema("play", PLAY, "here")
    assert compiled.fast is not None
    document = {"event_id": "e", "type": "play", "ts": 1.0, "payload": payload}
    assert (compiled.violations(document) == []) == compiled.reference.is_valid(document)


def at(event: Event, topic: str = "ns.hifi.enriched", partition: int = 0, offset: int = 0) -> Record:
    """The record a stage hands the gate: the event and the message it came from (its claim)."""
    message = ConsumerRecord(topic, partition, offset, 0, 0, event.partition_key, b"", None, 0, 0, [])
    return Record(event, message)


def test_the_gate_quarantines_in_enforce_flags_in_warn_and_survives_a_validator_bug():
    topics = Topics("ns")
    enforce = HifiConfig.parse(config({"types": {"play": PLAY}}))
    gate = SchemaGate(enforce, topics, CollectorRegistry())
    bad = event({"title_id": "x", "bitrate_kbps": 1})
    out = gate.quarantine(at(bad, "ns.hifi.enriched", 2, 41))
    assert out is not None and out.topic == "ns.hifi.failed.acme" and out.key == bad.partition_key
    record = unpack(out.value)
    assert record["event"] == {"event_id": "e-1", "type": "play", "ts": 1.0, "payload": bad.payload}
    assert record["violations"] == [
        {"pointer": "/payload/title_id", "rule": "pattern", "message": "'x' does not match '^t-[0-9]+$'"}
    ]
    assert record["claim"] == "ns.hifi.enriched:2:41" and record["received_ts"] == 1000.0
    assert record["quarantined_ts"] > 0
    assert gate.violations.labels("acme", "play", "pattern", "enforce")._value.get() == 1
    assert gate.quarantine(at(event({"title_id": "t-1", "bitrate_kbps": 1}))) is None

    warn = HifiConfig.parse(config({"mode": "warn", "types": {"play": PLAY}}))
    flagged = event({"title_id": "x", "bitrate_kbps": 1})
    assert SchemaGate(warn, topics, CollectorRegistry()).quarantine(at(flagged)) is None
    assert flagged.schema_violations == [{"pointer": "/payload/title_id", "rule": "pattern"}]  # no quoted value
    assert decode_event(encode_event(flagged)).schema_violations == flagged.schema_violations

    class Broken:  # a fault-injecting wrapper: the validator raises on one event
        mode, unknown_types = "enforce", "allow"

        def check(self, event: Event) -> Any:
            raise RecursionError("maximum recursion depth exceeded")

    broken = SchemaGate(enforce, topics, CollectorRegistry())
    object.__setattr__(enforce.tenants["acme"], "schemas", Broken())
    failed = broken.quarantine(at(event({})))
    assert failed is not None
    assert [v["rule"] for v in unpack(failed.value)["violations"]] == ["validator_error"]


def tally(stage: str, first: int, runs: list[list[Any]]) -> dict[str, Any]:
    return {"stage": stage, "topic": f"in.{stage}", "partition": 0, "first": first, "runs": runs}


def test_the_ledger_counts_quarantined_events_and_their_replays_as_accounted_for():
    ledger = LossLedger(lambda tenant: ("hook",), bucket_s=10, settle_s=30)
    ledger.add_tally({"stage": "collector", "runs": [["acme", 0, "accepted", 10]]})
    ledger.add_tally(tally("enricher", 0, [["acme", 0, "out", 10]]))
    ledger.add_tally(tally("deduplicator", 0, [["acme", 0, "out", 7], ["acme", 0, "quarantined", 3]]))
    ledger.add_tally(tally("router", 0, [["acme", 0, "out", 7]]))
    ledger.add_tally(tally("sender.hook", 0, [["acme", 0, "delivered", 7]]))
    assert ledger.reconcile("acme", 0) == []
    # the 3 replayed after a fix, then replayed again: the second time the deduplicator drops them
    ledger.add_tally({"stage": "replay", "runs": [["acme", 20, "accepted", 6]]})
    ledger.add_tally(tally("enricher", 10, [["acme", 20, "out", 6]]))
    ledger.add_tally(tally("deduplicator", 10, [["acme", 20, "out", 3], ["acme", 20, "dup", 3]]))
    ledger.add_tally(tally("router", 7, [["acme", 20, "out", 3]]))
    ledger.add_tally(tally("sender.hook", 7, [["acme", 20, "delivered", 3]]))
    assert ledger.reconcile("acme", 20) == []
    assert ledger.surplus == {}
