"""Writing a batch of records to Kafka: one record batch per topic partition, not one `send` per record.

aiokafka's `producer.send` costs about 9 µs of CPU per record (a future, the partitioner's pure-Python
murmur2, the accumulator's bookkeeping, and resolving the future on the ack); filling one
`BatchBuilder` per topic partition and handing it over with `send_batch` costs about 2.5 µs
(measured on the bench machine with a 220-byte record). A stage writes each fetch's outputs at once,
so it can build the batches itself.

What stays the same as `send`: the partition of a keyed record (Kafka's default partitioner,
murmur2 of the key modulo the partition count, so every producer agrees where a device's events
go), the order of the records of one partition, and the producer's acks and idempotence. The
producer keeps one batch per partition in its queue: `send_batch` waits until the previous one was
handed to the broker, which keeps the order of successive calls.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTimestampError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    ProducerClosed,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnknownError,
)
from aiokafka.partitioner import murmur2

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes
    partition: int | None = None  # None: Kafka's default partitioner on the key
    headers: list[tuple[str, bytes]] | None = None


@dataclass(slots=True)
class Published:
    """The broker's acks for one `publish` call: one future per record batch, and where each record went."""

    futures: list[asyncio.Future[Any]]
    placed: list[tuple[int, int]]  # per output, in order: (index of its batch's future, offset within that batch)

    def offset_of(self, index: int, acked: Sequence[Any]) -> tuple[int, int]:
        """(partition, offset) of output `index`, given the results of `futures` in order."""
        batch, relative = self.placed[index]
        meta = acked[batch]
        return meta.partition, meta.offset + relative


class BatchPublisher:
    MAX_CACHED_KEYS = 100_000

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        # murmur2 is pure Python in aiokafka; devices send many events, so their partition is remembered.
        self._partition_of: dict[tuple[bytes, int], int] = {}

    async def publish(self, outputs: Sequence[Output], into: Published | None = None) -> Published:
        """Hand `outputs` to the producer; `into`, if given, is filled as batches are handed over, so a caller
        whose `publish` failed or was cancelled part way still holds the futures of the batches that went."""
        producer = self.producer
        counts: dict[str, int] = {}
        open_batches: dict[tuple[str, int], tuple[Any, int]] = {}  # (topic, partition) -> (builder, its future index)
        pending: list[tuple[Any, str, int]] = []  # builders in the order they were opened
        placed: list[tuple[int, int]] = []
        for out in outputs:
            partition = out.partition
            if partition is None:
                count = counts.get(out.topic)
                if count is None:
                    count = counts[out.topic] = len(await producer.partitions_for(out.topic))
                partition = self._partition(out.key, count)
            slot = (out.topic, partition)
            opened = open_batches.get(slot)
            if opened is None:
                opened = open_batches[slot] = (producer.create_batch(), len(pending))
                pending.append((opened[0], out.topic, partition))
            builder, index = opened
            meta = builder.append(key=out.key, value=out.value, timestamp=None, headers=out.headers or [])
            if meta is None:  # full: the next records of this partition go to a new batch
                opened = open_batches[slot] = (producer.create_batch(), len(pending))
                pending.append((opened[0], out.topic, partition))
                builder, index = opened
                # An empty batch takes any first record, however large: the broker refuses one over its
                # limits, and the runner dead-letters it then.
                meta = builder.append(key=out.key, value=out.value, timestamp=None, headers=out.headers or [])
                assert meta is not None
            placed.append((index, meta.offset))
        published = into if into is not None else Published([], [])
        published.placed[:] = placed
        for builder, topic, p in pending:
            published.futures.append(await producer.send_batch(builder, topic, partition=p))
        return published

    def _partition(self, key: bytes | None, count: int) -> int:
        if key is None:
            return random.randrange(count)
        cached = self._partition_of.get((key, count))
        if cached is None:
            if len(self._partition_of) >= self.MAX_CACHED_KEYS:
                self._partition_of.clear()
            # Kafka's default partitioner (Java's and aiokafka's): positive murmur2 of the key modulo the count.
            cached = self._partition_of[(key, count)] = (murmur2(key) & 0x7FFFFFFF) % count
        return cached


async def retire(producer: AIOKafkaProducer) -> None:
    """Stop a producer that is being replaced: what it holds is flushed, and nothing is left waiting forever.

    aiokafka's `stop` flushes only the batches queued when it began, then stops the sender, which waits for
    its requests in flight; a `send_batch` that was waiting for its partition's previous batch to drain
    queues behind it, and its future never resolves. Once `stop` has returned no request is in flight, so
    what is left never reached the wire after its last attempt: it is failed with ProducerClosed, and
    whoever awaits it re-sends with the new producer. Cancelled before that (a caller's timeout), `retire`
    fails nothing: a batch still on the wire may yet be acked, and failing it would send a second copy. Its
    callers then `abandon` the producer only where nobody re-sends any more (a stop: `Retirements.settle`).
    """
    await producer.stop()
    producer._message_accumulator.fail_all(ProducerClosed())  # no public API fails a closed producer's queue


class Retirements:
    """Producers taken out of service, each flushed and stopped in the background (`retire`), their clients
    kept in the metadata watchdog's view until closed: a flush waits on the metadata refresh while a batch's
    partition has no known leader, so a wedged refresh would hold it for ever. `settle` bounds them (a stop):
    one still retiring then is cancelled and `abandon`ed (its sender ended, its client closed). The collector,
    the stages and the Kafka sink replace their producers the same way, so they retire them the same way (the
    collector and the stages hand `clients()` to their watchdog; the sink's may write to another cluster)."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.producers: set[AIOKafkaProducer] = set()  # flushing, not closed yet
        self.tasks: set[asyncio.Task[None]] = set()

    def add(self, producer: AIOKafkaProducer) -> None:
        self.producers.add(producer)

        async def retiring() -> None:
            try:
                await retire(producer)
            except asyncio.CancelledError:
                await abandon(producer)
                raise
            except Exception as exc:  # e.g. ProducerFenced out of `stop`: before its client was closed
                log.warning("%s: a retiring producer's stop failed (%r); abandoning it", self.owner, exc)
                await abandon(producer)
            finally:
                self.producers.discard(producer)

        task = asyncio.create_task(retiring(), name=f"{self.owner}-retire-producer")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def clients(self) -> list[Any]:
        """The retiring producers' clients, for the metadata watchdog."""
        return [producer.client for producer in self.producers]

    async def settle(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for every retirement; cancel (and so abandon) those still running."""
        if not self.tasks:
            return
        _, late = await asyncio.wait(set(self.tasks), timeout=timeout_s)
        if late:
            log.warning("%s: %d retiring producers outlasted %.0fs; abandoning them", self.owner, len(late), timeout_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)


async def stop_or_abandon(producer: AIOKafkaProducer, timeout_s: float) -> None:
    """Stop a producer (its flush included) within `timeout_s`; past it, `abandon` it: its `stop` has marked it
    closed, so no later `stop` would end its sender."""
    try:
        await asyncio.wait_for(producer.stop(), timeout_s)
    except TimeoutError:  # e.g. its flush waits on a wedged metadata refresh
        log.warning("a producer did not stop within %.0fs; abandoning it", timeout_s)
        await abandon(producer)


# A replacement producer's start (bootstrap, InitProducerId) is bounded: the failed one is kept meanwhile.
PRODUCER_START_S = 5.0


async def start_replacement(producer: AIOKafkaProducer, timeout_s: float = PRODUCER_START_S) -> Exception | None:
    """Start a producer meant to replace a failed one, within `timeout_s`: None once started; otherwise why not,
    the producer stopped (the caller keeps the failed one and asks again later). Cancelled, it is stopped too:
    nobody else holds it."""
    try:
        async with asyncio.timeout(timeout_s):
            await producer.start()
    except Exception as exc:  # e.g. no bootstrap server answers: KafkaConnectionError, or the timeout
        await producer.stop()
        return exc
    except BaseException:
        await producer.stop()
        raise
    return None


def sender_died(producer: AIOKafkaProducer) -> bool:
    """aiokafka's sender task has ended (an error: OutOfOrderSequenceNumber, or any it did not expect): every
    later send fails at once, before any batch exists, and only a new producer sends again."""
    sender = producer._sender  # no public API says so
    return sender is not None and sender.sender_task is not None and sender.sender_task.done()


async def abandon(producer: AIOKafkaProducer, timeout_s: float = 3.0) -> None:
    """What a `stop` cut short leaves of a producer (`_closed` set, so a second `stop` does nothing): its sender
    ended, so it can neither send what it holds later nor reconnect, what it holds failed (ProducerClosed), and
    its client closed. Bounded. A request still in flight to a silent broker may keep the cancelled sender task
    waiting on a metadata refresh that the closed client never answers: that task lingers (its sockets are
    closed; nothing more is sent) until the process ends."""
    sender = producer._sender
    if sender is not None and sender.sender_task is not None:
        sender.sender_task.cancel()
    producer._message_accumulator.fail_all(ProducerClosed())
    try:
        await asyncio.wait_for(producer.client.close(), timeout_s)
    except Exception as exc:  # a timeout, or what a dead refresh task ended with (the close re-raises it)
        log.warning("a producer's client did not close cleanly within %.0fs: %r", timeout_s, exc)


# Produce errors no retry can fix: a record or its batch over a size limit, or a record the broker refuses.
TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)
UNSENDABLE = (*TOO_LARGE, CorruptRecordException, InvalidTimestampError)
# The broker's INVALID_RECORD (error 87) reaches aiokafka as UnknownError, which can also be transient:
# unsendable once it persisted this many attempts, so a refused record never stalls its partition.
UNKNOWN_ERROR_ATTEMPTS = 8


def unsendable(error: BaseException, unknown_attempts: int) -> bool:
    """No retry can send the record: refused outright, or UnknownError for `UNKNOWN_ERROR_ATTEMPTS` attempts."""
    return isinstance(error, UNSENDABLE) or (
        isinstance(error, UnknownError) and unknown_attempts >= UNKNOWN_ERROR_ATTEMPTS
    )


def transient(exc: BaseException) -> bool:
    """A broker error that retrying can outlast (unreachable, timed out, leader moving)."""
    return isinstance(exc, KafkaTimeoutError) or (isinstance(exc, KafkaError) and bool(exc.retriable))


WARM_UP_S = 5.0  # at most this long looking up the topics a worker writes before it joins or says it is ready


async def warm_up(producer: AIOKafkaProducer, topics: Sequence[str], timeout_s: float = WARM_UP_S) -> list[str]:
    """Look up `topics` and connect to each of their leaders, so a worker's first batch pays neither (issue 15).

    A worker handed partitions in a rebalance wrote its first batch only after aiokafka had looked up each
    topic it wrote (outputs, tallies, changelog; one metadata round trip per topic, in turn) and connected to
    their leaders, while those partitions stood still. Here every topic is added to the client's list first,
    so one metadata request answers them all. aiokafka opens connections one at a time (one lock per client),
    so a leader that does not answer holds the rest until `timeout_s`. Returns the topics not known within
    `timeout_s` (the caller logs them): the worker goes on, and its first batch waits for them as it did before.
    A producer stopped meanwhile (a SIGTERM during the warm-up) is left alone: connecting its closed client
    would leave sockets nobody closes.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    client = producer.client
    wanted = list(dict.fromkeys(topics))
    for topic in wanted:
        client.add_topic(topic)  # tracked from now on, as a first produce to it would have made it
    missing = [t for t in wanted if client.cluster.partitions_for_topic(t) is None]
    while missing and loop.time() < deadline:
        try:
            await asyncio.wait_for(client.force_metadata_update(), deadline - loop.time())
        except (TimeoutError, KafkaError):
            break
        missing = [t for t in wanted if client.cluster.partitions_for_topic(t) is None]
        if missing:  # not (yet) known to the broker: ask again after a pause, until the deadline
            await asyncio.sleep(max(0.0, min(0.1, deadline - loop.time())))
    leaders = {
        leader
        for topic in wanted
        for partition in client.cluster.partitions_for_topic(topic) or ()
        if (leader := client.cluster.leader_for_partition(TopicPartition(topic, partition))) is not None and leader >= 0
    }
    if producer._closed:  # aiokafka: no public flag
        return missing
    left = max(0.0, deadline - loop.time())
    # Not connected in time: the first produce connects, as before.
    await asyncio.gather(*(asyncio.wait_for(client.ready(n), left) for n in sorted(leaders)), return_exceptions=True)
    return missing
