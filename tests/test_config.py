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
        # a value of the wrong type (no coercion: "200" is not 200, "no" is not false)
        ("sinks.hook.batch_max", "200", "sinks.hook.batch_max", "must be an integer from 1 to 10000, got '200'"),
        ("sinks.hook.drop_canaries", "no", "sinks.hook.drop_canaries", "got 'no'"),
        ("sinks.hook.headers", "X-A: 1", "sinks.hook.headers", "must be a mapping, got 'X-A: 1'"),
        ("sinks.hook.timeout_s", True, "sinks.hook.timeout_s", "must be a number from 0.1 to 300, got True"),
        ("enrich", {"geoip_db": 5}, "enrich.geoip_db", "got 5"),
        ("audit", {"settle_s": "30s"}, "audit.settle_s", "must be a number from 1 to 86400, got '30s'"),
        ("tenants.acme.metadata", ["plan"], "tenants.acme.metadata", "must be a mapping"),
        ("tenants.acme.rate_limit", {"events_per_s": "fast"}, "tenants.acme.rate_limit.events_per_s", "got 'fast'"),
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
