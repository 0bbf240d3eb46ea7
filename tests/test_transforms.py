"""Per-sink rules on their own: each transform op, filters, consent, and the config's start-up checks."""

from __future__ import annotations

import copy
import hashlib
import hmac
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.auditor.ledger import LossLedger
from shared.audit import filtered_outcome
from shared.config import HifiConfig, hash_api_key
from shared.errors import ConfigError, InvalidEvent
from shared.event import Event, EventValidator, Limits
from shared.masking import mask_email, mask_ip
from shared.transforms import Secrets, SinkRules, parse_transform

KEY = b"tenant-secret"


def wire(**overrides: Any) -> dict[str, Any]:
    event = {
        "event_id": "e1",
        "type": "play",
        "ts": 1.0,
        "tenant": "acme",
        "ingest_ts": 2.0,
        "stages": {"router": 3.0},
        "device_id": "dev-1",
        "payload": {"email": "alice@example.com", "bitrate_kbps": 320, "user": {"id": 7, "name": "Al"}},
        "context": {"ip": "203.0.113.77", "user_agent": "ua"},
        "enrichment": {"geo": {"country": "NL"}},
    }
    event.update(overrides)
    return event


def apply(steps: list[dict[str, Any]], event: dict[str, Any] | None = None) -> dict[str, Any]:
    event = wire() if event is None else event
    before = copy.deepcopy(event)
    out = parse_transform(steps, "sinks.s.transform").apply(event, KEY)
    assert event == before, "a transform must not change the router's event (other sinks share it)"
    return out


def test_rename_moves_a_field_and_creates_its_new_parent():
    out = apply([{"rename": {"payload.user.id": "payload.account.user_id", "payload.absent": "payload.x"}}])
    assert out["payload"]["account"] == {"user_id": 7}
    assert out["payload"]["user"] == {"name": "Al"}
    assert "x" not in out["payload"]


def test_drop_removes_fields_and_identifiers():
    out = apply([{"drop": ["payload.email", "context.user_agent", "device_id", "payload.nope.deeper"]}])
    assert "email" not in out["payload"] and "user_agent" not in out["context"] and "device_id" not in out


def test_keep_leaves_only_the_named_fields_in_every_section():
    out = apply([{"keep": ["payload.bitrate_kbps", "payload.user.name", "enrichment.geo"]}])
    assert out["payload"] == {"bitrate_kbps": 320, "user": {"name": "Al"}}
    assert out["context"] == {}
    assert out["enrichment"] == {"geo": {"country": "NL"}}
    assert (out["event_id"], out["tenant"], out["type"], out["device_id"]) == ("e1", "acme", "play", "dev-1")
    both_orders = [["payload.user", "payload.user.id"], ["payload.user.id", "payload.user"]]
    assert [apply([{"keep": paths}])["payload"] for paths in both_orders] == [{"user": {"id": 7, "name": "Al"}}] * 2


def test_add_sets_constants():
    out = apply([{"add": {"payload.source": "hifi", "context.app.version": 3}}])
    assert out["payload"]["source"] == "hifi" and out["context"]["app"] == {"version": 3}


def test_hash_is_hmac_sha256_with_the_tenants_key():
    out = apply([{"hash": ["payload.email", "device_id", "payload.user.id", "payload.absent"]}])
    assert out["payload"]["email"] == hmac.new(KEY, b"alice@example.com", hashlib.sha256).hexdigest()
    assert out["device_id"] == hmac.new(KEY, b"dev-1", hashlib.sha256).hexdigest()
    assert out["payload"]["user"]["id"] == hmac.new(KEY, b"7", hashlib.sha256).hexdigest()  # JSON of the number
    assert "absent" not in out["payload"]
    other = parse_transform([{"hash": "payload.email"}], "t").apply(wire(), b"another-tenant")
    assert other["payload"]["email"] != out["payload"]["email"]


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        ("203.0.113.77", "203.0.113.0"),
        ("2001:db8:abcd:12:1:2:3:4", "2001:db8:abcd::"),
        ("::ffff:10.1.2.3", "10.1.2.0"),
        ("not-an-ip", None),
        (42, None),
    ],
)
def test_mask_ip_truncates_v4_to_24_and_v6_to_48(value: Any, masked: str | None):
    assert mask_ip(value) == masked


def test_mask_email_and_a_value_that_cannot_be_masked_is_dropped():
    assert mask_email("alice@example.com") == "a***@example.com"
    assert mask_email("no-at-sign") is None
    out = apply(
        [{"mask_email": "payload.email"}, {"mask_ip": ["context.ip", "payload.bitrate_kbps"]}],
    )
    assert out["payload"]["email"] == "a***@example.com"
    assert out["context"]["ip"] == "203.0.113.0"
    assert "bitrate_kbps" not in out["payload"], "a field that is not an address is dropped, not passed unmasked"


def test_steps_run_in_order():
    out = apply([{"rename": {"payload.email": "payload.contact"}}, {"hash": "payload.contact"}])
    assert out["payload"]["contact"] == hmac.new(KEY, b"alice@example.com", hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    ("steps", "field"),
    [
        ([{"hash": "event_id"}], "sinks.s.transform[0].hash[0]"),
        ([{"rename": {"payload.a": "tenant"}}], "sinks.s.transform[0].rename.payload.a"),
        ([{"rename": {"device_id": "payload.d"}}], "sinks.s.transform[0].rename.device_id"),
        ([{"drop": ["payload.a"]}, {"explode": ["payload.a"]}], "sinks.s.transform[1]"),
        ([{"keep": []}], "sinks.s.transform[0].keep"),
        ([{"add": ["payload.a"]}], "sinks.s.transform[0].add"),
        ({"drop": "payload.a"}, "sinks.s.transform"),
        ([{"mask_ip": "payload."}], "sinks.s.transform[0].mask_ip[0]"),
    ],
)
def test_a_bad_transform_names_its_field(steps: Any, field: str):
    with pytest.raises(ConfigError) as err:
        parse_transform(steps, "sinks.s.transform")
    assert err.value.field == field


# -- filters and consent -------------------------------------------------------------------------


def rules(spec: dict[str, Any]) -> SinkRules:
    return SinkRules.parse(dict(spec), "sinks.s", {"acme", "globex"})


def test_filters_by_tenant_type_consent_and_a_jmespath_predicate():
    r = rules(
        {
            "filter": {
                "exclude_tenants": ["globex"],
                "types": ["play", "pause"],
                "where": "payload.bitrate_kbps > `0`",
            },
            "consent": {"require": ["analytics"]},
        }
    )
    f = r.filter

    def why(event: dict[str, Any], consent: list[str] | None = None) -> str | None:
        return f.rejects(event["tenant"], event["type"], ["analytics"] if consent is None else consent, event)

    assert why(wire()) is None
    assert why(wire(tenant="globex")) == "tenant"
    assert why(wire(type="seek")) == "type"
    assert why(wire(), consent=["ads"]) == "consent"
    assert why(wire(payload={"bitrate_kbps": 0})) == "where"
    assert why(wire(payload={"bitrate_kbps": "high"})) == "where"  # a string is not > 0: null, not an error
    assert why(wire(payload={})) == "where"
    assert rules({}).filters is False and r.filters is True


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"filter": {"where": "payload.bitrate_kbps > 0"}}, "sinks.s.filter.where"),  # JMESPath literals: `0`
        ({"filter": {"tenants": ["nobody"]}}, "sinks.s.filter.tenants"),
        ({"filter": {"types": "play"}}, "sinks.s.filter.types"),
        ({"filter": {"when": "x"}}, "sinks.s.filter.when"),
        ({"consent": ["analytics"]}, "sinks.s.consent"),
        ({"consent": {"require": [1]}}, "sinks.s.consent.require"),
    ],
)
def test_a_bad_filter_names_its_field(spec: dict[str, Any], field: str):
    with pytest.raises(ConfigError) as err:
        rules(spec)
    assert err.value.field == field


def config_text(pii_env: str | None) -> dict[str, Any]:
    tenant: dict[str, Any] = {"api_keys": [hash_api_key("k")], "sinks": ["hook"]}
    if pii_env:
        tenant["pii_secret_env"] = pii_env
    return {
        "tenants": {"acme": tenant},
        "sinks": {"hook": {"type": "webhook", "url": "http://x/in", "transform": [{"hash": ["payload.email"]}]}},
    }


def test_a_tenant_of_a_hashing_sink_needs_a_secret_and_the_secret_must_be_set():
    with pytest.raises(ConfigError) as err:
        HifiConfig.parse(config_text(None))
    assert err.value.field == "tenants.acme.pii_secret_env"
    config = HifiConfig.parse(config_text("HIFI_PII_ACME"))
    assert config.sinks["hook"].rules.transform.hashes
    with pytest.raises(ConfigError) as err:
        Secrets.from_env({"acme": "HIFI_PII_ACME"}, {}, {"acme"})
    assert err.value.field == "tenants.acme.pii_secret_env" and "HIFI_PII_ACME is not set" in err.value.problem
    assert Secrets.from_env({"acme": "HIFI_PII_ACME"}, {"HIFI_PII_ACME": "s"}, {"acme"}).key("acme") == b"s"


def test_consent_is_a_list_of_category_names_from_the_client():
    validator = EventValidator(Limits())
    event = validator.validate({"event_id": "a", "type": "t", "ts": 1, "consent": ["analytics"]}, "acme")
    assert event.consent == ["analytics"] and event.to_wire()["consent"] == ["analytics"]
    for bad in ("analytics", [1], [""], ["x"] * 33):
        with pytest.raises(InvalidEvent):
            validator.validate({"event_id": "a", "type": "t", "ts": 1, "consent": bad}, "acme")


def test_ledger_counts_filtered_per_sink_never_as_lost():
    ledger = LossLedger(lambda tenant: ("hook", "files"), bucket_s=10, settle_s=0)
    for stage in ("collector",):
        ledger.add_tally({"stage": stage, "runs": [["acme", 0, "accepted", 10]]})
    for stage in ("enricher", "deduplicator"):
        ledger.add_tally(
            {"stage": stage, "topic": f"in.{stage}", "partition": 0, "first": 0, "runs": [["acme", 0, "out", 10]]}
        )
    runs = [
        ["acme", 0, "out", 6],
        ["acme", 0, filtered_outcome(["hook"]), 3],
        ["acme", 0, filtered_outcome(["files", "hook"]), 1],
    ]
    ledger.add_tally({"stage": "router", "topic": "in.router", "partition": 0, "first": 0, "runs": runs})
    ledger.add_tally(
        {"stage": "sender.hook", "topic": "s.hook", "partition": 0, "first": 0, "runs": [["acme", 0, "delivered", 6]]}
    )
    ledger.add_tally(
        {"stage": "sender.files", "topic": "s.files", "partition": 0, "first": 0, "runs": [["acme", 0, "delivered", 8]]}
    )
    reports = ledger.reconcile("acme", 0)
    assert [(r.sink, r.lost) for r in reports] == [("files", 1)], "files expected 9 (1 filtered) and got 8"
    assert reports[0].detail == "router passed on 9, sender.files read 8"
    assert ledger.filtered() == {"hook": {"acme": 4}, "files": {"acme": 1}}


FIELDS = st.sampled_from(
    [
        "payload.email",
        "payload.user.id",
        "payload.user",
        "payload.new.deep",
        "context.ip",
        "enrichment.geo",
        "device_id",
    ]
)
SECTION_FIELDS = FIELDS.filter(lambda f: f != "device_id")
STEPS = st.one_of(
    st.builds(lambda a, b: {"rename": {a: b}}, SECTION_FIELDS, SECTION_FIELDS),
    st.builds(lambda fs: {"drop": fs}, st.lists(FIELDS, min_size=1, max_size=3)),
    st.builds(lambda fs: {"keep": fs}, st.lists(SECTION_FIELDS, min_size=1, max_size=3)),
    st.builds(lambda f: {"add": {f: "const"}}, SECTION_FIELDS),
    st.builds(lambda fs: {"hash": fs}, st.lists(FIELDS, min_size=1, max_size=3)),
    st.builds(lambda fs: {"mask_ip": fs}, st.lists(FIELDS, min_size=1, max_size=3)),
    st.builds(lambda fs: {"mask_email": fs}, st.lists(FIELDS, min_size=1, max_size=3)),
)


@given(st.lists(STEPS, min_size=1, max_size=6))
def test_any_transform_keeps_the_keyed_fields_and_the_input_and_stays_a_valid_event(steps: list[dict[str, Any]]):
    out = apply(steps)  # also asserts the input is unchanged
    keyed = ("event_id", "tenant", "type", "ts", "ingest_ts", "stages")
    assert {k: out[k] for k in keyed} == {k: wire()[k] for k in keyed}
    event = Event.from_wire(out)
    assert event.dedupe_key == "acme:e1"
    assert apply(steps) == out, "deterministic: a replayed batch writes the same fields"


# -- the router's fan-out ------------------------------------------------------------------------


async def test_the_router_filters_per_sink_lets_canaries_through_and_bounds_type_labels(monkeypatch):
    from prometheus_client import CollectorRegistry, Counter

    from services.router import app as router_app
    from shared.codec import unpack
    from shared.stage import Record
    from shared.topics import Topics

    monkeypatch.setattr(router_app, "MAX_TYPE_LABELS", 2)
    config = HifiConfig.parse(
        {
            "tenants": {"acme": {"api_keys": [hash_api_key("k")], "sinks": ["all", "plays"], "pii_secret_env": "X"}},
            "sinks": {
                "all": {"type": "webhook", "url": "http://x/in"},
                "plays": {
                    "type": "webhook",
                    "url": "http://x/in",
                    "filter": {"types": ["play"]},
                    "transform": [{"hash": "device_id"}],
                },
            },
        }
    )
    registry = CollectorRegistry()
    filtered = Counter("f", "", ["sink", "tenant", "type", "reason"], registry=registry)
    unrouted = Counter("u", "", ["tenant"], registry=registry)
    router = router_app.Router(config, Topics(""), unrouted, filtered, Secrets({"acme": KEY}))
    types = ["play", "seek", "pause", "skip", "play"]
    events = [Event.from_wire(wire(event_id=f"e{i}", type=t)) for i, t in enumerate(types)]
    events.append(Event.from_wire(wire(event_id="canary-1", type="hifi.canary", canary=True)))
    records = [Record(e, None) for e in events]  # type: ignore[arg-type]
    result = await router.handle(records)
    assert [r.outcome for r in records] == ["out", *[filtered_outcome(["plays"])] * 3, "out", "out"]
    plays = [unpack(o.value) for o in result.outputs if o.topic == Topics("").sink("plays")]
    assert [e["event_id"] for e in plays] == ["e0", "e4", "canary-1"]
    assert {e["device_id"] for e in plays} == {hmac.new(KEY, b"dev-1", hashlib.sha256).hexdigest()}
    assert all(unpack(o.value)["device_id"] == "dev-1" for o in result.outputs if o.topic == Topics("").sink("all"))
    labels = {s.labels["type"] for m in registry.collect() if m.name == "f" for s in m.samples}
    assert labels == {"seek", "pause", "(other)"}


# -- review findings: keys, predicate errors, add values, tunnelled addresses, lists ---------------


def fanout_router(sinks: dict[str, dict[str, Any]]) -> tuple[Any, Any]:
    """A Router over `sinks` (acme subscribes to all), and its filtered counter's registry."""
    from prometheus_client import CollectorRegistry, Counter

    from services.router import app as router_app
    from shared.topics import Topics

    config = HifiConfig.parse(
        {
            "tenants": {"acme": {"api_keys": [hash_api_key("k")], "sinks": list(sinks), "pii_secret_env": "X"}},
            "sinks": {name: {"type": "webhook", "url": "http://x/in", **spec} for name, spec in sinks.items()},
        }
    )
    registry = CollectorRegistry()
    filtered = Counter("f", "", ["sink", "tenant", "type", "reason"], registry=registry)
    unrouted = Counter("u", "", ["tenant"], registry=registry)
    return router_app.Router(config, Topics(""), unrouted, filtered, Secrets({"acme": KEY})), registry


def filtered_total(registry: Any) -> float:
    return sum(s.value for m in registry.collect() if m.name == "f" for s in m.samples if s.name == "f_total")


async def test_each_sink_record_is_keyed_by_what_the_sink_sees_not_the_raw_device_id():
    from shared.stage import Record
    from shared.topics import Topics

    router, _ = fanout_router(
        {
            "plain": {},
            "hashed": {"transform": [{"hash": "device_id"}]},
            "no_device": {"transform": [{"drop": "device_id"}]},
            "anonymous": {"transform": [{"drop": ["device_id", "session_id"]}]},
        }
    )
    event = Event.from_wire(wire(session_id="sess-9"))
    result = await router.handle([Record(event, None)])  # type: ignore[arg-type]
    keys = {o.topic: o.key for o in result.outputs}
    digest = hmac.new(KEY, b"dev-1", hashlib.sha256).hexdigest()
    assert keys == {
        Topics("").sink("plain"): b"acme:dev-1",
        Topics("").sink("hashed"): f"acme:{digest}".encode(),  # one device still maps to one partition
        Topics("").sink("no_device"): b"acme:sess-9",
        Topics("").sink("anonymous"): b"acme:e1",
    }
    for output in result.outputs:  # the key the sender computes from the record is the record's key
        assert Event.from_wire(unpack_value(output.value)).partition_key == output.key
    # a sink without rules gets the event itself: the bytes of its map, stamped by the router
    (plain,) = [o.value for o in result.outputs if o.topic == Topics("").sink("plain")]
    from shared.codec import pack

    assert plain == pack(event.to_wire()) and "router" in unpack_value(plain)["stages"]


def unpack_value(value: bytes) -> Any:
    from shared.codec import unpack

    return unpack(value)


async def test_a_predicate_that_errors_in_any_way_does_not_match_and_is_counted_once():
    from services.router import app as router_app
    from shared.stage import Record
    from shared.topics import Topics

    router, registry = fanout_router({"all": {}, "fast": {"filter": {"where": "ceil(to_number(payload.kbps)) > `0`"}}})
    overflowing = Event.from_wire(wire(event_id="huge", payload={"kbps": "1e999"}))
    result = await router.handle([Record(overflowing, None)])  # type: ignore[arg-type]
    assert [o.topic for o in result.outputs] == [Topics("").sink("all")]
    assert filtered_total(registry) == 1

    # A batch the runner re-handles one by one (some other record raised) counts each filtered event once.
    boom = Event.from_wire(wire(event_id="boom"))
    real_encode = router_app.encode_event  # the "all" sink has no rules: it gets the event's own encoding

    def encode_failing_on_boom(event: Event) -> bytes:
        if event.event_id == "boom":
            raise RuntimeError("injected")
        return real_encode(event)

    router_app.encode_event, before = encode_failing_on_boom, filtered_total(registry)
    try:
        batch = [Record(Event.from_wire(wire(event_id="huge2", payload={"kbps": "1e999"})), None), Record(boom, None)]
        with pytest.raises(RuntimeError):
            await router.handle(batch)  # type: ignore[arg-type]
        await router.handle(batch[:1])  # type: ignore[arg-type]
    finally:
        router_app.encode_event = real_encode
    assert filtered_total(registry) - before == 1


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (__import__("datetime").date(2024, 1, 1), "sinks.s.transform[0].add.payload.extra"),
        ({1: "one"}, "sinks.s.transform[0].add.payload.extra"),
        ({"ok": [{"when": __import__("datetime").date(2024, 1, 1)}]}, "sinks.s.transform[0].add.payload.extra"),
        (float("nan"), "sinks.s.transform[0].add.payload.extra"),
        (b"bytes", "sinks.s.transform[0].add.payload.extra"),
        (2**70, "sinks.s.transform[0].add.payload.extra"),  # msgpack carries 64-bit integers only
    ],
)
def test_an_add_value_that_is_not_json_safe_is_refused_at_start(value: Any, field: str):
    with pytest.raises(ConfigError) as err:
        parse_transform([{"add": {"payload.extra": value}}], "sinks.s.transform")
    assert err.value.field == field


def test_json_safe_add_values_are_accepted():
    value = {"a": [1, 2.5, "x", None, True, {"b": []}]}
    assert apply([{"add": {"payload.extra": value}}])["payload"]["extra"] == value


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        ("2002:c000:0204::1", "192.0.2.0"),  # 6to4: the whole IPv4 sits in bits 16-48
        ("2002:c000:204:1234:5678:9abc:def0:1", "192.0.2.0"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.0"),  # Teredo: client 192.0.2.45, obfuscated
    ],
)
def test_mask_ip_unwraps_ipv4_tunnelled_in_6to4_and_teredo(value: Any, masked: str):
    assert mask_ip(value) == masked


def test_hash_mask_and_drop_walk_into_lists():
    event = wire(
        payload={
            "user": [{"email": "alice@example.com", "ip": "203.0.113.77"}, {"email": "bob@example.org"}, "x"],
            "emails": ["carol@example.net", "not-an-address"],
        }
    )
    hashed = apply([{"hash": "payload.user.email"}], copy.deepcopy(event))
    assert [u["email"] for u in hashed["payload"]["user"][:2]] == [
        hmac.new(KEY, b"alice@example.com", hashlib.sha256).hexdigest(),
        hmac.new(KEY, b"bob@example.org", hashlib.sha256).hexdigest(),
    ]
    assert hashed["payload"]["user"][2] == "x"
    masked = apply([{"mask_email": ["payload.user.email", "payload.emails"]}], copy.deepcopy(event))
    assert [u["email"] for u in masked["payload"]["user"][:2]] == ["a***@example.com", "b***@example.org"]
    assert masked["payload"]["emails"] == ["c***@example.net"], "an element that cannot be masked is dropped"
    ips = apply([{"mask_ip": "payload.user.ip"}], copy.deepcopy(event))
    assert ips["payload"]["user"][0]["ip"] == "203.0.113.0"
    dropped = apply([{"drop": ["payload.user.email", "payload.user.ip"]}], copy.deepcopy(event))
    assert dropped["payload"]["user"] == [{}, {}, "x"]
    kept = apply([{"keep": "payload.user.email"}], copy.deepcopy(event))
    assert kept["payload"] == {"user": [{"email": "alice@example.com"}, {"email": "bob@example.org"}]}
    assert "example" not in str(apply([{"hash": ["payload.user.email", "payload.emails"]}], copy.deepcopy(event)))


def test_a_yaml_date_in_add_fails_the_config_load_naming_the_field(tmp_path):
    config = tmp_path / "hifi.yaml"
    config.write_text(
        f"tenants:\n  acme: {{api_keys: ['{hash_api_key('k')}'], sinks: [s]}}\n"
        "sinks:\n  s: {type: webhook, url: 'http://x/in', transform: [{add: {payload.since: 2024-01-01}}]}\n"
    )
    with pytest.raises(ConfigError) as err:
        HifiConfig.load(config)
    assert err.value.field == "sinks.s.transform[0].add.payload.since"
    assert "date" in str(err.value)
