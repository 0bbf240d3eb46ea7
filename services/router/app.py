"""router: unique -> one topic per sink. Each event is written once to every sink its tenant
subscribes to; an event of a tenant with no subscriptions is counted, not forwarded.

Per sink, the router applies the sink's rules (shared/transforms.py): an event its filter or consent
rule takes out never enters the sink's topic (counted `filtered`); a transformed copy is what enters it,
keyed by its own (transformed) device/session id, so the sink's topic, sender and dead letters, keys
included, hold only what the sink may see. Canaries skip filters.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import Counter

from shared.audit import filtered_outcome
from shared.codec import encode_event, pack
from shared.config import HifiConfig
from shared.errors import InvalidEvent
from shared.outcome import Outcome
from shared.service import ServiceContext
from shared.stage import DeadLetter, Output, Record, StageRunner, StepResult
from shared.topics import Topics
from shared.transforms import Secrets, SinkRules, copy_key, sink_copy
from shared.web import add_common_views

MAX_TYPE_LABELS = 200  # distinct event types labelling hifi_events_filtered (Prometheus series stay bounded)


class Router:
    def __init__(
        self, config: HifiConfig, topics: Topics, unrouted: Counter, filtered: Counter, secrets: Secrets
    ) -> None:
        self.config = config
        self.topics = topics
        self.unrouted = unrouted
        self.filtered = filtered
        self.secrets = secrets
        self.type_labels: set[str] = set()
        # Per tenant, its sinks' topics and rules (None: the sink filters and transforms nothing), worked out
        # once: per event this was a third of the router's own time.
        self.routes: dict[str, tuple[tuple[str, str, SinkRules | None], ...]] = {
            tenant: tuple((s, topics.sink(s), _rules_applied(config, s)) for s in config.subscribers(tenant))
            for tenant in config.tenants
        }

    def _type_label(self, type_: str) -> str:
        """Client-chosen types, bounded: past MAX_TYPE_LABELS distinct ones, the rest count as `(other)`."""
        if type_ not in self.type_labels:
            if len(self.type_labels) >= MAX_TYPE_LABELS:
                return "(other)"
            self.type_labels.add(type_)
        return type_

    async def handle(self, records: list[Record]) -> StepResult:
        result = StepResult()
        counted: list[tuple[str, str, str, str]] = []  # filtered labels, counted once the batch is handled
        for record in records:
            event = record.event
            routes = self.routes.get(event.tenant)
            if routes is None:
                result.dead.append(DeadLetter(record.message, InvalidEvent("unknown_tenant", event.tenant)))
                continue
            if not routes:
                record.outcome = Outcome.UNROUTED
                self.unrouted.labels(event.tenant).inc()
                continue
            event.stamp("router")
            wire: dict[str, Any] | None = None  # the event as a map, built only for a sink with rules
            value: bytes | None = None  # the untransformed encoding, shared by sinks without transforms
            dropped: list[str] = []
            for sink, topic, rules in routes:
                copy: dict[str, Any] | None = None
                if rules is not None:
                    wire = wire if wire is not None else event.to_wire()
                    copy, reason = sink_copy(rules, wire, self.secrets)
                    if copy is None:
                        dropped.append(sink)
                        counted.append((sink, event.tenant, event.type, reason or "filter"))
                        continue
                if rules is None or copy is wire:  # the event itself: encode_event's bytes are pack(to_wire())'s
                    key = event.partition_key
                    out = value = value if value is not None else encode_event(event)
                else:
                    key = copy_key(copy)  # by what the sink sees: a hashed or dropped device id leaves the key
                    out = pack(copy)
                result.outputs.append(Output(topic, key, out))
            if dropped:
                record.outcome = filtered_outcome(dropped)
        # A batch that raises is handled again record by record (StageRunner): count only a finished pass.
        for sink, tenant, type_, reason in counted:
            self.filtered.labels(sink, tenant, self._type_label(type_), reason).inc()
        return result


def _rules_applied(config: HifiConfig, sink: str) -> SinkRules | None:
    """A sink's rules, or None when its copy of every event is the event itself (no filter, consent or transform)."""
    rules = config.sinks[sink].rules
    return rules if rules.filters or rules.transform.steps else None


def build(ctx: ServiceContext) -> Any:
    config = ctx.config
    hashing = {t.name for t in config.tenants.values() if any(config.sinks[s].rules.transform.hashes for s in t.sinks)}
    secret_envs = {t.name: t.pii_secret_env for t in config.tenants.values() if t.pii_secret_env}
    secrets = Secrets.from_env(secret_envs, os.environ, hashing)  # a missing secret stops the router at start
    app = ctx.create_app()
    unrouted = Counter(
        "hifi_events_unrouted", "Events of tenants with no subscribed sink", ["tenant"], registry=ctx.metrics.registry
    )
    filtered = Counter(
        "hifi_events_filtered",
        "Events a sink's filter or consent rule kept from it",
        ["sink", "tenant", "type", "reason"],
        registry=ctx.metrics.registry,
    )
    router = Router(config, ctx.topics, unrouted, filtered, secrets)
    runner = StageRunner(app, "router", router.handle, ctx.metrics, ctx.topics.dlq("router"), source=ctx.source_topic)

    runner.attach(ctx)

    def stats() -> dict[str, Any]:
        m = ctx.metrics
        return {
            "in": m.total(m.events_in),
            "out": m.total(m.events_out),
            "unrouted": m.total(unrouted),
            "filtered": m.total(filtered),
            "dead_lettered": m.total(m.dead_lettered),
            "subscriptions": {t.name: list(t.sinks) for t in ctx.config.tenants.values()},
        }

    add_common_views(app, "router", ctx.metrics, stats, ctx.settings, ready=runner.ready)
    return app
