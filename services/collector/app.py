"""collector: HTTP in, raw topic out. An event is reported accepted only once the broker has it.

POST /v1/events  headers: X-Api-Key (or Authorization: Bearer KEY), Content-Type json or msgpack
body: a list of events, or {"events": [...]}. Answer: {"accepted": [ids], "rejected": [{...}]}.

The request's checks (key, signature, body, rate) are in admission.py; here, its events' validation, and the
producer lanes that group concurrent requests' records into shared batches and answer each once acked.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from faust import web
from mode import Service

from services.collector.admission import Admission, signing_secrets
from services.collector.admission import RequestError as RequestError  # imported from here by tests
from shared.app import durable_producer
from shared.audit import accepted_tallies, bucket_of
from shared.codec import encode_event
from shared.errors import InvalidEvent
from shared.event import Event, EventValidator, now_ms
from shared.publish import (
    WARM_UP_S,
    BatchPublisher,
    Output,
    Published,
    Retirements,
    sender_died,
    start_replacement,
    warm_up,
)
from shared.ratelimit import TenantRateLimiter
from shared.retry import Backoff
from shared.service import ServiceContext
from shared.watchdog import METADATA_STUCK_AFTER_S, restart_stuck_metadata_refresh
from shared.web import add_common_views

log = logging.getLogger(__name__)

PRODUCE_TIMEOUT_S = 10.0
# After a replacement that did not start: at least 1 s, then full jitter up to 30 s, before the next try.
RENEW_BACKOFF = Backoff(base_s=1.0, ceiling_s=30.0)


Place = tuple[int, int] | BaseException  # where the broker wrote a record (partition, offset), or why it did not
Queued = tuple[list[Output], "asyncio.Future[list[Place]]"]


class Collector(Admission):
    """Admits a request (`Admission`), validates and encodes its events, and answers once the broker has them."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.validator = EventValidator(ctx.config.limits)
        self.raw_topic = ctx.topics.raw
        self.tallies_topic = ctx.topics.tallies
        self.keys = {h: t.name for t in ctx.config.tenants.values() for h in t.api_key_hashes}
        self.secrets = signing_secrets(ctx.config)
        self.publisher: BatchPublisher | None = None  # set by CollectorProducer once its producer started
        self.stopping = False  # set by CollectorProducer's stop: a renewal finishing after it installs nothing
        self._renewing = asyncio.Lock()
        self._failed_renewals = 0
        self._renew_not_before = 0.0  # loop time: a replacement that did not start is not retried before then
        self.retirements = Retirements("collector")  # replaced producers flushing before their stop: still watched
        self._events = Lane("collector-publish")
        self._tallies = Lane("collector-tally")  # apart: a slow tallies partition must not hold the events
        self._settling: set[asyncio.Task[None]] = set()
        self._tallying: set[asyncio.Task[None]] = set()
        self.limiter = (
            TenantRateLimiter(ctx.settings.redis_url, ctx.settings.namespace)
            if any(t.rate_limit for t in ctx.config.tenants.values())
            else None
        )

    async def ingest(
        self, tenant: str, items: list[Any], user_agent: str | None, ip: str | None
    ) -> tuple[int, dict[str, Any]]:
        metrics = self.ctx.metrics
        accepted: list[str] = []
        ingest_ts = now_ms()
        events, outputs, rejected = build_records(
            self.validator, self.raw_topic, tenant, items, user_agent, ip, ingest_ts
        )
        for refused in rejected:
            metrics.rejected.labels(tenant, refused["reason"]).inc()
        unavailable = 0
        written: list[list[Any]] = []  # [event_id, partition, offset] of each accepted event, for `hifi trace`
        if events:
            # Record batches per partition shared with concurrent requests (not a `send` per record); 200
            # only once every record's batch was acked.
            places = await self._publish(outputs, self._events)
            for (index, event), place in zip(events, places, strict=True):
                if isinstance(place, BaseException):
                    unavailable += 1
                    rejected.append(
                        {
                            "index": index,
                            "event_id": event.event_id,
                            "reason": "broker_unavailable" if _broker_error(place) else "internal_error",
                            "detail": type(place).__name__,
                        }
                    )
                else:
                    accepted.append(event.event_id)
                    written.append([event.event_id, *place])
        metrics.accepted.labels(tenant).inc(len(accepted))
        if accepted:
            self._tally_later(tenant, ingest_ts, written)
        rejected.sort(key=lambda r: r["index"])
        body = {"accepted": accepted, "rejected": rejected}
        if unavailable:
            return 503, body
        if not accepted:
            return 422, body
        return 200, body

    async def _publish(self, outputs: list[Output], lane: Lane) -> list[Place]:
        """Each output's (partition, offset) once the broker acked its batch, or why it was not.

        Concurrent requests go out together: while one group's batches wait for their partitions' previous
        batches to drain (the idempotent producer has one in flight per partition), the next requests queue
        and then share one record batch per partition. A batch per request instead queued each request
        behind the last, one broker round trip apiece, and saturated the collector at 2,000 events/s.
        """
        done: asyncio.Future[list[Place]] = asyncio.get_running_loop().create_future()
        lane.queued.append((outputs, done))
        if lane.flusher is None or lane.flusher.done():
            lane.flusher = asyncio.create_task(self._flush_queued(lane), name=lane.name)
        return await asyncio.shield(done)  # a request that gives up must not cancel the others of its group

    async def _flush_queued(self, lane: Lane) -> None:
        loop = asyncio.get_running_loop()
        while lane.queued:
            group, lane.queued = lane.queued, []
            deadline = loop.time() + PRODUCE_TIMEOUT_S
            publisher = self.publisher
            published = Published([], [])  # filled batch by batch: what went is kept if a later batch fails
            unsent: BaseException | None = None
            try:
                if publisher is None:
                    raise ConnectionError("the collector's producer has not started")
                async with asyncio.timeout_at(deadline):
                    await publisher.publish([output for part, _ in group for output in part], into=published)
            except (KafkaError, TimeoutError, ConnectionError) as exc:  # the batches not handed over yet
                unsent = exc
            except Exception as exc:  # a bug: its group is answered all the same, and the next group goes
                log.exception("collector: handing a group of %d requests to the producer failed", len(group))
                unsent = exc
            task = asyncio.create_task(
                self._settle(publisher, group, published, unsent, deadline), name="collector-acks"
            )
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _settle(
        self,
        publisher: BatchPublisher | None,
        group: list[Queued],
        published: Published,
        unsent: BaseException | None,
        deadline: float,
    ) -> None:
        """Answer each request of a group once its own records' batches were acked (or failed, or the deadline
        passed), then see the rest of the group's batches out: a failed one renews the producer."""
        try:
            await _answer_as_acked(group, published, unsent, deadline)
        except Exception as exc:  # a bug: no request may wait forever on an unset future
            log.exception("collector: answering a group of %d requests failed", len(group))
            for outputs, done in group:
                if not done.done():
                    done.set_result([exc] * len(outputs))
        # Still in flight after the answer (its client re-sends; dedupe drops a copy): settled here, so its
        # failure renews the producer and no exception goes unretrieved.
        outcomes = await asyncio.gather(*published.futures, return_exceptions=True)
        failed = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failed is None and publisher is not None and unsent is not None and sender_died(publisher.producer):
            # aiokafka fails every later send at once, with no batch to fail: only a renewal ends that.
            failed = unsent
        if failed is not None and publisher is not None:
            await self._renew(publisher, failed)

    async def _renew(self, failed: BatchPublisher, error: BaseException) -> None:
        """A fresh idempotent producer after a batch failed: aiokafka does not rewind the old one's sequence
        numbers, so its next batches to that partition could be refused for ever. The client re-sends.

        Installed only once started and warmed (within `WARM_UP_S`; the failed one serves meanwhile), and only if
        it knows the raw topic: one that cannot look that up could not write to it either. Otherwise it is stopped
        and the failed one kept; a later failed group tries again after a backoff. A stop that lands meanwhile
        gets nothing installed.
        """
        loop = asyncio.get_running_loop()
        async with self._renewing:
            if self.publisher is not failed or self.stopping or loop.time() < self._renew_not_before:
                return  # renewed already, stopping, or backing off after a refused replacement
            log.warning("collector: replacing the producer after %r", error)
            producer = durable_producer(self.ctx.settings.broker, "hifi-collector")
            try:
                why_not = await self._start_replacement(producer)
            except BaseException:  # cancelled (a stop outlasting its grace): nobody else would stop it
                await producer.stop()
                raise
            if why_not is None and self.stopping:
                why_not = "the collector is stopping"
            if why_not is not None:
                await producer.stop()
                self._failed_renewals += 1
                self._renew_not_before = loop.time() + RENEW_BACKOFF.base_s + RENEW_BACKOFF.delay(self._failed_renewals)
                log.warning("collector: keeping the old producer: the replacement %s", why_not)
                return
            self._failed_renewals = 0
            self.publisher = BatchPublisher(producer)
        self.retirements.add(failed.producer)

    async def _start_replacement(self, producer: AIOKafkaProducer) -> str | None:
        """None once `producer` is started, warmed and knows the raw topic; else why not."""
        if (refused := await start_replacement(producer)) is not None:
            return f"did not start: {refused!r}"
        cold = await warm_up(producer, self.ctx.output_topics)
        if self.raw_topic in cold:
            return f"did not look up {self.raw_topic} in {WARM_UP_S:.0f}s"
        if cold:  # the tallies are best effort, as at the start
            log.warning("collector: the replacement producer has not looked up %s", cold)
        return None

    def kafka_clients(self) -> list[Any]:
        """The clients whose metadata refresh the watchdog keeps going: the current producer's and those of
        producers being retired."""
        current = [self.publisher.producer.client] if self.publisher is not None else []
        return [*current, *self.retirements.clients()]

    def _tally_later(self, tenant: str, ingest_ts: float, written: list[list[Any]]) -> None:
        """Tally without holding the answer: the events are durable whatever becomes of their tally."""
        task = asyncio.create_task(self._tally(tenant, ingest_ts, written), name="collector-tally")
        self._tallying.add(task)
        task.add_done_callback(self._tallying.discard)

    async def _tally(self, tenant: str, ingest_ts: float, written: list[list[Any]]) -> None:
        """Tell the auditor's ledger how many events were accepted, and where each was written (for
        `hifi trace`). Best effort, on its own lane (a slow tallies partition never holds the events' groups):
        a missing tally shows up as a surplus downstream, never as a false loss."""
        bucket = bucket_of(ingest_ts, self.ctx.config.audit.bucket_s)
        count = len(written)
        where = {"topic": self.raw_topic, "ingest_ts": ingest_ts, "events": written}
        try:
            values = accepted_tallies("collector", tenant, bucket, count, where)  # split under Kafka's request size
            places = await self._publish(
                [Output(self.tallies_topic, b"collector", value) for value in values], self._tallies
            )
            failed = next((p for p in places if isinstance(p, BaseException)), None)
        except Exception as exc:
            failed = exc
        if failed is not None:
            log.warning("collector: could not publish the accepted tally (%d of %s): %r", count, tenant, failed)

    async def settled(self, timeout: float | None = None) -> None:
        """Wait for the groups, tallies and producer replacements and retirements under way (on stop); cancel
        what outlasts `timeout`."""
        lanes = [lane.flusher for lane in (self._events, self._tallies) if lane.flusher is not None]
        tasks = {*lanes, *self._settling, *self._tallying, *self.retirements.tasks}
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=timeout)
        if late:
            log.warning("collector: %d tasks outlasted the stop's %.0fs; cancelling them", len(late), timeout or 0)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)


@dataclass(slots=True)
class Lane:
    """Requests' records waiting for the next group, and the task that hands groups over, one at a time."""

    name: str
    queued: list[Queued] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None


async def _answer_as_acked(
    group: list[Queued], published: Published, unsent: BaseException | None, deadline: float
) -> None:
    """Answer each request as soon as every batch holding one of its records is settled; at the deadline,
    answer the rest: a record whose batch is still unacked fails with TimeoutError (maybe written: the client
    re-sends, dedupe drops a copy), one whose batch was never handed over fails with `unsent`."""
    futures = published.futures
    placed = published.placed
    loop = asyncio.get_running_loop()

    def batch_of(index: int) -> int | None:  # None: never handed over
        if index >= len(placed) or placed[index][0] >= len(futures):
            return None
        return placed[index][0]

    def place_of(index: int) -> Place:
        batch = batch_of(index)
        if batch is None:
            return unsent if unsent is not None else ConnectionError("not handed to the producer")
        future = futures[batch]
        if not future.done():
            return TimeoutError(f"the broker did not acknowledge in {PRODUCE_TIMEOUT_S:g}s")
        if future.cancelled():
            return asyncio.CancelledError()
        error = future.exception()
        if error is not None:
            return error
        meta = future.result()
        return meta.partition, meta.offset + placed[index][1]

    waiting: list[tuple[int, int, asyncio.Future[list[Place]], set[int]]] = []  # start, count, done, batches
    start = 0
    for outputs, done in group:
        batches = {b for i in range(start, start + len(outputs)) if (b := batch_of(i)) is not None}
        waiting.append((start, len(outputs), done, batches))
        start += len(outputs)
    while waiting:
        still: list[tuple[int, int, asyncio.Future[list[Place]], set[int]]] = []
        for request in waiting:
            first, count, done, batches = request
            if all(futures[b].done() for b in batches):
                if not done.done():
                    done.set_result([place_of(i) for i in range(first, first + count)])
            else:
                still.append(request)
        waiting = still
        remaining = deadline - loop.time()
        if not waiting or remaining <= 0:
            break
        unacked = {futures[b] for _, _, _, batches in waiting for b in batches if not futures[b].done()}
        await asyncio.wait(unacked, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
    for first, count, done, _ in waiting:
        if not done.done():
            done.set_result([place_of(i) for i in range(first, first + count)])


async def warm_producer(producer: AIOKafkaProducer, ctx: ServiceContext) -> None:
    """The raw and tallies topics looked up and their leaders connected before the collector says it is ready:
    the first requests after a restart are not held up by metadata lookups (issue 15; a renewal warms its
    replacement in `Collector._start_replacement`)."""
    cold = await warm_up(producer, ctx.output_topics)
    if cold:
        log.warning("collector: ready with %s not looked up in %.0fs", cold, WARM_UP_S)


class CollectorProducer(Service):
    """The collector's idempotent producer (acks=all): started with the app, flushed and stopped with it. Its
    metadata refresh is watched as the stages' are (`restart_stuck_metadata_refresh`): a wedged one failed every
    request whose partition's leader had moved, until a client's re-send reached a renewed producer."""

    def __init__(
        self,
        collector: Collector,
        metadata_stuck_after_s: float = METADATA_STUCK_AFTER_S,
        stop_grace_s: float = 2 * PRODUCE_TIMEOUT_S,
    ) -> None:
        super().__init__()
        self.collector = collector
        self.metadata_stuck_after_s = metadata_stuck_after_s
        self.stop_grace_s = stop_grace_s  # for the flushes and answers under way at a stop
        self._watchdog: asyncio.Task[None] | None = None

    async def on_start(self) -> None:
        self.collector.stopping = False  # a restarted service (mode's `restart`) renews again
        producer = durable_producer(self.collector.ctx.settings.broker, "hifi-collector")
        try:
            await producer.start()
            await warm_producer(producer, self.collector.ctx)
        except BaseException:  # cancelled by a stop: nothing else holds the producer to stop it
            await producer.stop()
            raise
        if self.should_stop:  # stopped while warming: `on_stop` found no publisher to retire
            await producer.stop()
            return
        self.collector.publisher = BatchPublisher(producer)
        self._watchdog = asyncio.create_task(
            restart_stuck_metadata_refresh("collector", self.collector.kafka_clients, self.metadata_stuck_after_s),
            name="collector-metadata",
        )

    async def on_stop(self) -> None:
        self.collector.stopping = True
        publisher, self.collector.publisher = self.collector.publisher, None
        if publisher is not None:
            self.collector.retirements.add(publisher.producer)
        await self.collector.settled(timeout=self.stop_grace_s)
        if self._watchdog is not None:  # last: it keeps the retiring producers' refresh going while they flush
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)


def build_records(
    validator: EventValidator,
    topic: str,
    tenant: str,
    items: list[Any],
    user_agent: str | None,
    ip: str | None,
    ingest_ts: float,
) -> tuple[list[tuple[int, Event]], list[Output], list[dict[str, Any]]]:
    """A request's valid events (with their index), each one's record for `topic` in the same order, and the
    per-event rejections: the collector's work between the parsed body and the producer."""
    events: list[tuple[int, Event]] = []
    outputs: list[Output] = []
    rejected: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        try:
            event = validator.validate(item, tenant)
        except InvalidEvent as exc:
            rejected.append({"index": index, "event_id": exc.event_id, "reason": exc.reason, "detail": exc.detail})
            continue
        if user_agent and "user_agent" not in event.context:
            event.context["user_agent"] = user_agent
        if ip and "ip" not in event.context:
            event.context["ip"] = ip
        event.ingest_ts = ingest_ts
        event.stamp("collector")
        try:  # what validate() did not see (a header put into the context) must not fail the whole request
            encoded = encode_event(event)
        except (UnicodeError, ValueError, TypeError, OverflowError) as exc:
            log.warning("collector: could not encode event %r of %s: %r", event.event_id, tenant, exc)
            rejected.append(
                {"index": index, "event_id": event.event_id, "reason": "unencodable", "detail": str(exc)[:200]}
            )
            continue
        events.append((index, event))
        outputs.append(Output(topic, event.partition_key, encoded))
    return events, outputs, rejected


def _broker_error(error: BaseException) -> bool:
    return isinstance(error, KafkaError | TimeoutError | ConnectionError)


def build(ctx: ServiceContext) -> Any:
    app = ctx.create_app()
    collector = Collector(ctx)
    app.add_dependency(CollectorProducer(collector))
    max_body = ctx.config.limits.max_body_bytes

    @app.page("/v1/events")
    class Events(web.View):
        async def post(self, request: web.Request) -> web.Response:
            status, answer, headers = await collector.respond(request, max_body)
            return self.json(answer, status=status, headers=headers)

    def stats() -> dict[str, Any]:
        m = ctx.metrics
        return {"accepted": m.total(m.accepted), "rejected": m.total(m.rejected)}

    # Ready once its producer is started and warmed (`producing`): a guard, as mode starts the web server after it.
    add_common_views(
        app, "collector", ctx.metrics, stats, ctx.settings, ready=lambda: {"producing": collector.publisher is not None}
    )
    return app
