"""Topic names (from the layout in shared.pipeline) under a namespace, and idempotent creation at service start.

A namespace (HIFI_NAMESPACE) prefixes every topic and consumer group, so several Hifi
installations (staging and production, or parallel test runs) can share one Kafka cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from shared import pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    namespace: str = ""

    def name(self, name: str) -> str:
        """A topic name (from shared.pipeline) under this namespace."""
        return f"{self.namespace}.{name}" if self.namespace else name

    @property
    def raw(self) -> str:
        """collector -> enricher, keyed by device/session."""
        return self.name(pipeline.RAW)

    @property
    def enriched(self) -> str:
        """enricher -> deduplicator."""
        return self.name(pipeline.ENRICHED)

    @property
    def unique(self) -> str:
        """deduplicator -> router."""
        return self.name(pipeline.UNIQUE)

    def sink(self, sink: str) -> str:
        """router -> the sender of one sink."""
        return self.name(pipeline.sink_topic(sink))

    def dlq(self, stage: str) -> str:
        """Dead letters of one stage, or of one sink's sender (stage `sender.<sink>`)."""
        return self.name(pipeline.dlq_topic(stage))

    def failed(self, tenant: str) -> str:
        """Events of one tenant quarantined for breaking its schemas (deduplicator -> `hifi failed`)."""
        return self.name(pipeline.failed_topic(tenant))

    @property
    def tallies(self) -> str:
        """Every stage -> auditor: counts per tenant, event-time bucket and outcome."""
        return self.name(pipeline.TALLIES)

    @property
    def receipts(self) -> str:
        """Senders -> auditor: one receipt per event a sink acknowledged."""
        return self.name(pipeline.RECEIPTS)

    def outputs(self, spec: pipeline.StageSpec, sinks: list[str], tenants: list[str]) -> list[str]:
        """The topics a stage writes, under this namespace: a prefix in its layout (a topic per sink, per
        tenant) stands for each of them."""
        names: list[str] = []
        for output in spec.outputs:
            if output == pipeline.SINK_PREFIX:
                names += [self.sink(s) for s in sinks]
            elif output == pipeline.FAILED_PREFIX:
                names += [self.failed(t) for t in tenants]
            else:
                names.append(self.name(output))
        return names

    def group(self, app_id: str) -> str:
        """Consumer group (and Faust app id) of a service."""
        return self.name(app_id)

    def dlq_replay_group(self, label: str) -> str:
        """Progress of `hifi dlq replay` through the dead letters of the stage labelled `label`."""
        return self.name(pipeline.dlq_replay_group(label))

    def failed_replay_group(self, tenant: str, event_type: str | None = None) -> str:
        """Progress of `hifi failed replay` through a tenant's failed records (of one type, for `--type`)."""
        return self.name(pipeline.failed_replay_group(tenant, event_type))

    def failed_replay_lock_group(self, tenant: str) -> str:
        """The group a running `hifi failed replay` of the tenant is a member of (one replay at a time)."""
        return self.name(pipeline.failed_replay_lock_group(tenant))

    def stage_group(self, label: str) -> str:
        """Consumer group of the stage labelled `label` (`enricher`, `sender.hook`)."""
        return self.name(pipeline.group_of(label))

    def all(self, sinks: list[str], tenants: Sequence[str] = ()) -> list[str]:
        """Every topic of a config; `tenants` adds each tenant's failed-events topic."""
        return (
            [self.name(t) for t in pipeline.event_topics(sinks)]
            + [self.dlq(s) for s in pipeline.dead_letter_stages(sinks)]
            + [self.tallies, self.receipts]
            + [self.failed(t) for t in tenants]
        )


async def ensure_topics(
    bootstrap: str,
    names: list[str],
    partitions: int,
    replication: int,
    min_insync: int | None = None,
    timeout_s: float = 60.0,
    extra_configs: dict[str, str] | None = None,
) -> None:
    """Create missing topics; existing ones are left alone. Retries while the broker starts."""
    configs = {"min.insync.replicas": str(min_insync)} if min_insync else {}
    configs.update(extra_configs or {})
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [n for n in names if n not in existing]
            if missing:
                try:
                    await admin.create_topics(
                        [NewTopic(n, partitions, replication, topic_configs=configs) for n in missing]
                    )
                except TopicAlreadyExistsError:
                    pass  # another service won the race: fine
            return
        except (KafkaConnectionError, KafkaError, OSError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.warning("topic creation failed (%s), retrying", exc)
            await asyncio.sleep(1.0)
        finally:
            await admin.close()
