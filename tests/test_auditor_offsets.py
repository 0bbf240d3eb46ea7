"""The auditor reconciles by the offsets each stage covered, not only by totals.

Tallies are written straight to the tallies topic of the real broker, in the order that broke the
old reconciliation, and the real auditor process reads them:
- a tally re-sent after the stage's produce failed lands after later tallies of the same partition:
  its offsets were never counted, so it must count (it was skipped as a replay: a false loss page);
- a surplus (copies a crash replayed) must not hide a loss in the same bucket.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from devtools.pipeline import PipelineProcesses
from shared.app import durable_producer
from shared.audit import accepted_tally, bucket_of
from shared.codec import pack
from shared.event import now_ms
from shared.topics import Topics
from tests.helpers import tenant_block, wait_for

BUCKET_S = 2


def write_config(path: Path) -> None:
    path.write_text(
        "tenants:\n"
        + tenant_block("acme", "k", ["hook"])
        + 'sinks:\n  hook: {type: webhook, url: "http://127.0.0.1:9/in"}\n'
        + f"audit: {{bucket_s: {BUCKET_S}, settle_s: 2, canary_interval_s: 0, dlq_check_s: 60}}\n"
    )


def stage_tally(stage: str, topic: str, first: int, runs: list[list[Any]]) -> bytes:
    return pack({"stage": stage, "topic": topic, "partition": 0, "first": first, "runs": runs, "at": now_ms()})


class AuditorOnly:
    """The real auditor process, alone (no stages: the test writes their tallies)."""

    def __init__(self, settings: Any, tmp_path: Path, port_base: int) -> None:
        self.processes = PipelineProcesses(settings, tmp_path / "logs", port_base=port_base, auditor=True)

    async def __aenter__(self) -> AuditorOnly:
        self.processes.start("auditor")
        await asyncio.to_thread(self.processes.wait_ready, 60.0, ["auditor"])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert await asyncio.to_thread(self.processes.stop, "auditor") == 0

    def summary(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.processes.services["auditor"].url("/audit"), timeout=5) as resp:
            return json.loads(resp.read())


async def publish(bootstrap: str, topic: str, values: list[tuple[bytes, bytes]]) -> None:
    """In this order, one at a time (the tallies topic is keyed by stage: one partition per stage)."""
    producer = durable_producer(bootstrap)
    await producer.start()
    try:
        for key, value in values:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def settled(auditor: AuditorOnly, events: int) -> dict[str, Any]:
    """Wait until the auditor read every tally (`events` counted or ignored as replays) and settled
    the bucket, then for the next settle pass, which confirms a shortfall (or not) within a second."""

    def read_all() -> bool:
        s = auditor.summary()
        counted = sum(n for outcomes in s["stage_totals"].values() for n in outcomes.values())
        return s["buckets_settled"] >= 1 and counted + s["replayed_offsets_ignored"] >= events

    await wait_for(read_all, 30, f"the auditor to read {events} tallied events and settle")
    try:
        await wait_for(lambda: auditor.summary()["loss"], 3, "a confirmed loss")
    except AssertionError:
        pass
    return auditor.summary()


@pytest.mark.slow  # over 10 s: `make quick` leaves it to `make test`
async def test_a_resent_tally_that_lands_after_later_tallies_still_counts(
    tmp_path, namespace, port_base, kafka, settings_for
):
    config = tmp_path / "hifi.yaml"
    write_config(config)
    topics = Topics(namespace)
    bucket = bucket_of(now_ms(), BUCKET_S)
    a = [["acme", bucket, "out", 5]]
    # Batches [0..4] and [5..9] of each stage; the first batch's produce failed and was re-sent after
    # the second had landed, at the deduplicator and at the sender.
    tallies = [
        (b"collector", accepted_tally("collector", "acme", bucket, 10)),
        (b"enricher", stage_tally("enricher", topics.raw, 0, [["acme", bucket, "out", 10]])),
        (b"deduplicator", stage_tally("deduplicator", topics.enriched, 5, a)),
        (b"deduplicator", stage_tally("deduplicator", topics.enriched, 0, a)),
        (b"router", stage_tally("router", topics.unique, 0, [["acme", bucket, "out", 10]])),
        (b"sender.hook", stage_tally("sender.hook", topics.sink("hook"), 5, [["acme", bucket, "delivered", 5]])),
        (b"sender.hook", stage_tally("sender.hook", topics.sink("hook"), 0, [["acme", bucket, "delivered", 5]])),
    ]
    await publish(kafka.bootstrap, topics.tallies, tallies)
    async with AuditorOnly(settings_for(config), tmp_path, port_base) as auditor:
        summary = await settled(auditor, 50)
    assert summary["loss"] == [] and summary["overdue"] == [], summary["loss"]
    assert summary["stage_totals"] == {
        "collector": {"accepted": 10},
        "enricher": {"out": 10},
        "deduplicator": {"out": 10},
        "router": {"out": 10},
        "sender.hook": {"delivered": 10},
    }, summary
    assert summary["lost_by_stage"] == {} and summary["replayed_offsets_ignored"] == 0


@pytest.mark.slow  # over 10 s: `make quick` leaves it to `make test`
async def test_a_surplus_does_not_mask_a_loss_in_the_same_bucket(tmp_path, namespace, port_base, kafka, settings_for):
    config = tmp_path / "hifi.yaml"
    write_config(config)
    topics = Topics(namespace)
    bucket = bucket_of(now_ms(), BUCKET_S)
    sink = topics.sink("hook")
    # 10 accepted. The deduplicator's replay after a crash wrote 2 copies (the router read 12 and passed
    # them on; the sender skipped them as delivered). The sender never read offset 6 of its topic
    # (deleted before it got there): 1 lost, which the 2 copies hide in the totals (11 vs 10).
    tallies = [
        (b"collector", accepted_tally("collector", "acme", bucket, 10)),
        (b"enricher", stage_tally("enricher", topics.raw, 0, [["acme", bucket, "out", 10]])),
        (b"deduplicator", stage_tally("deduplicator", topics.enriched, 0, [["acme", bucket, "out", 10]])),
        (b"router", stage_tally("router", topics.unique, 0, [["acme", bucket, "out", 12]])),
        (b"sender.hook", stage_tally("sender.hook", sink, 0, [["acme", bucket, "delivered", 6]])),
        (
            b"sender.hook",
            stage_tally("sender.hook", sink, 7, [["acme", bucket, "delivered", 3], ["acme", bucket, "skipped", 2]]),
        ),
    ]
    await publish(kafka.bootstrap, topics.tallies, tallies)
    async with AuditorOnly(settings_for(config), tmp_path, port_base) as auditor:
        summary = await settled(auditor, 53)
    assert summary["stage_totals"]["sender.hook"] == {"delivered": 9, "skipped": 2}, summary
    assert [(r["lost"], r["stage"], r["status"]) for r in summary["loss"]] == [(1, "sender.hook", "lost")], summary
    assert summary["loss"][0]["detail"] == "router passed on 12, sender.hook read 11"
    assert summary["lost_by_stage"] == {"sender.hook": 1}
    assert summary["surplus"] == 2, "the two copies are still reported as surplus"


@pytest.mark.slow  # over 10 s: `make quick` leaves it to `make test`
async def test_offsets_a_stage_skipped_are_reported_even_when_copies_balance_the_bucket(
    tmp_path, namespace, port_base, kafka, settings_for
):
    """Copies and a skipped offset at the same hop balance every count; only the offsets show it."""
    config = tmp_path / "hifi.yaml"
    write_config(config)
    topics = Topics(namespace)
    bucket = bucket_of(now_ms(), BUCKET_S)
    # The deduplicator passed on 10 and its replay wrote 2 copies: 12 records in hifi.unique. The router
    # never read offset 6 (deleted before it got there) and committed past it: it read 11, and the
    # sender skipped the 2 copies. Every hop and the totals balance (11 accounted for 10 accepted).
    tallies = [
        (b"collector", accepted_tally("collector", "acme", bucket, 10)),
        (b"enricher", stage_tally("enricher", topics.raw, 0, [["acme", bucket, "out", 10]])),
        (b"deduplicator", stage_tally("deduplicator", topics.enriched, 0, [["acme", bucket, "out", 10]])),
        (b"router", stage_tally("router", topics.unique, 0, [["acme", bucket, "out", 6]])),
        (b"router", stage_tally("router", topics.unique, 7, [["acme", bucket, "out", 5]])),
        (
            b"sender.hook",
            stage_tally(
                "sender.hook",
                topics.sink("hook"),
                0,
                [["acme", bucket, "delivered", 9], ["acme", bucket, "skipped", 2]],
            ),
        ),
    ]
    await publish(kafka.bootstrap, topics.tallies, tallies)
    await commit(kafka.bootstrap, topics.group("hifi-router"), topics.unique, 12)
    async with AuditorOnly(settings_for(config), tmp_path, port_base) as auditor:
        await settled(auditor, 52)
        await wait_for(lambda: auditor.summary().get("offset_gaps"), 15, "the skipped offset reported")
        summary = auditor.summary()
    assert summary["offset_gaps"] == [
        {"stage": "router", "topic": topics.unique, "partition": 0, "first": 6, "count": 1, "committed": 12}
    ], summary


async def commit(bootstrap: str, group: str, topic: str, offset: int) -> None:
    """What the stage's consumer group committed on partition 0."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.commit({tp: offset})
    finally:
        await consumer.stop()
