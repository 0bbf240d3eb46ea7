"""One processing step, run the same way by every consuming service: consume -> handle -> publish -> ack
in order -> commit, and rebalance.

The stage reads its source topic with its own aiokafka consumer (group = the service's app id) on the
main loop, a fetched batch at a time. The commit sequence, per batch:
  1. decode each message once; undecodable ones become dead letters
  2. handle the decoded batch (the service's own logic, through `RetryingStep` in shared/handling.py:
     transient errors retried, an unexpected one isolated to its event) -> outputs, dead letters, and each
     record's outcome (out, dup, unrouted, delivered, ...); a partitioned table adds its changelog entries
  3. send outputs, dead letters, changelog entries and the batch's tally (shared/audit.py) to the producer,
     as one record batch per topic partition (`FlightSender` in shared/flight.py)
  4. once the broker acknowledged every one of them, mark the batch's offsets done
  5. commit done offsets: every `commit_interval_s`, before a rebalance gives partitions away, and on
     shutdown

Steps 1-3 of the next batch overlap step 4 of this one (up to `max_in_flight` batches); an acker
takes batches in order, so offsets are marked done in order and never pass what is durable.
A worker killed at any point has committed nothing it has not durably passed on; what it replays,
the deduplicator and the sinks' delivered ledger absorb.

Why not Faust's agents: Faust delivers events one by one through its conductor, channel and stream
(several µs of Python each, per event, per stage), runs its consumer in a second thread, and acks an
event whose agent raised. Reading a fetch at a time with aiokafka removes that per-event cost and
keeps the commit point here, where it can be read. Faust still runs each service: web views,
timers, lifecycle and signals.

Ownership: a batch is handled, retried, marked done and committed only while the assignment it was
fetched under holds (`Ownership`). The revoke callback (shared/rebalance.py) ends retry sleeps at once;
a batch between attempts is abandoned: only what already reached a destination (a sender's receipts and
ledger changelog) is published, its offsets are never marked, and the next owner handles it again. A
handler attempt still running after `revoke_grace_s` is cancelled, so the group never waits on a retry
loop; a batch's publish is not (it may carry a sink's ledger marks). A batch given up ends its
assignment: no later batch of it is marked done.

Steps 1-3 (the consume loop, `process_batch`) are in shared/intake.py and the rebalance callbacks in
shared/rebalance.py, both parts of StageRunner; this module keeps its wiring and steps 4 and 5.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import sentry_sdk
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from mode import Service

from shared.alerts import Alerter
from shared.dlq import DeadLetter
from shared.flight import FlightSender, InFlight
from shared.handling import RetryingStep
from shared.intake import BatchIntake
from shared.membership import (
    EXIT_INSTANCE_ID_TAKEN,
    UNKNOWN_MEMBER_ID,
    InstanceIdTaken,
    group_members,
    request_exit,
    requested_exit_code,
)
from shared.metrics import StageMetrics
from shared.publish import WARM_UP_S, BatchPublisher, Output, stop_or_abandon, warm_up
from shared.rebalance import RebalanceListener, Rebalancing
from shared.restore import StateRestorer
from shared.retry import Backoff
from shared.step import Handler, LocalState, Ownership, PartitionedState, Record, StandbyState, StepResult
from shared.watchdog import (
    METADATA_STUCK_AFTER_S,
    PartitionWatchdog,
    refresh_stale_leaders,
    restart_stuck_metadata_refresh,
)

# The names services and tests import from here: the step's contract and the exit code of a fenced worker.
__all__ = [
    "EXIT_INSTANCE_ID_TAKEN",
    "DeadLetter",
    "Handler",
    "InFlight",
    "Output",
    "Ownership",
    "PartitionedState",
    "Record",
    "StageRunner",
    "StepResult",
    "request_exit",
    "requested_exit_code",
]

log = logging.getLogger(__name__)


CHANGELOG_AT_STOP_S = 3.0  # a stop's publish of the stores' unsent changelog (the broker may be down)
WARM_LAG_RECORDS = 5  # changelog records a standby may be behind for the warm-up before a join to be done
WARM_UP_LOOKUP_S = 5.0  # looking up whether this worker's static membership is still in the group
WARM_UP_POLL_S = 0.05
HEARTBEAT_INTERVAL_MS = 250  # aiokafka's default is 3 s; 1 s measured about 1 s of stall per rebalance


class StageRunner(Rebalancing, BatchIntake, Service):
    """Runs one stage's handler over its source topic with the commit sequence above."""

    def __init__(
        self,
        app: Any,
        stage: str,
        handler: Handler,
        metrics: StageMetrics,
        dlq: str,
        source: str,
        batch_max: int = 1000,
        max_message_bytes: int = 1_048_576,
        backoff: Backoff | None = None,
        max_in_flight: int = 8,
        commit_interval_s: float = 1.0,
        states: Sequence[Any] = (),
        session_timeout_ms: int = 10_000,
        checkpoint_interval_s: float = 10.0,
        rebalance_timeout_ms: int = 30_000,
        revoke_grace_s: float = 5.0,
        unfetched_after_s: float = 10.0,
        metadata_stuck_after_s: float = METADATA_STUCK_AFTER_S,
        commits_offsets: bool = True,
        hold_dead_letters: Callable[[list[ConsumerRecord]], None] | None = None,  # type: ignore[type-arg]
        group_instance_id: str | None = None,
        leave_group_on_stop: bool | None = None,
        batch_linger_s: float = 0.0,
        standby_replicas: int = 1,
        warm_up_max_s: float = 60.0,
    ) -> None:
        super().__init__()
        self.app = app
        self.stage = stage
        self.metrics = metrics
        self.batch_max = batch_max
        self.max_message_bytes = max_message_bytes
        self.max_in_flight = max_in_flight
        self.commit_interval_s = commit_interval_s
        self.session_timeout_ms = session_timeout_ms
        self.checkpoint_interval_s = checkpoint_interval_s
        self.rebalance_timeout_ms = rebalance_timeout_ms
        # How long a revocation waits for the batch in hand to give up (an attempt in flight finishes,
        # e.g. a sink request up to its timeout) before cancelling it: the group waits on this.
        self.revoke_grace_s = revoke_grace_s
        # A partition read from for this long without one fetch answered gets its leader looked up again.
        self.unfetched_after_s = unfetched_after_s
        # A Kafka client's metadata refresh unfinished for this long is restarted (shared/watchdog.py, issue 15).
        self.metadata_stuck_after_s = metadata_stuck_after_s
        self.metadata_refresh_restarts = 0
        # False when the handler commits the group's offsets itself (a transactional Kafka sink, in its
        # transactions): a plain commit landing after a pending transactional one would move the group back.
        self.commits_offsets = commits_offsets
        # Told of the inputs the runner dead-letters itself, before the handler sees the rest: a handler that
        # commits offsets itself must not commit past them before they are durable (`done`).
        # Static membership (KIP-345): a worker back under the same name within the session timeout gets
        # its partitions again without a rebalance; None joins as a dynamic member.
        self.group_instance_id = group_instance_id
        # A static member removes itself after its drain (partitions move at once) or keeps them for its
        # restart; None: leave, unless the stage has state and no standby (a takeover would restore the whole window)
        # or the member is alone in its group.
        self.leave_group_on_stop = leave_group_on_stop
        # Fetch on for up to this long while a batch is short of `batch_max` (an archive wants few, large
        # objects); 0: hand each fetch over at once. Nothing is acked before its batch is handled.
        self.batch_linger_s = batch_linger_s
        # 1: each state also keeps warm copies of the partitions this worker does not own (shared/standby.py),
        # so a takeover replays the changelog's tail instead of the whole window; 0: none.
        self.standby_replicas = standby_replicas
        # A worker whose static membership left the group (a planned stop) brings its standbys up to the changelog's
        # end before it joins, for at most this long: the peer holding its partitions meanwhile keeps them moving,
        # and the rebalance that hands them back replays only what the peer wrote since (Kafka Streams' warm-up
        # replicas, KIP-441). 0: join at once.
        self.warm_up_max_s = warm_up_max_s
        self.warming = False  # bringing the standbys up before the join (for /ready)
        self.revocations = 0  # rebalances this worker took part in since it started (for /ready and tests)
        self.fenced: InstanceIdTaken | None = None  # another live process took this worker's instance id
        self.request_shutdown: Callable[[int], None] = request_exit  # tests replace it (no SIGTERM to pytest)
        self._member_id = UNKNOWN_MEMBER_ID  # the coordinator's id for this member at its last assignment
        self._suspended: set[int] = set()
        self._suspended_by = UNKNOWN_MEMBER_ID
        self._owned_generation = -1
        self._rejoin_held: asyncio.Future[None] | None = None  # a fenced member's rejoin, held until it stops
        self._rejoin_released = asyncio.Event()
        self._late_start: asyncio.Task[None] | None = None
        self.dlq = dlq
        self.source = source
        self.group = str(app.conf.id)
        self.bootstrap = ",".join(f"{u.host}:{u.port}" for u in app.conf.broker)
        # Members of the group find each other's web views by client id (the table browser's owner map).
        self.client_id = str(app.conf.canonical_url).rstrip("/")
        self.states: list[PartitionedState] = [s for s in states if isinstance(s, PartitionedState)]
        self.tallies: str | None = None  # the auditor's topic, set by `attach`
        # The topics its handler writes (set by `attach`, from the pipeline's layout): looked up, with their
        # leaders connected, before the join (`_warm_producer`).
        self.produces_to: list[str] = []
        self.bucket_s = 10
        self.broker_outage: Any = None
        self.watchdog: PartitionWatchdog | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.done: dict[TopicPartition, int] = {}  # next offset after the last durable batch
        self.committed: dict[TopicPartition, int] = {}
        self.last_timestamp: dict[TopicPartition, float] = {}  # Kafka timestamp (ms) of the last event read
        self.readable_since: dict[TopicPartition, float] = {}  # monotonic time a partition was resumed
        self.assigned: set[TopicPartition] = set()  # owned and restored: read from
        self.awaiting_commit: set[TopicPartition] = set()  # owned, paused until their commit is told (late start)
        self.alerter = Alerter(stage)  # pages (Sentry); shared with the watchdog and the broker outage clock
        self.joined = False
        self._holds_directories = False  # `on_start` got past `_hold_directories`: this process started for real
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._metadata_watch: asyncio.Task[None] | None = None
        self._in_flight: asyncio.Queue[InFlight] | None = None
        self._batch_lock: asyncio.Lock | None = None
        self._owner = Ownership(0)  # replaced at every revocation: a fetch returned before it is dropped
        self._handling: asyncio.Task[StepResult] | None = None  # the handler in hand, cancelled if it outlasts a revoke
        self.flights = FlightSender(self, self.states)  # the producer: sends batches, settles them in order
        self.restorer = StateRestorer(self, stage, source, self.states)
        self.step = RetryingStep(stage, handler, backoff or Backoff(), metrics.retries.labels(stage), hold_dead_letters)

    @property
    def handler(self) -> Handler:
        """The stage's own logic, called through `step` (retries, isolating the culprit)."""
        return self.step.handler

    @property
    def hold_dead_letters(self) -> Callable[[list[ConsumerRecord]], None] | None:  # type: ignore[type-arg]
        """Told of dead letters before they are durable. One reference, the step's: the runner's own dead
        letters and the step's culprits must reach the same hook, or a commit could pass a letter."""
        return self.step.hold_dead_letters

    @property
    def backoff(self) -> Backoff:
        """The retry backoff, the step's (one reference: see `hold_dead_letters`)."""
        return self.step.backoff

    @handler.setter
    def handler(self, handler: Handler) -> None:
        self.step.handler = handler

    @property
    def producer(self) -> AIOKafkaProducer | None:
        return self.flights.producer

    @producer.setter
    def producer(self, producer: AIOKafkaProducer | None) -> None:
        self.flights.producer = producer

    @property
    def publisher(self) -> BatchPublisher | None:
        return self.flights.publisher

    @publisher.setter
    def publisher(self, publisher: BatchPublisher | None) -> None:
        self.flights.publisher = publisher

    @property
    def restoring(self) -> set[TopicPartition]:
        """Owned partitions paused until their state is restored."""
        return self.restorer.restoring

    def attach(self, ctx: Any) -> StageRunner:
        """Run with the app (as its dependency), with the settings, views and watchdog `ctx.attach` wires."""
        return ctx.attach(self)  # type: ignore[no-any-return]

    def ready(self) -> dict[str, Any]:
        """For /ready: joined the group, every owned partition's commit known and its state restored."""
        return {
            "joined": self.joined and not self.restorer.restoring and not self.awaiting_commit,
            "warming": self.warming,
            "partitions": sorted(tp.partition for tp in self.assigned),
            "restoring": sorted(tp.partition for tp in self.restorer.restoring),
            "awaiting_commit": sorted(tp.partition for tp in self.awaiting_commit),
            "group_instance_id": self.group_instance_id,
            "revocations": self.revocations,
            # Warm copies of partitions this worker does not own: changelog records each is behind (None: unknown).
            "standby": {
                s.changelog_topic: {str(p): lag for p, lag in s.standby_lag().items()}
                for s in self.states
                if isinstance(s, StandbyState)
            },
            # Standby partitions whose store failed to open (their lag above: None), retried with backoff.
            "standby_errors": {
                s.changelog_topic: {str(p): error for p, error in s.standby_errors().items()}
                for s in self.states
                if isinstance(s, StandbyState) and s.standby_errors()
            },
        }

    # -- lifecycle -------------------------------------------------------------------------------------

    async def on_start(self) -> None:
        self._hold_directories()  # first: a second process on this data directory fails before it joins
        self._holds_directories = True
        self._in_flight = asyncio.Queue(maxsize=self.max_in_flight)
        self._batch_lock = asyncio.Lock()
        await self.flights.start()
        # The producer first: the standbys stop applying between their warm-up and the join, so nothing may sit there.
        await self._warm_producer()
        if not self._stopping:
            await self._warm_up_before_joining()
        if self._stopping:
            return  # SIGTERM during the warm-up (mode runs `on_stop` meanwhile and no `on_started` after): never join
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            group_instance_id=self.group_instance_id,
            client_id=self.client_id,
            enable_auto_commit=False,  # the acker decides what is done; `_commit` commits it
            auto_offset_reset="earliest",  # a new group, or offsets deleted by retention: start at the log start
            max_poll_records=self.batch_max,
            # A dead member's partitions wait this long (the broker's default session is 45 s); a static
            # member restarted sooner takes them back at once.
            session_timeout_ms=self.session_timeout_ms,
            # How soon a member hears of a rebalance (a peer left or joined): every member of the group
            # stalls until the last one rejoins, so a planned restart's rebalance costs about one interval.
            heartbeat_interval_ms=min(HEARTBEAT_INTERVAL_MS, self.session_timeout_ms // 3),
            rebalance_timeout_ms=self.rebalance_timeout_ms,
            # A batch retried for a long sink outage must not cost the worker its partitions: the
            # partition watchdog pages when a partition stops moving instead.
            max_poll_interval_ms=3_600_000,
        )
        self.consumer.subscribe([self.source], listener=RebalanceListener(self))
        await self.consumer.start()

    async def on_started(self) -> None:
        # After this runner's own dependencies (a sender's sink) have started; they stop after `on_stop`.
        self._tasks = [
            asyncio.create_task(self._guard(self._consume()), name=f"{self.stage}-consume"),
            asyncio.create_task(self._guard(self._ack_in_order()), name=f"{self.stage}-acker"),
            asyncio.create_task(self._guard(self._commit_every()), name=f"{self.stage}-committer"),
            asyncio.create_task(
                self._guard(refresh_stale_leaders(self, self.unfetched_after_s)), name=f"{self.stage}-leaders"
            ),
        ]
        # Apart from `_tasks`: it runs until the stop's flushes end (its own producer's and retiring ones), which
        # wait on the metadata refresh while a batch's partition has no known leader.
        self._metadata_watch = asyncio.create_task(
            self._guard(
                restart_stuck_metadata_refresh(
                    self.stage, self._kafka_clients, self.metadata_stuck_after_s, self._count_metadata_restart
                )
            ),
            name=f"{self.stage}-metadata",
        )
        if self.standby_replicas:
            for state in self.states:
                if isinstance(state, StandbyState):
                    state.start_standby(self._standby_held_back)
        if self.states:
            self._tasks.append(
                asyncio.create_task(
                    self._guard(self.restorer.checkpoint_every(lambda: self.checkpoint_interval_s)),
                    name=f"{self.stage}-checkpointer",
                )
            )

    def _standby_held_back(self) -> bool:
        """Held back until joined (but for the warm-up) and while owned partitions restore: before the first
        assignment it would open (a WAL replay after a kill -9) the very stores this worker is about to own."""
        return (not self.joined and not self.warming) or bool(self.restorer.restoring)

    async def _warm_up_before_joining(self) -> None:
        """After a planned stop (this worker's static membership left the group, so a peer holds its partitions),
        tail every changelog partition into the standby stores until each is at most `WARM_LAG_RECORDS` behind, or
        for `warm_up_max_s`, before joining: the handback then replays only the peer's last writes (before: 0.5 to
        0.7 s of restore after the rebalance, every partition handed back stalled meanwhile). A member still in
        the group (a kill -9, or a stop that kept its partitions) joins at once: its partitions wait for it; so does
        one whose group is empty (a first start, or every worker stopped): nobody would read them meanwhile."""
        standbys = [s for s in self.states if isinstance(s, StandbyState)]
        if not standbys or not self.standby_replicas or self.warm_up_max_s <= 0 or self.group_instance_id is None:
            return
        try:
            members = await asyncio.wait_for(group_members(self.bootstrap, self.group), WARM_UP_LOOKUP_S)
        except (KafkaError, OSError, TimeoutError) as exc:
            log.info("%s: could not look the group up (%r); joining without a warm-up", self.stage, exc)
            return
        if self._stopping:
            return  # stopped during the lookup: `on_stop` found no standby to stop, so none may start now
        if not members or any(instance_id == self.group_instance_id for _, instance_id in members):
            return  # nobody else reads the partitions meanwhile, or they wait for this member
        began = time.monotonic()
        self.warming = True
        try:
            for state in standbys:
                state.start_standby(self._standby_held_back)
            while not all(state.standby_warm(WARM_LAG_RECORDS) for state in standbys):
                if self._stopping:
                    return
                if time.monotonic() - began > self.warm_up_max_s:
                    log.warning("%s: standbys behind after %.0fs; joining anyway", self.stage, self.warm_up_max_s)
                    return
                await asyncio.sleep(WARM_UP_POLL_S)
        finally:
            self.warming = False
        log.info("%s: standbys warmed up in %.0f ms before joining", self.stage, (time.monotonic() - began) * 1000)

    async def _warm_producer(self) -> None:
        """Every topic this worker writes looked up and its leaders connected before it joins: the partitions
        a rebalance hands it move from its first batch, not after a metadata lookup per topic (issue 15)."""
        assert self.producer is not None
        changelogs = [state.changelog_topic for state in self.states]
        topics = [*self.produces_to, *([self.tallies] if self.tallies else []), self.dlq, *changelogs]
        began = time.monotonic()
        cold = await warm_up(self.producer, topics)
        if cold:
            log.warning("%s: joining with %s not looked up in %.0fs", self.stage, cold, WARM_UP_S)
        took_ms = (time.monotonic() - began) * 1e3
        log.info("%s: producer warmed for %d topics in %.0f ms", self.stage, len(topics), took_ms)

    def _kafka_clients(self) -> list[Any]:
        """This worker's Kafka clients whose metadata the watchdog keeps fresh: its consumer's, its producer's, and
        those of producers a renewal replaced, until they are closed (their flush waits on that refresh)."""
        clients = [self.consumer._client] if self.consumer is not None else []  # aiokafka: no public client
        producer = self.flights.producer
        return clients + ([producer.client] if producer is not None else []) + self.flights.retirements.clients()

    def _count_metadata_restart(self) -> None:
        self.metadata_refresh_restarts += 1

    async def on_stop(self) -> None:
        """SIGTERM: finish the batch in hand (give it up if it is retrying), wait for the broker's acks,
        commit, publish what the stores still hold for their changelog (a cut batch's ledger marks), leave the
        group (a static member only per `leave_group_on_stop`, and only if all of that finished)."""
        self._stopping = True
        if not self._holds_directories:
            # Refused at `_hold_directories` (StateDirInUse), mode stops it anyway: it started nothing, and its
            # instance id belongs to the live process on that directory, which a leave would remove.
            return
        self._owner.revoked.set()  # a batch retrying through an outage publishes what it delivered and stops
        held = sorted(tp.partition for tp in self.assigned | self.restorer.restoring if tp.topic == self.source)
        await self._cancel_late_start()  # first: a late start's round would begin a restore (`extend`)
        await self.restorer.cancel()
        consume = self._tasks[0] if self._tasks else None
        drained = False  # every batch durable and committed: only then may the member leave
        try:
            if consume is not None:
                await asyncio.wait_for(asyncio.shield(consume), 10.0)
            if self._in_flight is not None:
                await asyncio.wait_for(self._in_flight.join(), 8.0)
            if self.fenced is None:  # a fenced member's partitions are the other process's to commit
                await asyncio.wait_for(self._commit(), 3.0)
                drained = not self._uncommitted()
        except TimeoutError:  # e.g. the broker is down: nothing more can become durable anyway
            log.warning("%s: shutdown before every batch was durable and committed; the rest is replayed", self.stage)
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # a handler cancelled mid-batch has written its ledger marks to the stores by then
            await asyncio.wait(self._tasks, timeout=3.0)
        await self._publish_unsent_changelog()
        await self.flights.retirements.settle(3.0)  # one still flushing then is abandoned: its sender ended
        await self._release_held_rejoin()
        # A dynamic member leaves the group here (its partitions move at once); a static one sends no
        # LeaveGroup (aiokafka's `_maybe_leave_group`): `_leave_as_static_member` decides.
        if self.consumer is not None:
            try:
                await asyncio.wait_for(self.consumer.stop(), 3.0)
            except TimeoutError:
                log.warning("%s: its consumer did not close within 3 s", self.stage)
        if self.producer is not None:
            await stop_or_abandon(self.producer, 3.0)
        if self._metadata_watch is not None:  # last: it kept the flushes above going
            self._metadata_watch.cancel()
            await asyncio.gather(self._metadata_watch, return_exceptions=True)
        for state in self.states:
            if isinstance(state, StandbyState):  # stopped applying before any store closes
                await state.stop_standby()
        await self.restorer.cancel()  # an assignment that completed inside `consumer.stop()` began a restore
        held += [tp.partition for tp in self.assigned | self.restorer.restoring if tp.topic == self.source]
        closing = sorted(set(held) | self._suspended)  # and stores a revocation left open for an assignment
        self._suspended = set()
        for state in self.states:
            state.revoke(closing)
        for state in self.states:
            if isinstance(state, LocalState):
                state.release_directory()
        self._holds_directories = False
        await self._leave_as_static_member(drained)

    def _uncommitted(self) -> dict[TopicPartition, int]:
        """Done offsets of owned partitions that the group has not committed (a failed or skipped commit)."""
        if self.consumer is None or not self.commits_offsets:
            return {}
        owned = self.consumer.assignment()
        return {tp: o for tp, o in self.done.items() if tp in owned and self.committed.get(tp) != o}

    async def _publish_unsent_changelog(self) -> None:
        """Send what the stores still hold for their changelog (a sender's ledger marks of what a sink took in a
        batch the stop cut short), before `revoke` drops it: a peer taking the partitions over, from its standby
        or a restore, then skips that work. Bounded: with the broker down the marks stay in the local store only."""
        outputs = [out for state in self.states for out in state.changelog()]
        if not outputs or self.publisher is None:
            return
        flight = InFlight({}, StepResult(outputs=outputs), 0, time.perf_counter(), abandoned=True)

        async def publish() -> None:  # the send too: it waits for metadata while the broker is down
            await self.flights.settle(await self.flights.send(flight))

        try:
            await asyncio.wait_for(publish(), CHANGELOG_AT_STOP_S)
        except TimeoutError:
            log.error("%s: the stores' unsent changelog was not durable at the stop; a peer may redeliver", self.stage)

    def _hold_directories(self) -> None:
        """Lock each local state's directory for this process, or raise `StateDirInUse` holding none of them."""
        held: list[LocalState] = []
        try:
            for state in self.states:
                if isinstance(state, LocalState):
                    state.hold_directory()
                    held.append(state)
        except BaseException:
            for state in held:
                state.release_directory()
            raise

    async def _guard(self, loop: Awaitable[None]) -> None:
        """A loop that dies would leave the worker in its group reading nothing: fail loudly, drain, exit."""
        try:
            await loop
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.critical("%s: %s crashed; shutting the worker down", self.stage, asyncio.current_task(), exc_info=True)
            sentry_sdk.capture_exception(exc)
            os.kill(os.getpid(), signal.SIGTERM)

    # -- steps 4 and 5: ack in order, commit (steps 1-3, `_consume` and `process_batch`: shared/intake.py) --

    async def _ack_in_order(self) -> None:
        assert self._in_flight is not None
        produce = self.metrics.batch_phase.labels(self.stage, "produce")
        while True:
            flight = await self._in_flight.get()
            durable = await self.flights.settle(flight)
            owner = flight.owner
            if owner is not None and (flight.abandoned or not durable):
                owner.ended = True  # a later batch of it must not mark offsets past this one's
            if durable and not flight.abandoned and (owner is None or not owner.ended):
                self.done.update(flight.next_offsets)  # the commit point: everything below is durable
            produce.observe(time.perf_counter() - flight.sent_at)
            self._in_flight.task_done()

    async def _commit_every(self) -> None:
        while True:
            await asyncio.sleep(self.commit_interval_s)
            await self._commit()

    async def _commit(self) -> None:
        """Commit what the acker marked done; a failed commit only means a replay, which is absorbed."""
        if self.consumer is None or not self.commits_offsets:
            return
        owned = self.consumer.assignment()
        offsets = {tp: o for tp, o in self.done.items() if tp in owned and self.committed.get(tp) != o}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
            self.committed.update(offsets)
        except (KafkaError, AssertionError) as exc:  # a rebalance in progress, or the coordinator moving
            log.warning("%s: commit of %s failed (replayed if it stays lost): %r", self.stage, offsets, exc)
