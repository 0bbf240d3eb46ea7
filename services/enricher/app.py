"""enricher: raw -> enriched. Adds user agent, geo by IP and tenant metadata; a failed lookup never
drops the event, it records the error in `enrichment.errors` and passes the event on."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Any

import maxminddb
from ua_parser import parse as parse_user_agent

from shared.codec import encode_event
from shared.config import HifiConfig
from shared.dlq import REPLAY_OF, replay_of
from shared.event import Event
from shared.service import ServiceContext
from shared.stage import Output, Record, StageRunner, StepResult
from shared.web import add_common_views


@lru_cache(maxsize=4096)
def user_agent_fields(ua: str) -> dict[str, Any]:
    """User-agent strings repeat heavily across a fleet of players; parse each distinct one once."""
    result = parse_user_agent(ua)
    out: dict[str, Any] = {}
    if result.user_agent:
        out["browser"] = result.user_agent.family
        out["browser_version"] = ".".join(p for p in (result.user_agent.major, result.user_agent.minor) if p)
    if result.os:
        out["os"] = result.os.family
        out["os_version"] = ".".join(p for p in (result.os.major, result.os.minor) if p)
    if result.device:
        out["device"] = result.device.family
        if result.device.brand:
            out["device_brand"] = result.device.brand
    return out


class GeoLookup:
    """A MaxMind-format (.mmdb) database: GeoLite2/GeoIP2 City or Country, or one built in-house."""

    def __init__(self, path: str) -> None:
        self.reader = maxminddb.open_database(path)

    def lookup(self, ip: str) -> dict[str, Any] | None:
        ipaddress.ip_address(ip)  # ValueError on garbage, recorded as an enrichment error
        found = self.reader.get(ip)
        if not isinstance(found, dict):
            return None
        geo: dict[str, Any] = {}
        country = found.get("country") or {}
        if isinstance(country, dict) and country.get("iso_code"):
            geo["country"] = country["iso_code"]
        city = found.get("city") or {}
        if isinstance(city, dict) and isinstance(city.get("names"), dict) and city["names"].get("en"):
            geo["city"] = city["names"]["en"]
        location = found.get("location") or {}
        if isinstance(location, dict) and "latitude" in location:
            geo["lat"], geo["lon"] = location["latitude"], location.get("longitude")
        return geo or None


class Enricher:
    def __init__(self, config: HifiConfig, output_topic: str) -> None:
        self.config = config
        self.output_topic = output_topic
        self.geo = GeoLookup(config.enrich.geoip_db) if config.enrich.geoip_db else None

    def enrich(self, event: Event) -> None:
        errors = []
        ua = event.context.get("user_agent")
        if isinstance(ua, str) and ua:
            try:
                event.enrichment["ua"] = user_agent_fields(ua[:1024])
            except Exception as exc:  # a parser bug must not drop the event
                errors.append(f"ua: {type(exc).__name__}: {exc}"[:200])
        ip = event.context.get("ip")
        if self.geo is not None and isinstance(ip, str) and ip:
            try:
                geo = self.geo.lookup(ip)
                if geo:
                    event.enrichment["geo"] = geo
            except Exception as exc:
                errors.append(f"geo: {type(exc).__name__}: {exc}"[:200])
        tenant = self.config.tenants.get(event.tenant)
        if tenant is not None and tenant.metadata:
            event.enrichment["tenant"] = tenant.metadata
        if errors:
            event.enrichment["errors"] = errors
        event.stamp("enricher")

    async def handle(self, records: list[Record]) -> StepResult:
        result = StepResult()
        for record in records:
            self.enrich(record.event)
            # A replay names the claim it takes over at the deduplicator (shared/quarantine.py): pass it on.
            claim = replay_of(record.message.headers)
            headers = [(REPLAY_OF, claim.encode())] if claim is not None else None
            event = record.event
            result.outputs.append(Output(self.output_topic, event.partition_key, encode_event(event), headers=headers))
        return result


def build(ctx: ServiceContext) -> Any:
    app = ctx.create_app()
    enricher = Enricher(ctx.config, ctx.topics.enriched)
    runner = StageRunner(
        app,
        "enricher",
        enricher.handle,
        ctx.metrics,
        ctx.topics.dlq("enricher"),
        source=ctx.source_topic,
        max_message_bytes=ctx.config.limits.max_event_bytes * 4,  # the collector admits at most max_event_bytes
    )

    runner.attach(ctx)

    def stats() -> dict[str, Any]:
        m = ctx.metrics
        return {"in": m.total(m.events_in), "out": m.total(m.events_out), "dead_lettered": m.total(m.dead_lettered)}

    add_common_views(app, "enricher", ctx.metrics, stats, ctx.settings, ready=runner.ready)
    return app
