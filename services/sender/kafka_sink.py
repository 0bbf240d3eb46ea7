"""The Kafka sink: a topic, written with acks=all and the idempotent producer; transactional on the
pipeline's own cluster (source offsets in the transaction)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    CorruptRecordException,
    InvalidMessageError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerClosed,
    RecordTooLargeError,
    UnsupportedForMessageFormatError,
    for_code,
)
from aiokafka.protocol.commit import OffsetFetchRequest

from shared.app import durable_producer
from shared.config import SinkConfig
from shared.errors import (
    PartialDelivery,
    PermanentSinkError,
    TransientError,
)
from shared.event import Event
from shared.publish import Retirements, abandon, retire, stop_or_abandon
from shared.retry import Backoff

from .sinks import Source, idempotency_key, sink_record

# Asking the group's commit after fencing: a coordinator moving or loading answers with an error for a while.
COMMIT_FETCH_ATTEMPTS = 6
COMMIT_FETCH_BACKOFF = Backoff(0.1, 2.0)

# Produce errors no retry can cure: the record itself is at fault (too large, corrupt, wrong format).
UNSENDABLE_RECORD = (
    RecordTooLargeError,
    MessageSizeTooLargeError,
    InvalidMessageError,
    CorruptRecordException,
    UnsupportedForMessageFormatError,
)


class KafkaSink:
    """A topic, written with acks=all and the idempotent producer, exactly once.

    On the pipeline's own cluster (option `transactional`, default when `bootstrap` is unset or the
    pipeline's): one transaction per source partition's batch holds its records and the sender group's
    next offsets (`send_offsets_to_transaction`), so delivery and the input commit are one atomic step.
    Readers of the sink topic must use isolation_level=read_committed. aiokafka's TxnOffsetCommit is v0
    (no group generation, no KIP-447 fencing), so each source partition has its own transactional id
    `<group>.<topic>.<partition>`: a new owner's producer fences the old one and aborts its open
    transaction (or completes one already committing), then the group's committed offset says which
    records that owner already delivered. A transaction commits only once every record in it was acked,
    and only the offsets below the first event of the batch not yet delivered and below the partition's
    lowest dead letter not yet durable (`Source.commit_offset`, set by `SinkDelivery`): a kill must not
    leave an event in neither the sink nor the DLQ.
    On another cluster: per-record acks; a partial failure raises PartialDelivery so only the
    unacknowledged records are retried; an unretriable error renews the producer.
    """

    def __init__(self, config: SinkConfig, default_bootstrap: str, group_id: str | None = None) -> None:
        self.config = config
        self.topic = config.options["topic"]
        self.bootstrap = config.options.get("bootstrap") or default_bootstrap
        same_cluster = self.bootstrap == default_bootstrap
        self.transactional = bool(config.options.get("transactional", same_cluster)) and group_id is not None
        self.group_id = group_id
        self.producer: AIOKafkaProducer | None = None
        self.admin: AIOKafkaAdminClient | None = None
        self.txn_producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self.committed_at_fence: dict[TopicPartition, int] = {}  # group offset read after fencing
        self.pending: dict[str, asyncio.Future[Any]] = {}  # per idempotency key: records sent, not yet settled
        # The sink hears of no revocation: a source partition's producer unused this long is closed.
        self.producer_idle_s = 300.0
        self.used_at: dict[TopicPartition, float] = {}
        self.retirements = Retirements(f"kafka-sink-{config.name}")  # replaced producers, flushing their records

    async def start(self) -> None:
        self.producer = durable_producer(self.bootstrap, request_timeout_ms=int(self.config.timeout_s * 1000))
        await self.producer.start()
        if self.transactional:
            self.admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await self.admin.start()

    async def deliver_batch(self, events: list[Event], source: Source | None = None) -> None:
        if self.transactional and source is not None:
            await self._drop_idle_producers()
            await self._deliver_in_transaction(events, source)
        else:
            await self._deliver_acked(events)

    def _send(self, producer: AIOKafkaProducer, event: Event) -> Any:
        record = sink_record(self.config.name, event)
        return producer.send(
            self.topic,
            json.dumps(record, separators=(",", ":")).encode(),
            key=event.partition_key,
            headers=[("idempotency-key", record["idempotency_key"].encode())],
        )

    async def _deliver_acked(self, events: list[Event]) -> None:
        assert self.producer is not None
        futures: list[asyncio.Future[Any]] = []
        error: BaseException | None = None
        for event in events:
            key = idempotency_key(self.config.name, event)
            earlier = self.pending.get(key)
            if earlier is not None and (not earlier.done() or earlier.exception() is None):
                futures.append(earlier)  # still in flight (or acked) from an attempt that was cut: no second copy
                continue
            try:
                future = await self._send(self.producer, event)
            except KafkaError as exc:  # the rest was not even buffered; what was, may still be acked
                error = exc
                break
            self.pending[key] = future
            futures.append(future)
        if futures:
            # Bounded: the producer's own retries end within its delivery timeout; past this, a future that is
            # still open stays in `pending`, so the retry waits for it instead of sending another copy.
            await asyncio.wait(futures, timeout=3 * self.config.timeout_s)
        outcomes: list[BaseException | None] = []
        for event, future in zip(events, futures, strict=False):
            if not future.done():
                outcomes.append(TimeoutError("no ack within the sink's bound"))
                continue
            outcomes.append(future.exception())
            self.pending.pop(idempotency_key(self.config.name, event), None)
        delivered = [i for i, outcome in enumerate(outcomes) if outcome is None]
        failed = next((o for o in outcomes if o is not None), error)
        if failed is None:
            return
        message = f"kafka sink {self.config.name}: {len(delivered)}/{len(events)} acknowledged: {failed!r}"
        if any(
            isinstance(o, KafkaError) and not o.retriable and not isinstance(o, ProducerClosed)
            for o in (*outcomes, error)
            if o is not None
        ):
            # Unretriable errors break the idempotent producer's sequence for the partition: later records
            # would fail out of order forever. A fresh producer (new producer id) starts clean.
            await self._renew_producer()
        refused = next((o for o in (*outcomes, error) if isinstance(o, UNSENDABLE_RECORD)), None)
        if refused is not None:
            permanent = PermanentSinkError(f"kafka sink {self.config.name}: {self.topic} refused a record: {refused!r}")
            if delivered:
                raise PartialDelivery(message, delivered, permanent) from failed
            raise permanent from failed
        if delivered:
            raise PartialDelivery(message, delivered) from failed
        raise TransientError(message) from failed

    async def _renew_producer(self) -> None:
        """Swap in a started producer, then retire the old one in the background: its queued records are
        flushed and acked (a retry finds them in `pending` and waits rather than sending a second copy), and
        those it could no longer send fail with ProducerClosed, so their events are retried."""
        fresh = durable_producer(self.bootstrap, request_timeout_ms=int(self.config.timeout_s * 1000))
        await fresh.start()
        old, self.producer = self.producer, fresh
        if old is not None:
            self.retirements.add(old)

    async def _deliver_in_transaction(self, events: list[Event], source: Source) -> None:
        tp = TopicPartition(source.topic, source.partition)
        self.used_at[tp] = time.monotonic()
        try:
            producer = await self._transactional_producer(tp)
            # Below the committed offset: a previous owner's transaction delivered them already.
            first = self.committed_at_fence[tp]
            todo = [e for e, offset in zip(events, source.offsets, strict=True) if offset >= first]
            if not todo:
                return
            await producer.begin_transaction()
            futures = [await self._send(producer, event) for event in todo]
            # aiokafka does not abort a transaction whose produce failed: commit only if every record landed.
            await asyncio.wait(futures)
            errors = [f.exception() for f in futures]  # each retrieved: the later ones fail out of sequence
            failed = next((e for e in errors if e is not None), None)
            if failed is not None:
                raise failed
            commit_offset = max(source.offsets) + 1 if source.commit_offset is None else source.commit_offset
            await producer.send_offsets_to_transaction({tp: max(commit_offset, first)}, self.group_id)
            await producer.commit_transaction()
        except UNSENDABLE_RECORD as exc:
            await self._abort(tp)
            # The topic can never take this request's records: bisection isolates and dead-letters the culprit.
            raise PermanentSinkError(f"kafka sink {self.config.name}: {self.topic} refused a record: {exc!r}") from exc
        except (TimeoutError, KafkaError) as exc:
            # Outcome unknown (the commit may have landed): a fresh producer fences this one, aborts its open
            # transaction (or completes one already committing), and re-reads the committed offset.
            await self._abort(tp)
            raise TransientError(f"kafka sink {self.config.name}: transaction for {tp}: {exc!r}") from exc
        except BaseException:
            await self._drop_producer(tp)
            raise

    async def _abort(self, tp: TopicPartition) -> None:
        """Abort the open transaction if the producer still can, then drop the producer either way."""
        producer = self.txn_producers.get(tp)
        if producer is not None:
            try:
                await asyncio.wait_for(producer.abort_transaction(), self.config.timeout_s)
            except (KafkaError, TimeoutError, AssertionError):
                pass  # no open transaction, or the producer is broken: the next one fences and aborts it
        await self._drop_producer(tp)

    async def _transactional_producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        producer = self.txn_producers.get(tp)
        if producer is not None:
            return producer
        assert self.admin is not None and self.group_id is not None
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            transactional_id=f"{self.group_id}.{tp.topic}.{tp.partition}",
            enable_idempotence=True,
            acks="all",
            request_timeout_ms=int(self.config.timeout_s * 1000),
        )
        try:
            await producer.start()  # InitProducerId: fences an older owner, aborts its open transaction
            committed = await self._committed_offset(tp)
        except BaseException:
            await asyncio.wait_for(producer.stop(), 5.0)
            raise
        self.committed_at_fence[tp] = committed
        self.txn_producers[tp] = producer
        return producer

    async def _committed_offset(self, tp: TopicPartition) -> int:
        """The group's committed offset of `tp` (0 if never committed), as the coordinator verified it.

        aiokafka's `list_consumer_group_offsets` ignores OffsetFetch's top-level error (a coordinator moving or
        still loading): that answer read as "nothing committed", which switched the already-delivered filter
        off and let `send_offsets_to_transaction` move the commit back. Retried with backoff and jitter;
        still unknown after `COMMIT_FETCH_ATTEMPTS`, the batch fails as transient and is retried whole."""
        assert self.admin is not None and self.group_id is not None
        request = OffsetFetchRequest(self.group_id, [(tp.topic, [tp.partition])])
        error = ""
        for attempt in range(1, COMMIT_FETCH_ATTEMPTS + 1):
            try:
                coordinator = await self.admin.find_coordinator(self.group_id)
                response = await asyncio.wait_for(self.admin._send_request(request, coordinator), self.config.timeout_s)
            except (KafkaError, TimeoutError) as exc:
                error = repr(exc)
            else:
                code = getattr(response, "error_code", 0)  # top-level: v2+
                answers = [(p, o, c) for t, ps in response.topics if t == tp.topic for p, o, _m, c in ps]
                code = code or next((c for p, _o, c in answers if p == tp.partition), -1)
                if code == 0:
                    offset = next(o for p, o, _c in answers if p == tp.partition)
                    return offset if offset >= 0 else 0
                error = for_code(code).__name__ if code > 0 else "partition missing from the answer"
            if attempt < COMMIT_FETCH_ATTEMPTS:
                await asyncio.sleep(COMMIT_FETCH_BACKOFF.delay(attempt))
        raise TransientError(
            f"kafka sink {self.config.name}: committed offset of {tp} for group {self.group_id} unknown: {error}"
        )

    async def _drop_idle_producers(self) -> None:
        """Close the producers of source partitions this worker no longer delivers (most likely revoked)."""
        idle_since = time.monotonic() - self.producer_idle_s
        for tp in [tp for tp, used in self.used_at.items() if used < idle_since]:
            used = self.used_at.get(tp)
            if used is None or used >= idle_since:
                continue  # delivered to again (or dropped) while an earlier producer was closing
            self.used_at.pop(tp, None)
            await self._drop_producer(tp)

    async def _drop_producer(self, tp: TopicPartition) -> None:
        producer = self.txn_producers.pop(tp, None)
        self.committed_at_fence.pop(tp, None)
        if producer is not None:
            try:
                await asyncio.wait_for(retire(producer), 5.0)
            except (KafkaError, TimeoutError):  # fenced, or unreachable: the next producer with this id fences it
                await abandon(producer)  # its stop raised or was cut before its client closed

    async def probe(self) -> None:
        """Ask the cluster for its metadata: the brokers answer, and the sink topic exists."""
        assert self.producer is not None
        try:
            metadata = await asyncio.wait_for(self.producer.client.fetch_all_metadata(), self.config.timeout_s)
        except (KafkaError, TimeoutError) as exc:
            raise TransientError(f"kafka sink {self.config.name} probe: {exc!r}") from exc
        if metadata.partitions_for_topic(self.topic) is None:
            raise TransientError(f"kafka sink {self.config.name} probe: no topic {self.topic}")

    async def close(self) -> None:
        for tp in list(self.txn_producers):
            await self._drop_producer(tp)
        if self.admin is not None:
            await self.admin.close()
        await self.retirements.settle(self.config.timeout_s)  # one still flushing then is abandoned
        if self.producer is not None:
            await stop_or_abandon(self.producer, self.config.timeout_s)


# Check the idempotency key's marker and append in one atomic step: a pipeline cut midway and re-run
