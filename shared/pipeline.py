"""The pipeline's layout, defined once: each stage's source topic, outputs, consumer group and web port.

Topics, dead-letter inputs, the auditor's groups, the local launchers, chaos and bench derive from
this module. The build functions are not here: the app (services/) maps names to them and hands that
registry to the runner, so the library never imports the app.
"""

from __future__ import annotations

from dataclasses import dataclass

# Topic names before a namespace prefixes them (shared.topics.Topics adds it).
RAW = "hifi.raw"
ENRICHED = "hifi.enriched"
UNIQUE = "hifi.unique"
SINK_PREFIX = "hifi.sink."  # + sink name: the router's output, one topic per sink
DLQ_PREFIX = "hifi.dlq."  # + stage label (`enricher`, `sender.hook`)
FAILED_PREFIX = "hifi.failed."  # + tenant: events quarantined for breaking the tenant's schemas
TALLIES = "hifi.audit.tallies"
RECEIPTS = "hifi.audit.receipts"


def sink_topic(sink: str) -> str:
    return SINK_PREFIX + sink


def dlq_topic(label: str) -> str:
    return DLQ_PREFIX + label


def failed_topic(tenant: str) -> str:
    return FAILED_PREFIX + tenant


def dlq_replay_group(label: str) -> str:
    """The consumer group `hifi dlq replay` commits its progress through a stage's dead letters in."""
    return f"hifi-dlq-replay-{label}"


def failed_replay_group(tenant: str, event_type: str | None = None) -> str:
    """The group `hifi failed replay` commits its progress through a tenant's failed records in: one for the
    whole tenant, one per type for `--type` replays (`/` cannot be in a tenant, which names a topic)."""
    group = f"hifi-failed-replay-{tenant}"
    return group if event_type is None else f"{group}/{event_type}"


def failed_replay_lock_group(tenant: str) -> str:
    """The group a running `hifi failed replay` of a tenant is a member of, so that a second one refuses to
    start (`replaying-`: no tenant's progress group starts with it)."""
    return f"hifi-failed-replaying-{tenant}"


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline. A per-sink stage (the sender) runs one process per sink: its label,
    source, group and port take the sink's name or index."""

    name: str
    source: str | None  # the topic it consumes; None for the collector (HTTP in); a prefix if per_sink
    outputs: tuple[str, ...]  # topics it produces events to (SINK_PREFIX: one per sink)
    web_port: int  # its HTTP port in production (a per-sink stage adds the sink's index)
    local_port_offset: int  # its port above a local launcher's base (a per-sink stage adds the sink's index)
    dead_letters: bool = False  # it consumes events and dead-letters those it cannot handle
    per_sink: bool = False

    def label(self, sink: str | None = None) -> str:
        """Its name in tallies, dead-letter topics and logs: `enricher`, `sender.hook`."""
        return f"{self.name}.{self._sink(sink)}" if self.per_sink else self.name

    def group(self, sink: str | None = None) -> str:
        """Its consumer group and Faust app id, before the namespace: `hifi-enricher`, `hifi-sender-hook`."""
        return f"hifi-{self.name}-{self._sink(sink)}" if self.per_sink else f"hifi-{self.name}"

    def source_topic(self, sink: str | None = None) -> str | None:
        if self.per_sink:
            return f"{self.source}{self._sink(sink)}"
        return self.source

    def port(self, sinks: list[str], sink: str | None = None) -> int:
        return self.web_port + (sinks.index(self._sink(sink)) if self.per_sink else 0)

    def local_port(self, base: int, sinks: list[str], sink: str | None = None) -> int:
        return base + self.local_port_offset + (sinks.index(self._sink(sink)) if self.per_sink else 0)

    def _sink(self, sink: str | None) -> str:
        if sink is None:
            raise ValueError(f"stage {self.name!r} runs one process per sink: name the sink")
        return sink


COLLECTOR = StageSpec("collector", None, (RAW, TALLIES), 8080, 0)
ENRICHER = StageSpec("enricher", RAW, (ENRICHED, TALLIES), 6067, 1, dead_letters=True)
# The deduplicator also validates tenants' schemas (only unique events), quarantining to FAILED_PREFIX + tenant.
DEDUPLICATOR = StageSpec("deduplicator", ENRICHED, (UNIQUE, FAILED_PREFIX, TALLIES), 6068, 2, dead_letters=True)
ROUTER = StageSpec("router", UNIQUE, (SINK_PREFIX, TALLIES), 6069, 3, dead_letters=True)
SENDER = StageSpec("sender", SINK_PREFIX, (TALLIES, RECEIPTS), 6070, 10, dead_letters=True, per_sink=True)
AUDITOR = StageSpec("auditor", TALLIES, (), 6090, 9)

STAGES: tuple[StageSpec, ...] = (COLLECTOR, ENRICHER, DEDUPLICATOR, ROUTER, SENDER, AUDITOR)
"""Every service, in pipeline order."""

EVENT_PATH: tuple[StageSpec, ...] = (COLLECTOR, ENRICHER, DEDUPLICATOR, ROUTER)
"""The stages every event passes, in order, before its sink's sender."""

HOPS: tuple[StageSpec, ...] = EVENT_PATH[1:]
"""The stages between the collector and the senders: each consumes one topic and produces to the next."""


class UnknownStage(ValueError):
    pass


def stage(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise UnknownStage(f"unknown stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")


def parse_label(label: str) -> tuple[StageSpec, str | None]:
    """`sender.hook` -> (SENDER, "hook"); `enricher` -> (ENRICHER, None)."""
    name, _, sink = label.partition(".")
    spec = stage(name)
    if spec.per_sink != bool(sink):
        raise UnknownStage(f"stage label {label!r}: {name} {'needs' if spec.per_sink else 'takes no'} a sink")
    return spec, sink or None


def group_of(label: str) -> str:
    """The consumer group (before the namespace) of the stage labelled `label`."""
    spec, sink = parse_label(label)
    return spec.group(sink)


def dead_letter_stages(sinks: list[str]) -> list[str]:
    """The labels of every stage with a dead-letter topic, in pipeline order."""
    labels: list[str] = []
    for spec in STAGES:
        if spec.dead_letters:
            labels += [spec.label(s) for s in sinks] if spec.per_sink else [spec.label()]
    return labels


def event_topics(sinks: list[str]) -> list[str]:
    """The topics events travel on, in pipeline order: raw, enriched, unique, then one per sink."""
    return [s.source for s in HOPS if s.source] + [sink_topic(s) for s in sinks]
