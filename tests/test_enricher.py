"""Enrichment: user agent by ua-parser, geo from a real MaxMind-format file, tenant metadata;
a failing lookup is recorded on the event and never drops it."""

from __future__ import annotations

from services.enricher.app import Enricher
from shared.config import HifiConfig, hash_api_key
from shared.event import Event
from tests.test_pipeline_e2e import IPHONE_UA, make_geo_db


def make_enricher(tmp_path):
    db = tmp_path / "geo.mmdb"
    make_geo_db(db)
    config = HifiConfig.parse(
        {
            "tenants": {"acme": {"api_keys": [hash_api_key("k")], "metadata": {"plan": "gold"}}},
            "sinks": {"f": {"type": "file", "path": str(tmp_path)}},
            "enrich": {"geoip_db": str(db)},
        }
    )
    return Enricher(config, "out")


def test_user_agent_geo_and_tenant_metadata(tmp_path):
    event = Event("e", "play", 1.0, "acme", context={"user_agent": IPHONE_UA, "ip": "192.0.2.7"})
    make_enricher(tmp_path).enrich(event)
    assert event.enrichment["ua"]["os"] == "iOS" and event.enrichment["ua"]["device"] == "iPhone"
    assert event.enrichment["geo"] == {"country": "US"}
    assert event.enrichment["tenant"] == {"plan": "gold"}
    assert "errors" not in event.enrichment and "enricher" in event.stages


def test_unknown_ip_and_garbage_never_drop_the_event(tmp_path):
    enricher = make_enricher(tmp_path)
    unknown = Event("e", "play", 1.0, "acme", context={"ip": "203.0.113.1"})
    enricher.enrich(unknown)
    assert "geo" not in unknown.enrichment and "errors" not in unknown.enrichment
    garbage = Event("e", "play", 1.0, "acme", context={"ip": "999.1.1.1", "user_agent": "\x00" * 3000})
    enricher.enrich(garbage)
    assert garbage.enrichment["errors"][0].startswith("geo: ValueError")
    assert "enricher" in garbage.stages
