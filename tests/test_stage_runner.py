"""StageRunner in-process against the real broker: ownership across rebalances, produce errors.

Each runner is a real aiokafka member of a real consumer group; the faults are injected by the
handler (a sink that answers 503 for a while) or by the topic (a `max.message.bytes` too small).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, UnknownError
from yarl import URL

import shared.flight as flight_module  # it builds the producers and their publishers
import shared.stage as stage_module
from devtools.kafka import LocalKafka
from shared.codec import encode_event, unpack
from shared.config import SinkConfig
from shared.errors import TransientError
from shared.event import Event
from shared.metrics import StageMetrics
from shared.publish import BatchPublisher
from shared.retry import Backoff
from shared.stage import Handler, Output, Record, StageRunner, StepResult

pytestmark = pytest.mark.asyncio


async def create_topic(bootstrap: str, name: str, partitions: int, **configs: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs)])
    finally:
        await admin.close()


async def produce_events(
    bootstrap: str,
    topic: str,
    count: int,
    devices: int = 16,
    payload: Callable[[int], dict[str, Any]] | None = None,
    first: int = 0,
) -> list[str]:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, max_request_size=4_000_000
    )
    await producer.start()
    ids = []
    try:
        futures = []
        for n in range(first, first + count):
            event = Event(
                f"e{n}",
                "play",
                1.0,
                "acme",
                payload=payload(n) if payload else {},
                device_id=f"d{n % devices}",
                ingest_ts=time.time() * 1000,
            )
            ids.append(event.event_id)
            futures.append(await producer.send(topic, encode_event(event), key=event.partition_key))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return ids


def make_runner(bootstrap: str, group: str, name: str, source: str, handler: Handler, **options: Any) -> StageRunner:
    host, port = bootstrap.split(":")
    app = SimpleNamespace(
        conf=SimpleNamespace(id=group, broker=[URL(f"kafka://{host}:{port}")], canonical_url=f"http://{name}")
    )
    return StageRunner(app, "test", handler, StageMetrics(), f"{source}.dlq", source, **options)


def ledgered_sender(
    bootstrap: str,
    store: Path,
    group: str,
    source: str,
    sink: Any,
    changelog: str,
    receipts: str,
    partitions: int,
    name: str,
    **options: Any,
) -> StageRunner:
    """A sender worker with a RocksDB ledger in its own `store`: only the changelog carries marks between workers."""
    from services.sender.delivery import SinkDelivery
    from shared.alerts import Alerter
    from shared.keywindow import RocksKeyWindow

    ledger = RocksKeyWindow(
        "ledger",
        store,
        changelog_topic=changelog,
        bootstrap=bootstrap,
        window_s=3600,
        partitions=partitions,
        group=group,
    )
    delivery = SinkDelivery(sink, ledger, StageMetrics(), Alerter("sender.hook"), False, receipts_topic=receipts)
    return make_runner(bootstrap, group, name, source, delivery.handle, batch_max=200, states=[ledger], **options)


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def retries(runner: StageRunner) -> float:
    return runner.metrics.total(runner.metrics.retries)


class FlakySink:
    """A destination that records every event it accepted, and answers 503 while `down`."""

    def __init__(self) -> None:
        self.down = False
        self.received: collections.Counter[str] = collections.Counter()

    async def handle(self, records: list[Record]) -> StepResult:
        await asyncio.sleep(0.01)  # a round trip
        if self.down:
            raise TransientError("sink answered 503")
        self.received.update(r.event.event_id for r in records)
        return StepResult()


@pytest.fixture
async def runners() -> AsyncIterator[list[StageRunner]]:
    started: list[StageRunner] = []
    yield started
    await asyncio.gather(*(r.stop() for r in started), return_exceptions=True)


async def start(runners: list[StageRunner], runner: StageRunner) -> StageRunner:
    runners.append(runner)
    await runner.start()
    return runner


@pytest.mark.slow  # over 10 s: `make quick` leaves it to `make test`
async def test_scale_out_during_sink_outage_delivers_once_and_rebalances_fast(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner]
) -> None:
    """Issue 14's observation: two members retry through a sink outage, a third joins mid-outage.

    The members holding batches must give them up when their partitions are revoked (not deliver them
    after the group moved on), and must not stall the rebalance for its whole timeout.
    """
    source = f"{namespace}.sink"
    await create_topic(kafka.bootstrap, source, 6)
    sink = FlakySink()
    rebalance_timeout_ms = 8_000
    options = dict(batch_max=20, backoff=Backoff(0.05, 1.0), rebalance_timeout_ms=rebalance_timeout_ms)
    group = f"{namespace}-sender"
    first = await start(runners, make_runner(kafka.bootstrap, group, "a", source, sink.handle, **options))
    second = await start(runners, make_runner(kafka.bootstrap, group, "b", source, sink.handle, **options))
    await wait_for(lambda: first.joined and second.joined and not first.assigned & second.assigned, 30, "two members")
    sink.down = True
    ids = await produce_events(kafka.bootstrap, source, 300)
    await wait_for(lambda: retries(first) >= 2 and retries(second) >= 2, 30, "both retrying a batch")
    joining = time.monotonic()
    third = await start(runners, make_runner(kafka.bootstrap, group, "c", source, sink.handle, **options))
    await wait_for(lambda: third.joined, 30, "the third member's assignment")
    rebalance_s = time.monotonic() - joining
    await asyncio.sleep(max(0.0, rebalance_timeout_ms / 1000 + 4 - rebalance_s))  # past any eviction
    sink.down = False
    await wait_for(lambda: set(sink.received) >= set(ids), 60, "every event at the sink")
    await asyncio.sleep(3.0)  # a stale member's late copy would land here
    twice = {e: n for e, n in sink.received.items() if n > 1}
    assert not twice, f"{len(twice)} events delivered more than once: {sorted(twice)[:10]}"
    assert rebalance_s < rebalance_timeout_ms / 1000 / 2, f"the rebalance took {rebalance_s:.1f}s"


async def read_all(bootstrap: str, topic: str, expect: int, timeout: float) -> list[Any]:
    """Whatever the topic holds, read until `expect` records arrived or `timeout` passed."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            out.extend(m for records in batch.values() for m in records)
    finally:
        await consumer.stop()
    return out


async def committed(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        offsets = [await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)]
    finally:
        await consumer.stop()
    return sum(o or 0 for o in offsets)


async def test_output_too_large_for_its_topic_is_dead_lettered_and_the_partition_flows_on(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner]
) -> None:
    """An output over the destination's max.message.bytes can never be produced: today the acker re-sends
    its batch forever and the partition stalls. It must be dead-lettered (itself too large for the DLQ
    topic, so stored truncated with its digest) and the events behind it must flow."""
    source, out = f"{namespace}.in", f"{namespace}.out"
    await create_topic(kafka.bootstrap, source, 2)
    await create_topic(kafka.bootstrap, out, 2, **{"max.message.bytes": "4000"})
    await create_topic(kafka.bootstrap, f"{source}.dlq", 1, **{"max.message.bytes": "3000"})
    big = 7

    async def relay(records: list[Record]) -> StepResult:
        return StepResult(outputs=[Output(out, r.message.key, r.message.value) for r in records])

    group = f"{namespace}-relay"
    runner = await start(runners, make_runner(kafka.bootstrap, group, "a", source, relay, batch_max=5))
    await wait_for(lambda: runner.joined, 30, "the assignment")
    blob = {"blob": "x" * 6000}
    ids = await produce_events(kafka.bootstrap, source, 40, devices=2, payload=lambda n: blob if n == big else {})
    small = {i for i in ids if i != f"e{big}"}
    relayed = await read_all(kafka.bootstrap, out, len(small), 30)
    assert {unpack(m.value)["event_id"] for m in relayed} == small
    letters = await read_all(kafka.bootstrap, f"{source}.dlq", 1, 30)
    assert len(letters) == 1, letters
    letter = unpack(letters[0].value)
    assert letter["reason"] == "record_too_large" and letter["truncated"] is True
    assert letter["original_size"] > 6000 and len(letter["original_value"]) < 3000
    assert letter["original_sha256"]
    deadline = time.monotonic() + 30
    while await committed(kafka.bootstrap, group, source, 2) < len(ids):  # what the broker holds, not the runner
        assert time.monotonic() < deadline, "the input was not committed to its end"
        await asyncio.sleep(0.2)


class DeviceOutageSink:
    """A SinkSender (services/sender/sinks.py) that records what it accepted and answers 503 to any
    request holding an event of a device in `down`: a batch spread over partitions is acked in part."""

    def __init__(self, name: str) -> None:
        self.config = SinkConfig(name, "test", {})
        self.down: set[str] = set()
        self.received: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        pass

    async def deliver_batch(self, events: list[Event], source: Any = None) -> None:
        await asyncio.sleep(0.01)
        if any(e.device_id in self.down for e in events):
            raise TransientError("sink answered 503")
        self.received.update(e.event_id for e in events)

    async def close(self) -> None:
        pass


@pytest.mark.slow  # over 10 s: `make quick` leaves it to `make test`
async def test_sender_revoked_mid_retry_publishes_what_the_sink_acked_and_the_next_owner_skips_it(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner], tmp_path: Path
) -> None:
    """A sender whose batch was acked for some partitions and is retried for another loses its partitions:
    the acked part's ledger marks (changelog) and receipts must be published before the handover, so the
    next owner skips it, and the retried part must not be delivered by the old owner afterwards."""
    partitions = 4
    source, receipts = f"{namespace}.sink", f"{namespace}.receipts"
    group = f"{namespace}-sender"
    await create_topic(kafka.bootstrap, source, partitions)
    await create_topic(kafka.bootstrap, receipts, 1)
    await create_topic(kafka.bootstrap, f"{group}.ledger.changelog", partitions)
    sink = DeviceOutageSink("hook")
    rebalance_timeout_ms = 8_000

    def sender(name: str) -> StageRunner:
        return ledgered_sender(
            kafka.bootstrap,
            tmp_path / name,
            group,
            source,
            sink,
            f"{group}.ledger.changelog",
            receipts,
            partitions,
            name,
            backoff=Backoff(0.05, 1.0),
            rebalance_timeout_ms=rebalance_timeout_ms,
        )

    # d0 lives on partition 2, which the first member keeps (round robin over members a, b); the acked
    # part includes partition 3 (d1, d3, d6), which moves: only the changelog tells its next owner.
    sink.down = {"d0"}
    ids = await produce_events(kafka.bootstrap, source, 120, devices=8)
    first = await start(runners, sender("a"))  # its first fetch holds every partition
    await wait_for(lambda: len(sink.received) > 0 and retries(first) >= 2, 30, "a partial delivery, then retries")
    joining = time.monotonic()
    second = await start(runners, sender("b"))
    await wait_for(lambda: second.joined and not second.restoring, 30, "the second member's assignment")
    rebalance_s = time.monotonic() - joining
    owned = second.assigned | second.restoring  # joined: its ledger may still be restoring
    assert {tp.partition for tp in owned} == {1, 3}, "the acked partition 3 must move"
    await asyncio.sleep(max(0.0, rebalance_timeout_ms / 1000 + 4 - rebalance_s))  # past any eviction
    sink.down = set()
    await wait_for(lambda: set(sink.received) >= set(ids), 60, "every event at the sink")
    await asyncio.sleep(3.0)  # a late copy would land here
    twice = {e: n for e, n in sink.received.items() if n > 1}
    assert not twice, f"{len(twice)} events delivered more than once: {sorted(twice)[:10]}"
    records = await read_all(kafka.bootstrap, receipts, 10_000, 5)
    receipted = collections.Counter(row[0] for r in records for row in unpack(r.value)["events"])
    assert set(receipted) == set(ids), f"no receipt for {sorted(set(ids) - set(receipted))[:10]}"
    assert rebalance_s < rebalance_timeout_ms / 1000 / 2, f"the rebalance took {rebalance_s:.1f}s"


@pytest.mark.slow  # over 10 s: `make quick` leaves it to `make test`
async def test_a_request_outlasting_the_revoke_grace_is_cancelled_not_delivered_late(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner]
) -> None:
    """A destination call that hangs past `revoke_grace_s` at a revocation is cancelled: the group moves
    on after the grace, and the stale member does not deliver when the call would have returned."""
    source = f"{namespace}.sink"
    await create_topic(kafka.bootstrap, source, 4)
    received: collections.Counter[str] = collections.Counter()
    hanging = asyncio.Event()
    hang_s = 15.0

    async def slow_sink(records: list[Record]) -> StepResult:
        if not hanging.is_set():
            hanging.set()
            await asyncio.sleep(hang_s)  # a request the destination answers (and takes) only after 15 s
        received.update(r.event.event_id for r in records)
        return StepResult()

    options = dict(batch_max=500, rebalance_timeout_ms=8_000, revoke_grace_s=2.0)
    group = f"{namespace}-sender"
    ids = await produce_events(kafka.bootstrap, source, 100)
    await start(runners, make_runner(kafka.bootstrap, group, "a", source, slow_sink, **options))
    await asyncio.wait_for(hanging.wait(), 30)
    joining = time.monotonic()
    second = await start(runners, make_runner(kafka.bootstrap, group, "b", source, slow_sink, **options))
    await wait_for(lambda: second.joined, 30, "the second member's assignment")
    rebalance_s = time.monotonic() - joining
    await wait_for(lambda: set(received) >= set(ids), 60, "every event at the sink")
    await asyncio.sleep(max(0.0, hang_s + 2 - (time.monotonic() - joining)))  # when the hung call would return
    twice = {e: n for e, n in received.items() if n > 1}
    assert not twice, f"{len(twice)} events delivered more than once: {sorted(twice)[:10]}"
    assert rebalance_s < 6.0, f"the rebalance took {rebalance_s:.1f}s"


async def test_sigterm_during_a_sink_outage_gives_the_batch_up_at_once_and_commits_only_what_was_delivered(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner]
) -> None:
    """A first batch is delivered, the sink goes down, a second batch retries; SIGTERM must end the retry at
    once (not wait out the stop's 10 s bound), commit exactly the delivered batch (the periodic commit is
    off: only the stop commits), and deliver nothing of the second."""
    source = f"{namespace}.sink"
    await create_topic(kafka.bootstrap, source, 2)
    sink = FlakySink()
    group = f"{namespace}-sender"
    runner = await start(runners, make_runner(kafka.bootstrap, group, "a", source, sink.handle, commit_interval_s=600))
    await wait_for(lambda: runner.joined, 30, "the assignment")
    delivered = await produce_events(kafka.bootstrap, source, 25)
    await wait_for(lambda: set(sink.received) == set(delivered), 30, "the first batch delivered")
    await wait_for(lambda: sum(runner.done.values()) == 25, 30, "the first batch durable")
    sink.down = True
    await produce_events(kafka.bootstrap, source, 25, first=25)
    await wait_for(lambda: retries(runner) >= 2, 30, "the second batch retrying")
    stopping = time.monotonic()
    await runner.stop()
    stop_s = time.monotonic() - stopping
    assert stop_s < 5.0, f"stopping took {stop_s:.1f}s"
    assert set(sink.received) == set(delivered), "the retried batch was delivered at the stop"
    assert await committed(kafka.bootstrap, group, source, 2) == 25, "the stop must commit exactly the delivered batch"


class FaultyPublisher(BatchPublisher):
    """The real publisher, failing chosen `publish` calls: `fail(n, outputs)` returns the error for call n."""

    def __init__(self, producer: Any, fail: Callable[[int, list[Output]], Exception | None]) -> None:
        super().__init__(producer)
        self.fail = fail
        self.calls = 0

    async def publish(self, outputs: Any, into: Any = None) -> Any:
        self.calls += 1
        error = self.fail(self.calls, list(outputs))
        if error is not None:
            raise error
        return await super().publish(outputs, into=into)


def relay_to(out: str) -> Handler:
    async def relay(records: list[Record]) -> StepResult:
        return StepResult(outputs=[Output(out, r.message.key, r.message.value) for r in records])

    return relay


async def test_a_batch_given_up_at_a_stop_is_not_passed_by_the_done_offsets_of_later_batches(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding 1: batch N's publish fails and it waits out a long backoff; N+1 is acked; a SIGTERM
    ends N's wait (given up). N+1's offsets must not be committed past N: N's outputs were never produced."""
    source, out = f"{namespace}.in", f"{namespace}.out"
    await create_topic(kafka.bootstrap, source, 1)
    await create_topic(kafka.bootstrap, out, 1)
    group = f"{namespace}-relay"
    runner = make_runner(kafka.bootstrap, group, "a", source, relay_to(out), batch_max=5, backoff=Backoff(0.5, 1.0))
    await start(runners, runner)
    await wait_for(lambda: runner.joined, 30, "the assignment")
    assert runner.producer is not None
    batch_n = {f"e{n}".encode() for n in range(5, 10)}

    def fail_batch_n(call: int, outputs: list[Output]) -> Exception | None:
        return (
            KafkaConnectionError("injected")
            if any(unpack(o.value)["event_id"].encode() in batch_n for o in outputs)
            else None
        )

    monkeypatch.setattr(flight_module, "BatchPublisher", lambda producer: FaultyPublisher(producer, fail_batch_n))
    runner.publisher = FaultyPublisher(runner.producer, fail_batch_n)  # and every producer renewed later
    ids = await produce_events(kafka.bootstrap, source, 5)
    await wait_for(lambda: runner.metrics.total(runner.metrics.events_in) >= 5, 30, "the first batch")
    ids += await produce_events(kafka.bootstrap, source, 5, first=5)  # batch N: its publish fails
    await wait_for(lambda: retries(runner) >= 1, 30, "batch N retrying")
    ids += await produce_events(kafka.bootstrap, source, 5, first=10)  # batch N+1: acked while N retries
    relayed = await read_all(kafka.bootstrap, out, 10, 30)
    assert len(relayed) == 10, "batch N+1 not relayed"
    await runner.stop()
    have = {unpack(m.value)["event_id"] for m in await read_all(kafka.bootstrap, out, len(ids), 5)}
    done = await committed(kafka.bootstrap, group, source, 1)
    missing = [i for i in ids[:done] if i not in have]
    assert not missing, f"committed {done} but never produced {missing}"


async def test_a_record_the_broker_answers_unknown_error_is_dead_lettered_after_a_bounded_number_of_attempts(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding 6: a broker INVALID_RECORD reaches aiokafka as UnknownError; retried forever, the
    acker stalls the worker. After a bounded number of attempts the record is dead-lettered and the rest flows."""
    source, out = f"{namespace}.in", f"{namespace}.out"
    await create_topic(kafka.bootstrap, source, 1)
    await create_topic(kafka.bootstrap, out, 1)
    group = f"{namespace}-relay"
    runner = make_runner(kafka.bootstrap, group, "a", source, relay_to(out), batch_max=5, backoff=Backoff(0.01, 0.05))
    await start(runners, runner)
    await wait_for(lambda: runner.joined, 30, "the assignment")
    assert runner.producer is not None

    def refuse_e3(call: int, outputs: list[Output]) -> Exception | None:
        bad = any(o.topic == out and b"\xa8event_id\xa2e3" in o.value for o in outputs)
        return UnknownError("injected INVALID_RECORD") if bad else None

    monkeypatch.setattr(flight_module, "BatchPublisher", lambda producer: FaultyPublisher(producer, refuse_e3))
    runner.publisher = FaultyPublisher(runner.producer, refuse_e3)  # and every producer renewed later
    ids = await produce_events(kafka.bootstrap, source, 12)
    await read_all(kafka.bootstrap, out, 11, 30)
    letters = await read_all(kafka.bootstrap, f"{source}.dlq", 1, 30)
    relayed = await read_all(kafka.bootstrap, out, 12, 2)  # a copy of e3 would show here
    assert sorted(unpack(m.value)["event_id"] for m in relayed) == sorted(set(ids) - {"e3"})
    assert len(letters) == 1 and unpack(letters[0].value)["reason"] == "record_refused"
    deadline = time.monotonic() + 30
    while await committed(kafka.bootstrap, group, source, 1) < len(ids):
        assert time.monotonic() < deadline, "the input was not committed to its end"
        await asyncio.sleep(0.2)


async def test_a_produce_stalled_across_a_revocation_still_lands_the_delivered_batchs_ledger_marks(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding 2: the sink acked a batch, then its publish (receipts, ledger changelog) stalls (an
    acks=all stall) past the revoke grace. Cancelling it drops the ledger marks and the next owner delivers
    the batch again; only the handler may be cancelled, and the revocation must still end within the
    rebalance timeout."""
    partitions = 4
    source, receipts = f"{namespace}.sink", f"{namespace}.receipts"
    group = f"{namespace}-sender"
    changelog = f"{group}.ledger.changelog"
    await create_topic(kafka.bootstrap, source, partitions)
    await create_topic(kafka.bootstrap, receipts, 1)
    await create_topic(kafka.bootstrap, changelog, partitions)
    sink = DeviceOutageSink("hook")
    rebalance_timeout_ms = 10_000
    stalling: list[StageRunner] = []
    stalled = asyncio.Event()

    class StallingPublisher(BatchPublisher):
        async def publish(self, outputs: Any, into: Any = None) -> Any:
            runner = stalling[0] if stalling else None
            if runner is not None and not stalled.is_set() and any(o.topic == changelog for o in outputs):
                stalled.set()
                await runner._owner.revoked.wait()  # the produce is stuck until a rebalance starts...
                await asyncio.sleep(3.0)  # ...and past the 1 s revoke grace
            return await super().publish(outputs, into=into)

    monkeypatch.setattr(flight_module, "BatchPublisher", StallingPublisher)

    def sender(name: str) -> StageRunner:
        return ledgered_sender(
            kafka.bootstrap,
            tmp_path / name,
            group,
            source,
            sink,
            changelog,
            receipts,
            partitions,
            name,
            backoff=Backoff(0.05, 1.0),
            rebalance_timeout_ms=rebalance_timeout_ms,
            revoke_grace_s=1.0,
        )

    first = await start(runners, sender("a"))
    stalling.append(first)
    await wait_for(lambda: first.joined and not first.restoring, 30, "the first member's assignment")
    ids = await produce_events(kafka.bootstrap, source, 120, devices=8)
    await asyncio.wait_for(stalled.wait(), 30)
    assert set(sink.received) == set(ids), "one batch of everything, acked by the sink"
    joining = time.monotonic()
    second = await start(runners, sender("b"))
    await wait_for(lambda: second.joined and not second.restoring, 30, "the second member's assignment")
    rebalance_s = time.monotonic() - joining
    await asyncio.sleep(3.0)  # the second member would deliver its partitions again here
    twice = {e: n for e, n in sink.received.items() if n > 1}
    assert not twice, f"{len(twice)} events delivered more than once: {sorted(twice)[:10]}"
    assert rebalance_s < rebalance_timeout_ms / 1000, f"the rebalance took {rebalance_s:.1f}s"


async def test_a_dead_letter_of_a_refused_output_names_the_input_it_came_from(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner]
) -> None:
    """From the DLQ review: the letter of an output the broker refused named topic=<output>, offset -1, so
    a replay's `hifi-replay-of` matched no claim and the deduplicator dropped the replayed copy as its own
    duplicate. It must name the source record (topic:partition:offset) the output was made from."""
    from shared.dlq import REPLAY_OF, replay_headers

    source, out = f"{namespace}.in", f"{namespace}.out"
    await create_topic(kafka.bootstrap, source, 1)
    await create_topic(kafka.bootstrap, out, 1, **{"max.message.bytes": "4000"})
    await create_topic(kafka.bootstrap, f"{source}.dlq", 1)
    runner = await start(runners, make_runner(kafka.bootstrap, f"{namespace}-relay", "a", source, relay_to(out)))
    await wait_for(lambda: runner.joined, 30, "the assignment")
    await produce_events(kafka.bootstrap, source, 6, payload=lambda n: {"blob": "x" * 6000} if n == 4 else {})
    letters = await read_all(kafka.bootstrap, f"{source}.dlq", 1, 30)
    assert len(letters) == 1
    letter = unpack(letters[0].value)
    assert (letter["topic"], letter["partition"], letter["offset"]) == (source, 0, 4)
    assert letter["reason"] == "record_too_large"
    assert unpack(letter["original_value"])["event_id"] == "e4"
    assert dict(replay_headers(letter))[REPLAY_OF] == f"{source}:0:4".encode()


async def test_a_refused_outputs_letter_names_its_own_input_when_another_tenant_shares_its_event_id(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner]
) -> None:
    """From the second review: the input was found by event id alone, so when two tenants' events share
    an id in one fetch, the letter of the refused one named the other's message: a replay re-sent the
    wrong event and the refused one could never be replayed."""
    source, out = f"{namespace}.in", f"{namespace}.out"
    await create_topic(kafka.bootstrap, source, 1)
    await create_topic(kafka.bootstrap, out, 1, **{"max.message.bytes": "4000"})
    await create_topic(kafka.bootstrap, f"{source}.dlq", 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", max_request_size=4_000_000)
    await producer.start()
    try:  # one batch, so one fetch holds both
        small = Event("same-id", "play", 1.0, "acme", device_id="d1", ingest_ts=time.time() * 1000)
        large = Event(
            "same-id", "play", 1.0, "globex", {"blob": "x" * 6000}, device_id="d1", ingest_ts=time.time() * 1000
        )
        futures = [await producer.send(source, encode_event(e), key=b"d1") for e in (small, large)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    runner = await start(runners, make_runner(kafka.bootstrap, f"{namespace}-relay", "a", source, relay_to(out)))
    await wait_for(lambda: runner.joined, 30, "the assignment")
    letters = await read_all(kafka.bootstrap, f"{source}.dlq", 1, 30)
    letter = unpack(letters[0].value)
    assert (letter["topic"], letter["offset"]) == (source, 1), letter
    assert unpack(letter["original_value"])["tenant"] == "globex"


async def test_a_revoked_batch_whose_outputs_keep_failing_lands_its_ledger_marks_and_frees_the_acker(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Second review, finding 3: a batch carrying a store's changelog was re-sent without end, even after its
    partitions moved. When its other outputs can never land (here: the broker refuses the batch's receipts
    for good), the acker was wedged behind it: nothing the worker handled afterwards was marked done or
    committed, and its ledger marks never landed, so the next owner delivered the batch again. Revoked, only
    the changelog must still be sent, and the acker must move on."""
    from aiokafka.errors import TopicAuthorizationFailedError

    partitions = 4
    source, receipts = f"{namespace}.sink", f"{namespace}.receipts"
    group = f"{namespace}-sender"
    changelog = f"{group}.ledger.changelog"
    await create_topic(kafka.bootstrap, source, partitions)
    await create_topic(kafka.bootstrap, receipts, 1)
    await create_topic(kafka.bootstrap, changelog, partitions)
    sink = DeviceOutageSink("hook")
    refused: set[str] = set()  # event ids whose receipts the broker refuses, for good

    class RefusingPublisher(BatchPublisher):
        async def publish(self, outputs: Any, into: Any = None) -> Any:
            for out in outputs:
                if out.topic == receipts and {row[0] for row in unpack(out.value)["events"]} & refused:
                    raise TopicAuthorizationFailedError()
            return await super().publish(outputs, into=into)

    monkeypatch.setattr(flight_module, "BatchPublisher", RefusingPublisher)

    def sender(name: str) -> StageRunner:
        return ledgered_sender(
            kafka.bootstrap,
            tmp_path / name,
            group,
            source,
            sink,
            changelog,
            receipts,
            partitions,
            name,
            backoff=Backoff(0.05, 0.5),
            rebalance_timeout_ms=10_000,
        )

    first = await start(runners, sender("a"))
    await wait_for(lambda: first.joined and not first.restoring, 30, "the first member's assignment")
    before = [f"e{n}" for n in range(80)]
    refused.update(before)
    await produce_events(kafka.bootstrap, source, 80, devices=8)
    await wait_for(lambda: set(sink.received) >= set(before) and retries(first) >= 3, 30, "the refused publish")
    second = await start(runners, sender("b"))
    await wait_for(lambda: second.joined and not second.restoring and first.joined, 30, "both assignments")
    after = await produce_events(kafka.bootstrap, source, 80, devices=8, first=80)
    await wait_for(lambda: set(sink.received) >= set(after), 30, "the later events at the sink")
    await asyncio.sleep(2.0)  # a copy of the refused batch would land here
    twice = {e: n for e, n in sink.received.items() if n > 1}
    assert not twice, f"{len(twice)} events delivered more than once: {sorted(twice)[:10]}"

    async def all_committed() -> bool:
        return await committed(kafka.bootstrap, group, source, partitions) == 160

    deadline = time.monotonic() + 20
    while not await all_committed():
        assert time.monotonic() < deadline, "the group's offsets stopped short: an acker is wedged"
        await asyncio.sleep(0.5)


class HandsOverPartly:
    """A real producer whose `send_batch` refuses once, at the second record batch of a publish: the first
    batch is already with the producer (it will be written), the rest never went."""

    def __init__(self, producer: Any, state: dict[str, int]) -> None:
        self.producer = producer
        self.state = state

    def __getattr__(self, name: str) -> Any:
        return getattr(self.producer, name)

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any:
        self.state["calls"] += 1
        if self.state["calls"] == 2:
            raise KafkaTimeoutError("injected: the partition's leader was not found in time")
        return await self.producer.send_batch(batch, topic, partition=partition)


async def test_a_publish_failing_part_way_re_sends_only_the_batches_that_never_went(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's outputs go as one record batch per partition, one `send_batch` after another. When one
    fails (a leader not found in time), the batches handed over before it are written anyway: re-sending
    the whole batch wrote those records twice."""
    source, out = f"{namespace}.in", f"{namespace}.out"
    await create_topic(kafka.bootstrap, source, 1)
    await create_topic(kafka.bootstrap, out, 2)  # two partitions: a publish hands over two record batches
    runner = make_runner(
        kafka.bootstrap, f"{namespace}-relay", "a", source, relay_to(out), batch_max=50, backoff=Backoff(0.01, 0.05)
    )
    await start(runners, runner)
    await wait_for(lambda: runner.joined, 30, "the assignment")
    assert runner.producer is not None
    state = {"calls": 0}
    monkeypatch.setattr(flight_module, "BatchPublisher", lambda p: BatchPublisher(HandsOverPartly(p, state)))
    runner.publisher = BatchPublisher(HandsOverPartly(runner.producer, state))
    ids = await produce_events(kafka.bootstrap, source, 20)
    await read_all(kafka.bootstrap, out, 20, 30)
    relayed = await read_all(kafka.bootstrap, out, 40, 3)  # copies would show here
    copies = collections.Counter(unpack(m.value)["event_id"] for m in relayed)
    assert state["calls"] >= 3, "the fault was never injected"
    assert set(copies) == set(ids) and max(copies.values()) == 1, f"written twice: {copies.most_common(3)}"


@pytest.mark.parametrize("first_renewal", ["starts", "cannot start"])
async def test_a_producer_whose_sender_died_of_an_unexpected_error_is_renewed(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner], monkeypatch: pytest.MonkeyPatch, first_renewal: str
) -> None:
    """Review (stop 26): aiokafka's sender routine ends on any error it does not expect (raised as KafkaError
    "Unexpected error during batch delivery"); every send then fails at once. Only OutOfOrderSequenceNumber renewed
    the producer, so the stage retried through the dead sender for ever."""
    source, out = f"{namespace}.in", f"{namespace}.out"
    await create_topic(kafka.bootstrap, source, 1)
    await create_topic(kafka.bootstrap, out, 1)
    runner = make_runner(
        kafka.bootstrap, f"{namespace}-relay", "a", source, relay_to(out), batch_max=5, backoff=Backoff(0.05, 0.2)
    )
    await start(runners, runner)
    await wait_for(lambda: runner.joined, 30, "the assignment")
    producer = runner.producer
    assert producer is not None

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected: a bug in the send path")

    producer._sender._send_produce_req = broken  # the sender routine dies of it
    shutdowns: list[int] = []
    monkeypatch.setattr(stage_module.os, "kill", lambda pid, sig: shutdowns.append(sig))  # `_guard`'s SIGTERM
    if first_renewal == "cannot start":  # review: its error ended the acker, and `_guard` shut the worker down
        real, made = flight_module.durable_producer, []

        def unreachable_once(bootstrap: str, client_id: str) -> AIOKafkaProducer:
            made.append(None)
            return real("127.0.0.1:9" if len(made) == 1 else bootstrap, client_id)

        monkeypatch.setattr(flight_module, "durable_producer", unreachable_once)
    ids = await produce_events(kafka.bootstrap, source, 5)
    relayed = await read_all(kafka.bootstrap, out, 5, 30)
    assert producer._sender.sender_task.done()  # the fault did happen
    assert {unpack(m.value)["event_id"] for m in relayed} == set(ids)
    assert runner.producer is not producer
    assert not shutdowns, "the worker shut itself down"
