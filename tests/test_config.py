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
