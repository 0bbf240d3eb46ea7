"""The YAML config: a complete example loads; each kind of mistake fails at start naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shared.config import HifiConfig, Settings, hash_api_key
from shared.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"
GOOD = {
    "tenants": {"acme": {"api_keys": [hash_api_key("k")], "sinks": ["hook"], "metadata": {"plan": "gold"}}},
    "sinks": {"hook": {"type": "webhook", "url": "http://127.0.0.1:1/x"}},
}


def test_the_readme_example_config_is_valid():
    text = README.read_text()
    block = text.split("```yaml\n# config/hifi.yaml", 1)[1].split("```", 1)[0]
    assert "# config/hifi.yaml" + block == (README.parent / "config" / "hifi.yaml").read_text()
    config = HifiConfig.parse(yaml.safe_load("# config/hifi.yaml" + block))
    assert set(config.sinks) == {"webhook", "files", "stream", "mirror"}
    assert config.tenants["acme"].sinks == ("webhook", "files", "stream", "mirror")


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda c: c["sinks"]["hook"].update(type="ftp"), "sinks.hook.type"),
        (lambda c: c["sinks"]["hook"].pop("url"), "sinks.hook.url"),
        (lambda c: c["sinks"]["hook"].update(url="ftp://x"), "sinks.hook.url"),
        (lambda c: c["sinks"]["hook"].update(batch_max=0), "sinks.hook.batch_max"),
        (lambda c: c["sinks"]["hook"].update(colour="red"), "sinks.hook.colour"),
        (lambda c: c["tenants"]["acme"].update(sinks=["nope"]), "tenants.acme.sinks[0]"),
        (lambda c: c["tenants"]["acme"].update(api_keys=["plaintext"]), "tenants.acme.api_keys[0]"),
        (lambda c: c["tenants"]["acme"].update(api_keys=[]), "tenants.acme.api_keys"),
        (lambda c: c.update(dedupe={"backend": "memcached"}), "dedupe.backend"),
        (lambda c: c.update(dedupe={"window_s": 0}), "dedupe.window_s"),
        (lambda c: c.update(enrich={"geoip_db": "/no/such.mmdb"}), "enrich.geoip_db"),
        (lambda c: c.update(limits={"max_depth": "deep"}), "limits.max_depth"),
        (lambda c: c.update(tenant={}), "(root).tenant"),
        (lambda c: c["tenants"].update({"Bad Name": c["tenants"]["acme"]}), "tenants.Bad Name"),
    ],
)
def test_a_bad_field_is_named(change, field):
    import copy

    data = copy.deepcopy(GOOD)
    change(data)
    with pytest.raises(ConfigError) as err:
        HifiConfig.parse(data)
    assert err.value.field == field, str(err.value)


def _set(data: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    for key in parents:
        data = data[key]
    if value is DELETE:
        del data[last]
    else:
        data[last] = value


DELETE = object()
AUTH = {"type": "bearer", "token_env": "HOOK_TOKEN"}


@pytest.mark.parametrize(
    "path, value, field, problem",
    [
        # a value of the wrong type (no coercion: "200" is not 200, "no" is not false); a string is not echoed
        ("sinks.hook.batch_max", "200", "sinks.hook.batch_max", "must be an integer from 1 to 10000, got a string"),
        ("sinks.hook.drop_canaries", "no", "sinks.hook.drop_canaries", "must be a valid boolean, got a string"),
        ("sinks.hook.headers", "X-A: 1", "sinks.hook.headers", "must be a mapping, got a string"),
        ("sinks.hook.timeout_s", True, "sinks.hook.timeout_s", "must be a number from 0.1 to 300, got True"),
        ("enrich", {"geoip_db": 5}, "enrich.geoip_db", "must be a valid string, got an integer"),
        ("audit", {"settle_s": "30s"}, "audit.settle_s", "must be a number from 1 to 86400, got a string"),
        ("tenants.acme.metadata", ["plan"], "tenants.acme.metadata", "must be a mapping"),
        ("tenants.acme.rate_limit", {"events_per_s": "fast"}, "tenants.acme.rate_limit.events_per_s", "got a string"),
        # a required key left out
        ("sinks.hook.url", DELETE, "sinks.hook.url", "required"),
        ("tenants.acme.api_keys", DELETE, "tenants.acme.api_keys", "required"),
        ("sinks", DELETE, "sinks", "required"),
        ("tenants.acme.rate_limit", {"burst": 5}, "tenants.acme.rate_limit.events_per_s", "required"),
        ("sinks.hook.auth", {"type": "bearer"}, "sinks.hook.auth.token_env", "required"),
        # a key the model does not have
        ("colour", "red", "(root).colour", "unknown field (allowed: audit, dedupe, enrich, limits, sinks, tenants)"),
        ("sinks.hook.colour", "red", "sinks.hook.colour", "unknown field (allowed: "),
        ("tenants.acme.colour", "red", "tenants.acme.colour", "unknown field (allowed: api_keys, "),
        ("tenants.acme.rate_limit", {"events_per_s": 1, "per": 1}, "tenants.acme.rate_limit.per", "allowed: burst,"),
        (
            "sinks.hook.auth",
            {**AUTH, "token": "x"},
            "sinks.hook.auth.token",
            "unknown field (allowed: token_env, type)",
        ),
        ("dedupe", {"size": 1}, "dedupe.size", "unknown field (allowed: backend, on_redis_down, window_s)"),
    ],
)
def test_a_wrong_type_a_missing_key_and_an_unknown_key_name_the_field(path, value, field, problem):
    import copy

    data = copy.deepcopy(GOOD)
    data["tenants"]["acme"]["rate_limit"] = {"events_per_s": 10}
    _set(data, path, value)
    with pytest.raises(ConfigError) as err:
        HifiConfig.parse(data)
    assert (err.value.field, problem in err.value.problem) == (field, True), str(err.value)


def test_the_parsed_config_is_frozen_and_keeps_the_defaults():
    config = HifiConfig.parse(GOOD)
    hook = config.sinks["hook"]
    assert (hook.batch_max, hook.timeout_s, hook.sla_ms, hook.linger_s, hook.options) == (
        200,
        10.0,
        1000.0,
        0.0,
        {"url": "http://127.0.0.1:1/x"},
    )
    assert (config.dedupe.backend, config.dedupe.on_redis_down, config.audit.bucket_s) == ("rocksdb", "pause", 10)
    with pytest.raises((AttributeError, TypeError, ValueError)):
        config.dedupe.backend = "redis"  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError, ValueError)):
        config.sinks["hook"].batch_max = 1  # type: ignore[misc]


def test_one_key_cannot_belong_to_two_tenants():
    data = {**GOOD, "tenants": {"a": GOOD["tenants"]["acme"], "b": GOOD["tenants"]["acme"]}}
    with pytest.raises(ConfigError, match="also belongs to"):
        HifiConfig.parse(data)


def test_settings_come_from_the_environment_only_at_the_edge():
    s = Settings.from_env({"HIFI_BROKER": "k:1", "HIFI_PARTITIONS": "8", "HIFI_NAMESPACE": "stage"})
    assert (s.broker, s.partitions, s.namespace, s.redis_url) == ("k:1", 8, "stage", "redis://127.0.0.1:6379/0")
    with pytest.raises(ConfigError, match="HIFI_PARTITIONS"):
        Settings.from_env({"HIFI_PARTITIONS": "many"})
    assert Settings.from_env(s.as_env()) == s
    with pytest.raises(ConfigError, match=r"HIFI_LEAVE_GROUP_ON_STOP: .*got 'maybe'"):
        Settings.from_env({"HIFI_LEAVE_GROUP_ON_STOP": "maybe"})
    with pytest.raises(ConfigError, match=r"HIFI_SHUTDOWN_GRACE_S: .*got '20s'"):
        Settings.from_env({"HIFI_SHUTDOWN_GRACE_S": "20s"})


def test_settings_never_print_a_secret():
    settings = Settings(read_token="t0k3n", redis_url="redis://:hunter2@db:6379/0", sentry_dsn="https://k@o/1")
    for shown in (repr(settings), str(settings), f"{settings}"):
        assert "t0k3n" not in shown and "hunter2" not in shown and "k@o" not in shown, shown
        assert "[redacted]" in shown


SECRET = "sk-live-s3cr3t"
PIN = 987654321
WEBHOOK = {"type": "webhook", "url": "http://127.0.0.1:1/x"}
PG = {"type": "postgres", "dsn_env": "PG_DSN", "table": "events"}
S3 = {"type": "s3_archive", "bucket": "b"}


@pytest.mark.parametrize(
    "path, value, secret",
    [
        ("tenants.acme.api_keys", "demo-key-acme", "demo-key-acme"),
        ("tenants.acme.api_keys", {"key": "demo-key-acme"}, "demo-key-acme"),
        ("tenants.acme.signing_secret_env", PIN, str(PIN)),
        ("tenants.acme.signing_secret_env", [SECRET], SECRET),
        ("tenants.acme.pii_secret_env", PIN, str(PIN)),
        ("sinks.hook.auth", f"Bearer {SECRET}", SECRET),
        ("sinks.hook.auth", {"type": f"Bearer {SECRET}"}, SECRET),
        ("sinks.hook.auth", {"type": "bearer", "token_env": [SECRET]}, SECRET),
        ("sinks.hook.auth", {"type": "basic", "username": "u", "password_env": PIN}, str(PIN)),
        ("sinks.hook.auth", {"type": "basic", "username": ["u", SECRET], "password_env": "P"}, SECRET),
        ("sinks.hook.headers", f"X-Key: {SECRET}", SECRET),
        ("sinks.hook.headers", {"X-Key": PIN}, str(PIN)),
        ("sinks.hook.headers", {"X-Key": [SECRET]}, SECRET),
        ("sinks.hook.headers_env", f"X-Key: {SECRET}", SECRET),
        ("sinks.hook.headers_env", {"X-Key": PIN}, str(PIN)),
        ("sinks.hook.signing_secret_env", PIN, str(PIN)),
        ("sinks.hook.signing_secret_env", {"a": SECRET}, SECRET),
        ("sinks.pg", {**PG, "dsn_env": PIN}, str(PIN)),
        ("sinks.pg", {**PG, "dsn_env": [f"postgresql://u:{SECRET}@db/x"]}, SECRET),
        ("sinks.s3", {**S3, "secret_key_env": PIN}, str(PIN)),
        ("sinks.s3", {**S3, "access_key_env": [SECRET]}, SECRET),
    ],
)
def test_a_bad_secret_field_is_named_without_echoing_the_value(path, value, secret):
    import copy

    data = copy.deepcopy(GOOD)
    data["sinks"]["hook"] = dict(WEBHOOK)
    _set(data, path, value)
    with pytest.raises(ConfigError) as err:
        HifiConfig.parse(data)
    assert err.value.field.startswith(path.rsplit(".", 1)[0]), str(err.value)
    assert secret not in str(err.value), str(err.value)


def test_a_number_out_of_range_and_an_unknown_type_name_are_still_echoed():
    import copy

    data = copy.deepcopy(GOOD)
    data["sinks"]["hook"]["batch_max"] = 0
    with pytest.raises(ConfigError, match=r"from 1 to 10000, got 0$"):
        HifiConfig.parse(data)
    data["sinks"]["hook"] = {**WEBHOOK, "auth": {"type": "digest"}}
    with pytest.raises(ConfigError, match=r"got 'digest'$"):
        HifiConfig.parse(data)
    data["sinks"]["hook"] = dict(WEBHOOK)
    data["dedupe"] = {"backend": "memcached"}
    with pytest.raises(ConfigError, match=r"got 'memcached'$"):
        HifiConfig.parse(data)


@pytest.mark.parametrize(
    "sink, key",
    [
        ({"type": "kafka", "topic": "t"}, "transactional"),
        ({"type": "kafka", "topic": "t"}, "bootstrap"),
        ({"type": "redis_stream", "stream": "s"}, "maxlen"),
        ({"type": "redis_stream", "stream": "s"}, "dedupe_window_s"),
        ({"type": "redis_stream", "stream": "s"}, "url"),
        (S3, "access_key_env"),
        (S3, "secret_key_env"),
        (S3, "endpoint"),
        (S3, "region"),
        (S3, "prefix"),
        (WEBHOOK, "auth"),
        (WEBHOOK, "signing_secret_env"),
        (WEBHOOK, "headers"),
        (WEBHOOK, "headers_env"),
    ],
)
def test_a_null_sink_option_is_refused_not_taken_as_unset(sink, key):
    """`transactional:` left empty on a same-cluster kafka sink would have meant false (no transactions);
    an empty s3 key name failed only when the archive started."""
    import copy

    data = copy.deepcopy(GOOD)
    data["sinks"]["out"] = {**sink, key: None}
    with pytest.raises(ConfigError) as err:
        HifiConfig.parse(data)
    assert err.value.field == f"sinks.out.{key}", str(err.value)


@pytest.mark.parametrize("key", ["signing_secret_env", "pii_secret_env", "rate_limit", "sla_ms", "schemas"])
def test_a_null_tenant_option_is_refused(key):
    import copy

    data = copy.deepcopy(GOOD)
    data["tenants"]["acme"][key] = None
    with pytest.raises(ConfigError) as err:
        HifiConfig.parse(data)
    assert err.value.field == f"tenants.acme.{key}", str(err.value)


@pytest.mark.parametrize("auth", ["type: basic\n      username: null\n      password_env: P", ""])
def test_an_empty_auth_is_refused_and_geoip_db_null_still_means_none(auth):
    text = f"""
tenants: {{acme: {{api_keys: ["{hash_api_key("k")}"]}}}}
sinks:
  hook:
    type: webhook
    url: http://127.0.0.1:1/x
    auth:
      {auth}
enrich:
  geoip_db: null
"""
    with pytest.raises(ConfigError, match=r"^config: sinks\.hook\.auth"):
        HifiConfig.parse(yaml.safe_load(text))
    assert HifiConfig.parse({**GOOD, "enrich": {"geoip_db": None}}).enrich.geoip_db is None


@pytest.mark.parametrize(
    "metadata, problem",
    [
        ("flags:\n  on: true", "map key True is not a string"),  # YAML reads on/off/yes/no as booleans
        ("limits:\n  ~: 1", "map key None is not a string"),
        ("score: .nan", "is not a JSON number"),
        ("since: 2024-01-01", "a date is not a JSON value"),
    ],
)
def test_tenant_metadata_every_event_carries_must_be_json_or_the_config_is_refused(metadata, problem):
    """The enricher copies a tenant's metadata into each of its events: a value a sink's JSON cannot carry
    would dead-letter every one of them at the sink (a webhook body with a bool key cannot be encoded)."""
    config = {**GOOD, "tenants": {"acme": {**GOOD["tenants"]["acme"], "metadata": yaml.safe_load(metadata)}}}
    with pytest.raises(ConfigError) as refused:
        HifiConfig.parse(config)
    assert "tenants.acme.metadata" in str(refused.value) and problem in str(refused.value)
