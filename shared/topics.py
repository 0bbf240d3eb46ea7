"""Topic names, in pipeline order, and idempotent creation at service start."""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

log = logging.getLogger(__name__)

RAW = "hifi.raw"  # collector -> enricher, keyed by device/session
ENRICHED = "hifi.enriched"  # enricher -> deduplicator
UNIQUE = "hifi.unique"  # deduplicator -> router


def sink_topic(sink: str) -> str:
    """router -> the sender of one sink."""
    return f"hifi.sink.{sink}"


def dlq_topic(stage: str) -> str:
    """Dead letters of one stage, or of one sink's sender (stage `sender.<sink>`)."""
    return f"hifi.dlq.{stage}"


def pipeline_topics(sinks: list[str]) -> list[str]:
    stages = ["enricher", "deduplicator", "router"] + [f"sender.{s}" for s in sinks]
    return [RAW, ENRICHED, UNIQUE] + [sink_topic(s) for s in sinks] + [dlq_topic(s) for s in stages]


async def ensure_topics(
    bootstrap: str, names: list[str], partitions: int, replication: int, min_insync: int | None = None,
    timeout_s: float = 60.0,
) -> None:
    """Create missing topics; existing ones are left alone. Retries while the broker starts."""
    configs = {"min.insync.replicas": str(min_insync)} if min_insync else {}
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
