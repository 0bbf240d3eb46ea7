"""One processing step, run the same way by every consuming service.

The stage reads its source topic with its own aiokafka consumer (group = the service's app id) on the
main loop, a fetched batch at a time. The commit sequence, per batch:
  1. decode each message once; undecodable ones become dead letters
  2. handle the decoded batch (the service's own logic) -> outputs, dead letters, and each record's
     outcome (out, dup, unrouted, delivered, ...); a partitioned table adds its changelog entries
  3. send outputs, dead letters, changelog entries and the batch's tally (counts per tenant,
     event-time bucket and outcome, for the auditor's loss ledger) to the producer, as one record
     batch per topic partition (`BatchPublisher` in shared/publish.py: a quarter of the CPU of one
     `send` per record)
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

A handler never lets an exception escape: transient errors are retried with backoff, a batch that
fails for an unexpected reason is split so only the bad events dead-letter. A record the broker can
never take (over `max.message.bytes`, refused as corrupt) is dead-lettered by the acker, truncated with
its sha256 if the DLQ topic refuses it too, and the idempotent producer is renewed (aiokafka does not
rewind its sequence numbers after such a failure).

Ownership: a batch is handled, retried, marked done and committed only while the assignment it was
fetched under holds (`Ownership`; aiokafka rebalances eagerly, so every rebalance revokes every
partition). The revoke callback ends retry sleeps at once; a batch between attempts is abandoned:
only what already reached a destination (a sender's receipts and ledger changelog) is published, its
offsets are never marked, and the next owner handles it again. A handler attempt still running after
`revoke_grace_s` is cancelled, so the group never waits on a retry loop; a batch's publish is not
(it may carry a sink's ledger marks), and a batch carrying a store's changelog is re-sent until durable
even after its partitions moved. Every wait of the revoke callback shares one budget under
`rebalance_timeout_ms`. A batch given up ends its assignment: no later batch of it is marked done.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sentry_sdk
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, OutOfOrderSequenceNumber, UnknownError
from aiokafka.structs import ConsumerRecord
from mode import Service

from shared.app import durable_producer
from shared.audit import batch_tallies
from shared.codec import decode_event, unpack
from shared.dlq import DeadLetter, UnsendableDeadLetter, letter_of_output, letter_output, truncated_letter
from shared.errors import HandledInPart, InvalidEvent, PermanentSinkError, TransientError
from shared.membership import (
    UNKNOWN_MEMBER_ID,
    InstanceIdTaken,
    MemberRemovalFailed,
    fenced,
    members_with_instance_id,
    remove_static_members,
)
from shared.metrics import StageMetrics
from shared.publish import TOO_LARGE, BatchPublisher, Output, Published, retire, transient, unsendable
from shared.retry import Backoff
from shared.step import Handler, Ownership, PartitionedState, Record, StepResult

# The names services and tests import from here: the step's contract.
__all__ = ["DeadLetter", "Handler", "Output", "PartitionedState", "Record", "StageRunner", "StepResult"]

log = logging.getLogger(__name__)

EXIT_INSTANCE_ID_TAKEN = 78  # EX_CONFIG: two workers configured with one id; restarting one does not fix it
_requested_exit_code = 0


def request_exit(code: int) -> None:
    """Drain and exit the worker process with `code` (non-zero: its supervisor or Kubernetes sees a failure)."""
    global _requested_exit_code
    _requested_exit_code = _requested_exit_code or code
    os.kill(os.getpid(), signal.SIGTERM)


def requested_exit_code() -> int:
    """The exit code a stage asked for (`request_exit`), 0 if none: `shared.service.run` exits with it."""
    return _requested_exit_code


# A restore that meets a broker outage retries this many times (about a minute) before stopping the worker.
RESTORE_ATTEMPTS = 10
# Re-sends of a revoked batch's store changelog (ledger marks of what a sink took) before the acker moves on;
# with the 5 s backoff ceiling about half a minute, so a topic that refuses for good cannot wedge the worker.
REVOKED_RESEND_ATTEMPTS = 12
REVOKE_RESERVE_S = 3.0  # of the revoke budget, kept after a cancelled handler for its publish and the commit
BROKER_BACKOFF = Backoff(0.5, 10.0)


@dataclass
class InFlight:
    """A handled batch whose outputs were sent; its offsets are done once they are durable."""

    next_offsets: dict[TopicPartition, int]
    result: StepResult
    outputs: int
    sent_at: float
    published: Published | None = None
    send_error: Exception | None = None
    records: list[Output] = field(default_factory=list)  # what was sent: the outputs, then the dead letters
    sent_with: BatchPublisher | None = None
    owner: Ownership | None = None
    # Given up at a revocation: only work already done elsewhere (a sink's acked part: receipts, ledger
    # changelog) is published, its offsets are never marked done, and the next owner handles it again.
    abandoned: bool = False
    inputs: list[Record] = field(default_factory=list)  # the decoded batch: a refused output's letter names its input


class StageRunner(Service):
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
        commits_offsets: bool = True,
        hold_dead_letters: Callable[[list[ConsumerRecord]], None] | None = None,  # type: ignore[type-arg]
        group_instance_id: str | None = None,
        leave_group_on_stop: bool | None = None,
    ) -> None:
        super().__init__()
        self.app = app
        self.stage = stage
        self.handler = handler
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
        # False when the handler commits the group's offsets itself (a transactional Kafka sink, in its
        # transactions): a plain commit landing after a pending transactional one would move the group back.
        self.commits_offsets = commits_offsets
        # Told of the inputs the runner dead-letters itself, before the handler sees the rest: a handler that
        # commits offsets itself must not commit past them before they are durable (`done`).
        self.hold_dead_letters = hold_dead_letters
        # Static membership (KIP-345): a worker back under the same name within the session timeout gets
        # its partitions again without a rebalance; None joins as a dynamic member.
        self.group_instance_id = group_instance_id
        # A static member removes itself after its drain (partitions move at once) or keeps them for its
        # restart; None: only a stage without state leaves (a takeover would restore the store elsewhere).
        self.leave_group_on_stop = leave_group_on_stop
        self.revocations = 0  # rebalances this worker took part in since it started (for /ready and tests)
        self.fenced: InstanceIdTaken | None = None  # another live process took this worker's instance id
        self.request_shutdown: Callable[[int], None] = request_exit  # tests replace it (no SIGTERM to pytest)
        self._member_id = UNKNOWN_MEMBER_ID  # the coordinator's id for this member at its last assignment
        self._rejoin_held: asyncio.Future[None] | None = None  # a fenced member's rejoin, held until it stops
        self._rejoin_released = asyncio.Event()
        self.backoff = backoff or Backoff()
        self.dlq = dlq
        self.source = source
        self.group = str(app.conf.id)
        self.bootstrap = ",".join(f"{u.host}:{u.port}" for u in app.conf.broker)
        # Members of the group find each other's web views by client id (the table browser's owner map).
        self.client_id = str(app.conf.canonical_url).rstrip("/")
        self.states: list[PartitionedState] = [s for s in states if isinstance(s, PartitionedState)]
        self._state_of_changelog = {s.changelog_topic: s for s in self.states}
        self.tallies: str | None = None  # the auditor's topic, set by `attach`
        self.bucket_s = 10
        self.broker_outage: Any = None
        self.watchdog: PartitionWatchdog | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.publisher: BatchPublisher | None = None
        self.done: dict[TopicPartition, int] = {}  # next offset after the last durable batch
        self.committed: dict[TopicPartition, int] = {}
        self.last_timestamp: dict[TopicPartition, float] = {}  # Kafka timestamp (ms) of the last event read
        self.readable_since: dict[TopicPartition, float] = {}  # monotonic time a partition was resumed
        self.assigned: set[TopicPartition] = set()  # owned and restored: read from
        self.restoring: set[TopicPartition] = set()  # owned, paused until their state is restored
        self._restore_task: asyncio.Task[None] | None = None
        self.joined = False
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight: asyncio.Queue[InFlight] | None = None
        self._batch_lock: asyncio.Lock | None = None
        self._owner = Ownership(0)  # replaced at every revocation: a fetch returned before it is dropped
        self._retiring: set[asyncio.Task[None]] = set()  # producers replaced by `_renew_producer`, closing
        self._handling: asyncio.Task[StepResult] | None = None  # the handler in hand, cancelled if it outlasts a revoke

    def attach(self, ctx: Any) -> StageRunner:
        """Run with the app (as its dependency), and register the stage's views and watchdog."""
        from shared.alerts import Alerter, OutageClock
        from shared.dlq import DeadLetterQueues
        from shared.web import add_dlq_views

        queues = DeadLetterQueues(self.bootstrap, ctx.topics, list(ctx.config.sinks))
        add_dlq_views(self.app, self.stage, queues, ctx.settings)
        audit = ctx.config.audit
        self.checkpoint_interval_s = ctx.settings.table_checkpoint_s
        self.tallies = ctx.topics.tallies
        self.bucket_s = audit.bucket_s
        if self.group_instance_id is None and ctx.settings.worker_id:
            self.group_instance_id = ctx.settings.worker_id
        self.session_timeout_ms = int(ctx.settings.session_timeout_s * 1000)
        if self.leave_group_on_stop is None and ctx.settings.leave_group_on_stop != "auto":
            self.leave_group_on_stop = ctx.settings.leave_group_on_stop == "yes"
        alerter = Alerter(self.stage)
        self.broker_outage = OutageClock(alerter, "broker_unreachable", "the Kafka broker", audit.outage_alert_after_s)
        self.watchdog = PartitionWatchdog(self, self.metrics, alerter, audit.stuck_after_s)
        self.app.timer(min(5.0, audit.stuck_after_s / 2))(self.watchdog.check)
        watchdog = self.watchdog

        @self.app.page("/partitions")
        async def partitions(view: Any, request: Any) -> Any:
            """Consumer lag and progress per partition this worker owns, and the watchdog's rejoins."""
            from shared.web import denied

            refused = denied(view, request, ctx.settings)
            return refused or view.json(
                {"stage": self.stage, "partitions": watchdog.partitions, "rejoins": watchdog.rejoins}
            )

        self.app.add_dependency(self)
        return self

    def ready(self) -> dict[str, Any]:
        """For /ready: joined the group and restored every owned partition's state."""
        return {
            "joined": self.joined and not self.restoring,
            "partitions": sorted(tp.partition for tp in self.assigned),
            "restoring": sorted(tp.partition for tp in self.restoring),
            "group_instance_id": self.group_instance_id,
            "revocations": self.revocations,
        }

    # -- lifecycle ---------------------------------------------------------------------------------

    async def on_start(self) -> None:
        self._in_flight = asyncio.Queue(maxsize=self.max_in_flight)
        self._batch_lock = asyncio.Lock()
        self.producer = durable_producer(self.bootstrap, self.client_id)
        await self.producer.start()
        self.publisher = BatchPublisher(self.producer)
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
            heartbeat_interval_ms=min(1_000, self.session_timeout_ms // 3),
            rebalance_timeout_ms=self.rebalance_timeout_ms,
            # A batch retried for a long sink outage must not cost the worker its partitions: the
            # partition watchdog pages when a partition stops moving instead.
            max_poll_interval_ms=3_600_000,
        )
        self.consumer.subscribe([self.source], listener=_Rebalance(self))
        await self.consumer.start()

    async def on_started(self) -> None:
        # After this runner's own dependencies (a sender's sink) have started; they stop after `on_stop`.
        self._tasks = [
            asyncio.create_task(self._guard(self._consume()), name=f"{self.stage}-consume"),
            asyncio.create_task(self._guard(self._ack_in_order()), name=f"{self.stage}-acker"),
            asyncio.create_task(self._guard(self._commit_every()), name=f"{self.stage}-committer"),
            asyncio.create_task(self._guard(self._refresh_stale_leaders()), name=f"{self.stage}-leaders"),
        ]
        if self.states:
            self._tasks.append(
                asyncio.create_task(self._guard(self._checkpoint_every()), name=f"{self.stage}-checkpointer")
            )

    async def on_stop(self) -> None:
        """SIGTERM: finish the batch in hand (give it up if it is retrying), wait for the broker's acks,
        commit, leave the group (a static member only per `leave_group_on_stop`)."""
        self._stopping = True
        self._owner.revoked.set()  # a batch retrying through an outage publishes what it delivered and stops
        held = sorted(tp.partition for tp in self.assigned | self.restoring if tp.topic == self.source)
        await self._cancel_restore()
        consume = self._tasks[0] if self._tasks else None
        try:
            if consume is not None:
                await asyncio.wait_for(asyncio.shield(consume), 10.0)
            if self._in_flight is not None:
                await asyncio.wait_for(self._in_flight.join(), 8.0)
            if self.fenced is None:  # a fenced member's partitions are the other process's to commit
                await asyncio.wait_for(self._commit(), 3.0)
        except TimeoutError:  # e.g. the broker is down: nothing more can become durable anyway
            log.warning("%s: shutdown before every batch was durable and committed; the rest is replayed", self.stage)
        for task in self._tasks:
            task.cancel()
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=3.0)
        await self._release_held_rejoin()
        # A dynamic member leaves the group here (its partitions move at once); a static one sends no
        # LeaveGroup (aiokafka's `_maybe_leave_group`): `_leave_as_static_member` decides.
        for client in (self.consumer, self.producer):
            if client is not None:
                try:
                    await asyncio.wait_for(client.stop(), 3.0)
                except TimeoutError:
                    log.warning("%s: a Kafka client did not close within 3 s", self.stage)
        for state in self.states:
            state.revoke(held)
        await self._leave_as_static_member()

    async def _leave_as_static_member(self) -> None:
        """After the drain: a static member that is not keeping its partitions for its restart removes itself."""
        leaves = self.leave_group_on_stop if self.leave_group_on_stop is not None else not self.states
        if self.group_instance_id is None or not leaves or self.fenced is not None:
            return  # a fenced member's removal would remove the live process now holding its id
        try:
            await asyncio.wait_for(remove_static_members(self.bootstrap, self.group, [self.group_instance_id]), 3.0)
            log.info("%s: left group %s as %s", self.stage, self.group, self.group_instance_id)
        except (TimeoutError, KafkaError, MemberRemovalFailed) as exc:
            log.warning("%s: could not leave the group (%r): its partitions wait out its session", self.stage, exc)

    def _coordinator_member_id(self) -> str:
        # aiokafka exposes neither the member id nor its reset on UnknownMemberId: read its coordinator's.
        coordinator = getattr(self.consumer, "_coordinator", None)
        return str(getattr(coordinator, "member_id", UNKNOWN_MEMBER_ID) or UNKNOWN_MEMBER_ID)

    async def _hold_rejoin_if_instance_id_taken(self) -> None:
        """Between a revocation and the rejoin: a static member whose id aiokafka reset (told UnknownMemberId,
        its heartbeat carries no instance id) rejoins next under its instance id. If another live member holds
        that id, the rejoin would displace it and it would displace this one back, both reading the same
        partitions for ever: stop instead, and hold the rejoin back until the worker has stopped."""
        previous = self._member_id
        if self.group_instance_id is None or previous == UNKNOWN_MEMBER_ID or self.fenced is not None:
            return  # dynamic, not joined yet, or already stopping
        if self._coordinator_member_id() != UNKNOWN_MEMBER_ID:
            return  # a plain rebalance: the coordinator still knows this member
        try:
            holders = await asyncio.wait_for(
                members_with_instance_id(self.bootstrap, self.group, self.group_instance_id), 5.0
            )
        except (TimeoutError, KafkaError) as exc:  # unknown: rejoin as before rather than stop on a doubt
            log.warning("%s: could not look up who holds %s (%r); rejoining", self.stage, self.group_instance_id, exc)
            return
        others = [member for member in holders if member != previous]
        if not others:
            return  # its session expired (nobody holds the id) or only its generation was stale: rejoin
        self._fence(InstanceIdTaken(self.group, self.group_instance_id, f"member {others[0]}, this one was {previous}"))
        self._rejoin_held = asyncio.get_running_loop().create_future()
        try:
            await self._rejoin_held  # cancelled by `on_stop`: aiokafka's coordinator task ends without a JoinGroup
        finally:
            self._rejoin_released.set()

    def _fence(self, taken: InstanceIdTaken) -> None:
        """Stop reading at once and ask for the process to exit non-zero (the other process keeps the id)."""
        if self.fenced is not None:
            return
        self.fenced = taken
        self._stopping = True  # `_consume` fetches nothing more
        log.critical("%s: %s; stopping (exit %d)", self.stage, taken, EXIT_INSTANCE_ID_TAKEN)
        sentry_sdk.capture_exception(taken)
        self.request_shutdown(EXIT_INSTANCE_ID_TAKEN)

    async def _release_held_rejoin(self) -> None:
        if self._rejoin_held is not None and not self._rejoin_held.done():
            self._rejoin_held.cancel()
            await self._rejoin_released.wait()  # the coordinator task has ended: closing the consumer won't wait

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

    # -- rebalances --------------------------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Before partitions move: the batch in hand given up, every sent batch durable, done offsets committed.

        The whole group waits on this callback, and a member that outlasts the rebalance timeout is
        evicted, so work it finished afterwards would race the next owner's: every wait comes out of one
        budget below `rebalance_timeout_ms` (`_revoke_budget_s`), with the commit's share kept for last.
        """
        assert self._batch_lock is not None and self._in_flight is not None
        budget_s, commit_s = self._revoke_budget_s()
        deadline = time.monotonic() + budget_s

        def left() -> float:  # for the waits before the commit
            return max(0.0, deadline - commit_s - time.monotonic())

        self.joined = False
        self.revocations += bool(revoked)  # aiokafka calls this before the first join too, with nothing
        owner = self._owner
        owner.revoked.set()  # retry loops give up between attempts; their backoff sleeps end now
        locked = await self._take_batch_lock(left)
        self._owner = Ownership(owner.generation + 1)  # fetches from here on are of the next assignment
        try:
            if not locked:
                await self._flush_changelog(owner, left)
            try:
                await asyncio.wait_for(self._in_flight.join(), max(0.5, left()))
            except TimeoutError:
                log.warning("%s: batches still in flight at a rebalance; their events are replayed", self.stage)
            try:
                # Bounded: after the session expired, aiokafka's commit waits for a coordinator that the
                # rebalance now waiting on this callback would find. The commit fails then anyway (the
                # member is gone); the next owner replays from the last commit and the dedupe absorbs it.
                await asyncio.wait_for(self._commit(), max(0.5, deadline - time.monotonic()))
            except TimeoutError:
                log.warning("%s: no commit before the rebalance (the group has moved on)", self.stage)
            owner.ended = True  # a batch of it that becomes durable later is the next owner's to redo
            for tp in revoked:
                self.done.pop(tp, None)
                self.committed.pop(tp, None)
                self.last_timestamp.pop(tp, None)
                self.readable_since.pop(tp, None)
            self.assigned -= set(revoked)
            for state in self.states:
                state.revoke(sorted(tp.partition for tp in revoked if tp.topic == self.source))
        finally:
            if locked:
                self._batch_lock.release()

    async def _flush_changelog(self, owner: Ownership, left: Callable[[], float]) -> None:
        """Revoking without the batch lock: send the stores' unsent changelog (ledger marks of what a sink took)
        before `revoke` closes the stores and drops it; the next owner's restore or catch-up reads it."""
        assert self._in_flight is not None
        outputs = [out for state in self.states for out in state.changelog()]
        if not outputs:
            return
        flight = InFlight({}, StepResult(outputs=outputs), 0, time.perf_counter(), owner=owner, abandoned=True)
        try:
            await asyncio.wait_for(self._in_flight.put(await self._send_flight(flight)), max(0.5, left()))
        except TimeoutError:
            log.error("%s: could not queue a revoked batch's changelog; the next owner may redeliver it", self.stage)

    def _revoke_budget_s(self) -> tuple[float, float]:
        """(the revoke callback's whole budget, the commit's share of it): under the rebalance timeout with a
        margin for the join round trips."""
        timeout_s = self.rebalance_timeout_ms / 1000
        budget_s = max(1.0, timeout_s - max(1.0, 0.15 * timeout_s))
        return budget_s, min(5.0, 0.2 * budget_s)

    async def _take_batch_lock(self, left: Callable[[], float]) -> bool:
        """The batch lock within `revoke_grace_s` (and `left()`), cancelling the handler in hand if it holds on
        longer; the batch's publish is not cancelled, it gets what is `left()` to finish."""
        assert self._batch_lock is not None
        try:
            # Floored: wait_for(..., 0) times out even on a free lock. The grace leaves a reserve, so that a
            # cancelled handler's publish of what it delivered still fits in the budget.
            grace = max(0.5, min(self.revoke_grace_s, left() - REVOKE_RESERVE_S))
            await asyncio.wait_for(self._batch_lock.acquire(), grace)
            return True
        except TimeoutError:
            pass
        handling = self._handling
        if handling is not None:
            # A handler attempt still in flight past the grace (a sink request): like a kill, what it
            # delivered unmarked is delivered again by the next owner, with the same idempotency keys.
            log.warning(
                "%s: the batch in hand outlasted the revocation by %.0fs; cancelled", self.stage, self.revoke_grace_s
            )
            handling.cancel()
        try:
            await asyncio.wait_for(self._batch_lock.acquire(), max(0.5, left()))
            return True
        except TimeoutError:
            log.error("%s: the batch lock is still held; revoking without it", self.stage)
            return False

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Return quickly: aiokafka sends no heartbeats while this runs. Partitions with state stay
        paused while it is restored in the background, and resume at their committed offset."""
        assert self.consumer is not None
        # Before any await: a failure below must not leave the previous generation's id here, which the
        # instance-id check would then take for another process holding this worker's name.
        self._member_id = self._coordinator_member_id()
        sources = sorted((tp for tp in assigned if tp.topic == self.source), key=lambda tp: tp.partition)
        if self.states:
            self.consumer.pause(*sources)  # before any await: nothing of theirs is fetched until restored
        await self._cancel_restore()  # normally done by the revocation before; never two restores at once
        mine = [tp.partition for tp in sources]
        for tp in assigned:  # where this worker starts: the lag the watchdog measures until the first commit
            try:
                offset = await self.consumer.committed(tp)
            except KafkaError:
                offset = None
            if offset is not None:
                self.committed[tp] = self.done[tp] = offset
        # Stateful partitions stay paused: their stores are opened (a RocksDB WAL replay after a kill -9)
        # and restored by a task, while the worker heartbeats.
        self.assigned = {tp for tp in assigned if tp.topic != self.source or not self.states}
        self.restoring = set(sources) if self.states else set()
        self.readable_since.update((tp, time.monotonic()) for tp in self.assigned)
        self.joined = True
        if self.restoring:
            self._restore_task = asyncio.create_task(self._restore(mine), name=f"{self.stage}-restore")
        log.info("%s: assigned partitions %s", self.stage, mine)

    async def _restore(self, partitions: list[int]) -> None:
        """Open and restore every state of these partitions (heartbeats go on); resume each when done.

        A transient broker error is retried (`RESTORE_ATTEMPTS`, backoff with jitter) from where each
        state got to; any other failure, or one that outlasts the retries, stops the worker.
        """
        pending = {p: 0 for p in partitions}
        try:
            for state in self.states:
                for p in await asyncio.to_thread(state.open, partitions):
                    pending[p] += 1
        except Exception as exc:
            self._restore_failed(partitions, exc)
            return
        for p in partitions:
            if not pending[p]:
                self._resume_restored(TopicPartition(self.source, p))
        log.info("%s: restoring partitions %s", self.stage, sorted(p for p in pending if pending[p]))
        try:
            for state in self.states:
                left = sorted(p for p, n in pending.items() if n)  # this state's share: opened by it, not restored
                reported: set[int] = set()

                def restored(partition: int, reported: set[int] = reported) -> None:
                    reported.add(partition)
                    pending[partition] -= 1
                    if pending[partition] == 0:
                        self._resume_restored(TopicPartition(self.source, partition))

                await self._retry_transient(
                    f"restore of {state.changelog_topic}",
                    lambda s=state, todo=left, seen=reported: s.restore([p for p in todo if p not in seen], restored),
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._restore_failed(partitions, exc)

    async def _retry_transient(self, what: str, call: Callable[[], Awaitable[None]]) -> None:
        """`call()` until it succeeds, retrying transient broker errors with backoff and jitter up to
        `RESTORE_ATTEMPTS` times; any other error, or the last transient one, is raised."""
        attempt = 0
        while True:
            try:
                await call()
                return
            except Exception as exc:
                attempt += 1
                if not transient(exc) or attempt >= RESTORE_ATTEMPTS:
                    raise
                delay = BROKER_BACKOFF.delay(attempt)
                log.warning("%s: %s failed (attempt %d), retrying in %.1fs: %r", self.stage, what, attempt, delay, exc)
                await asyncio.sleep(delay)

    def _resume_restored(self, tp: TopicPartition) -> None:
        """Read a restored partition from its committed offset, dropping anything fetched before."""
        assert self.consumer is not None
        if tp not in self.restoring:  # revoked meanwhile
            return
        committed = self.committed.get(tp)
        if committed is not None:
            self.consumer.seek(tp, committed)
        self.restoring.discard(tp)
        self.assigned.add(tp)
        self.readable_since[tp] = time.monotonic()
        self.consumer.resume(tp)
        log.info("%s: partition %d restored, reading it", self.stage, tp.partition)

    def _restore_failed(self, partitions: list[int], exc: Exception) -> None:
        # Reading on without the state would pass duplicates: fail loudly and let a restart retry.
        log.critical(
            "%s: could not restore partitions %s; shutting the worker down", self.stage, partitions, exc_info=exc
        )
        sentry_sdk.capture_exception(exc)
        os.kill(os.getpid(), signal.SIGTERM)

    async def _cancel_restore(self) -> None:
        """A revocation (or shutdown) during a restore: stop it; the stores' checkpoints cover what it applied."""
        task, self._restore_task = self._restore_task, None
        self.restoring = set()
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])  # its cancellation is not ours: a cancelled caller still raises

    async def _checkpoint_every(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_interval_s)
            for state in self.states:
                try:
                    await state.catch_up()
                except Exception as exc:
                    if not transient(exc):
                        raise
                    # The gap stays noted (`catch_up` keeps it) and the checkpoint stays before it: retried
                    # at the next interval, so a broker outage costs a slower restore, not the worker.
                    log.warning("%s: catch-up of %s failed: %r", self.stage, state.changelog_topic, exc)
                state.checkpoint()

    # -- the loop ----------------------------------------------------------------------------------

    async def _consume(self) -> None:
        assert self.consumer is not None and self._in_flight is not None and self._batch_lock is not None
        phase = self.metrics.batch_phase.labels(self.stage, "wait")
        waited = time.perf_counter()
        while not self._stopping:
            # Fetch outside the lock: during a rebalance aiokafka's getmany waits for the new assignment,
            # and the rebalance first runs `_on_revoked`, which takes the lock.
            try:
                fetched = await self.consumer.getmany(timeout_ms=100, max_records=self.batch_max)
            except KafkaError as exc:  # e.g. a fatal fetch error; the fetcher itself rides out outages
                if self.group_instance_id is not None and fenced(exc):  # error 82 from a JoinGroup or SyncGroup
                    self._fence(InstanceIdTaken(self.group, self.group_instance_id, repr(exc)))
                    break
                log.warning("%s: fetch failed: %r", self.stage, exc)
                await asyncio.sleep(1.0)
                continue
            owner = self._owner  # read with no await since getmany returned
            messages = [m for batch in fetched.values() for m in batch]
            if not messages:
                continue
            async with self._batch_lock:
                if not owner.owned:
                    # Revoked after this fetch returned: the new assignment restarts every partition at
                    # its committed offset, so whoever owns them now reads these events again.
                    log.info("%s: dropped %d events fetched before a rebalance", self.stage, len(messages))
                    continue
                unready = [tp for tp in fetched if tp not in self.assigned]
                if unready:
                    # Fetched from the new assignment before `_on_assigned` restored its state: put the
                    # positions back to the first event fetched, and read them again once it has.
                    for tp in unready:
                        self.consumer.seek(tp, fetched[tp][0].offset)
                    messages = [m for tp in fetched if tp not in unready for m in fetched[tp]]
                    if not messages:
                        await asyncio.sleep(0.05)
                        continue
                phase.observe(time.perf_counter() - waited)
                self.metrics.batch_size.labels(self.stage).observe(len(messages))
                flight = await self.process_batch(messages, owner)
                await self._in_flight.put(flight)
            waited = time.perf_counter()

    async def _refresh_stale_leaders(self) -> None:
        """Unstick partitions whose start position aiokafka keeps asking a broker that is no longer leader.

        aiokafka 0.14 looks up a partition's position (ListOffsets, when the group committed none) at
        the leader of its cached metadata and, answered NotLeaderForPartition, retries that broker every
        100 ms without refreshing the metadata ("Failed fetch offsets from N"); it fetches nothing from
        that broker meanwhile, so only the 5-minute metadata refresh ends it. A readable partition with
        no fetch answered yet (no high watermark) for `unfetched_after_s` is in that state or its leader
        is down: `end_offsets` asks the same leader, and on that error refreshes the metadata the
        fetcher's next attempt then uses.
        """
        assert self.consumer is not None
        while True:
            await asyncio.sleep(self.unfetched_after_s / 2)
            now = time.monotonic()
            owned = self.assigned & self.consumer.assignment()  # `highwater` asserts the consumer has it
            unfetched = [
                tp
                for tp, since in self.readable_since.items()
                if tp in owned and now - since > self.unfetched_after_s and self.consumer.highwater(tp) is None
            ]
            if not unfetched:
                continue
            log.warning(
                "%s: partitions %s assigned %.0fs ago and not fetched yet; looking their leaders up again",
                self.stage,
                sorted(tp.partition for tp in unfetched),
                self.unfetched_after_s,
            )
            for tp in unfetched:  # at most once per `unfetched_after_s` each
                self.readable_since[tp] = now
            try:
                await self.consumer.end_offsets(unfetched)
            except KafkaError as exc:  # the leader is down: the fetcher's own retries go on
                log.warning("%s: looking up the leaders of %s failed: %r", self.stage, unfetched, exc)

    async def _ack_in_order(self) -> None:
        assert self._in_flight is not None
        produce = self.metrics.batch_phase.labels(self.stage, "produce")
        while True:
            flight = await self._in_flight.get()
            durable = await self._settle(flight)
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

    async def process_batch(
        self,
        messages: Sequence[ConsumerRecord],  # type: ignore[type-arg]
        owner: Ownership | None = None,
    ) -> InFlight:
        """Decode, handle, and send the outputs; the returned batch is done once they are durable.

        Handled only while `owner` (the assignment it was fetched under) holds: revoked, the batch is
        abandoned and only what already reached a destination is published.
        """
        owner = owner or self._owner
        records: list[Record] = []
        dead: list[DeadLetter] = []
        next_offsets: dict[TopicPartition, int] = {}
        stamps = self.last_timestamp
        for message in messages:
            tp = TopicPartition(message.topic, message.partition)
            next_offsets[tp] = message.offset + 1
            stamps[tp] = message.timestamp or 0
            try:
                size = len(message.value or b"")
                if size > self.max_message_bytes:
                    raise InvalidEvent("event_too_large", f"{size} > {self.max_message_bytes} bytes")
                records.append(Record(decode_event(message.value), message))
            except InvalidEvent as exc:
                dead.append(DeadLetter(message, exc))
        if dead and self.hold_dead_letters is not None:
            self.hold_dead_letters([letter.message for letter in dead])
        self.metrics.events_in.labels(self.stage).inc(len(messages))
        handling = time.perf_counter()
        carried: list[Output] = []  # outputs of what already reached a destination (a sink's acked part)
        # Only the handler is cancellable at a revocation: what it sends afterwards (a sender's receipts and
        # ledger changelog) records work already done elsewhere, and must land.
        task = asyncio.create_task(self._handle(records, owner, carried), name=f"{self.stage}-handle")
        self._handling = task
        try:
            result = await task
        except _Revoked:
            return await self._abandon(next_offsets, carried, owner)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not task.cancelled() or (current is not None and current.cancelling()):
                raise  # the loop itself is stopping
            log.warning("%s: a batch's handler was cancelled by a revocation", self.stage)
            return await self._abandon(next_offsets, carried, owner)
        finally:
            self._handling = None
        producing = time.perf_counter()
        self.metrics.batch_phase.labels(self.stage, "handle").observe(producing - handling)
        result.dead.extend(dead)
        outputs = len(result.outputs)
        for state in self.states:
            result.outputs.extend(state.changelog())
        if self.tallies is not None:
            tallies = batch_tallies(self.stage, self.tallies, self.bucket_s, messages, records, result.dead)
            result.outputs.extend(tallies)
        flight = InFlight(next_offsets, result, outputs, producing, owner=owner, inputs=records)
        return await self._send_flight(flight)

    async def _abandon(
        self, next_offsets: dict[TopicPartition, int], carried: list[Output], owner: Ownership
    ) -> InFlight:
        """A batch revoked mid-way: publish what already reached a destination and its state's changelog
        (a sender's ledger marks, so the next owner skips it), no tally, and never mark its offsets."""
        log.info(
            "%s: gave up a batch of partitions %s at a revocation",
            self.stage,
            sorted(tp.partition for tp in next_offsets),
        )
        result = StepResult(outputs=list(carried))
        for state in self.states:
            result.outputs.extend(state.changelog())
        flight = InFlight(next_offsets, result, 0, time.perf_counter(), owner=owner, abandoned=True)
        return await self._send_flight(flight)

    async def _send_flight(self, flight: InFlight) -> InFlight:
        flight.records = self._records_of(flight.result)
        flight.sent_with = self.publisher
        assert flight.sent_with is not None
        try:
            flight.published = await flight.sent_with.publish(flight.records)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the acker re-sends it
            flight.send_error = exc
        return flight

    async def _settle(self, flight: InFlight) -> bool:
        """Wait until the broker acknowledged every record of the batch, re-sending the failed ones.

        A record no retry can send (over a size limit, refused as invalid) is dead-lettered instead, so
        its partition flows on. False if given up: a batch whose partitions were revoked meanwhile is the
        next owner's to redo, unless it was abandoned, i.e. carries only work a destination already has.
        """
        records = flight.records
        pending = list(range(len(records)))  # indexes in `records` not acknowledged yet
        placed: dict[int, tuple[int, int]] = {}  # index -> (partition, offset) once acknowledged
        attempt = 0
        unknown = 0  # attempts that failed with UnknownError (see UNKNOWN_ERROR_ATTEMPTS)
        stripped = False  # revoked: only the store's changelog is still re-sent, the rest is the next owner's
        error = flight.send_error
        published = flight.published
        sent_with = flight.sent_with
        owner = flight.owner
        while True:
            if error is None:
                assert published is not None
                acks = await asyncio.gather(*published.futures, return_exceptions=True)
                failed = []
                for position, index in enumerate(pending):
                    if isinstance(acks[published.placed[position][0]], BaseException):
                        failed.append(index)
                    else:
                        placed[index] = published.offset_of(position, acks)
                if not failed:
                    break
                pending = failed  # only these are re-sent: the others are in the log already
                errors = [a for a in acks if isinstance(a, BaseException)]
                unknown += any(isinstance(e, UnknownError) for e in errors)
                error = next((e for e in errors if not unsendable(e, unknown)), None)
                if error is None:
                    await self._renew_producer(sent_with, errors[0])
                    await self._dead_letter_unsendable(flight, pending, placed, errors[0])
                    break
            else:
                unknown += isinstance(error, UnknownError)
                if unsendable(error, unknown):
                    await self._renew_producer(sent_with, error)
                    await self._dead_letter_unsendable(flight, pending, placed, error)
                    break
            if isinstance(error, OutOfOrderSequenceNumber):
                await self._renew_producer(sent_with, error)
            attempt += 1
            if self.broker_outage is not None:
                self.broker_outage.failed(error)
            delay = self.backoff.delay(attempt)
            self.metrics.retries.labels(self.stage).inc()
            log.warning("%s: produce failed (attempt %d), retrying in %.2fs: %r", self.stage, attempt, delay, error)
            if flight.abandoned or owner is None or stripped:
                if owner is not None and not owner.owned and attempt > REVOKED_RESEND_ATTEMPTS:
                    log.error("%s: gave up re-sending a revoked batch's changelog: %r", self.stage, error)
                    return False
                await asyncio.sleep(delay)  # work done elsewhere (ledger marks, receipts) lands even after a revoke
            elif not await owner.sleep(delay):
                if not self._carries_state(flight):
                    log.warning("%s: gave up re-sending a batch whose partitions were revoked", self.stage)
                    return False
                # Revoked: the next owner redoes the batch, but it must find the ledger marks of what a sink
                # took (its restore or catch-up reads them), so only the store's changelog is still sent.
                stripped = True
                pending = [i for i in pending if records[i].topic in self._state_of_changelog]
                if not pending:
                    return False
            sent_with = self.publisher
            assert sent_with is not None
            try:
                published, error = await sent_with.publish([records[i] for i in pending]), None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc
        if self.broker_outage is not None:
            self.broker_outage.ok()
        if self._state_of_changelog:
            for index, out in enumerate(flight.result.outputs):
                state = self._state_of_changelog.get(out.topic)
                if state is not None and index in placed:
                    partition, offset = placed[index]
                    state.durable(partition, offset + 1)
        if stripped:
            return False
        self.metrics.events_out.labels(self.stage).inc(flight.outputs)
        for letter in flight.result.dead:
            reason = letter.error.reason if isinstance(letter.error, InvalidEvent) else type(letter.error).__name__
            self.metrics.dead_lettered.labels(self.stage, reason).inc()
        return True

    def _carries_state(self, flight: InFlight) -> bool:
        """The batch writes a store's changelog (a sender's ledger marks of what the sink acked): given up,
        the next owner would restore without them and deliver again."""
        return any(out.topic in self._state_of_changelog for out in flight.records)

    async def _dead_letter_unsendable(
        self, flight: InFlight, indexes: list[int], placed: dict[int, tuple[int, int]], error: BaseException
    ) -> None:
        """Send the failed records one at a time; each that still cannot be sent is dead-lettered, and a
        dead letter too large for the DLQ topic is stored truncated with its digest, never dropped."""
        log.warning(
            "%s: %d records refused by the broker (%r); sending them one by one", self.stage, len(indexes), error
        )
        for index in indexes:
            out = flight.records[index]
            sent = await self._produce_alone(out)
            if not isinstance(sent, BaseException):
                placed[index] = sent
                continue
            letter = out
            if out.topic != self.dlq:
                letter = letter_of_output(self.stage, self.dlq, out, sent, self._input_of(out, flight.inputs))
                reason = "record_too_large" if isinstance(sent, TOO_LARGE) else "record_refused"
                log.error("%s: dead-lettered a %d-byte record for %s: %r", self.stage, len(out.value), out.topic, sent)
                self.metrics.dead_lettered.labels(self.stage, reason).inc()
            for keep in (None, 1024, 0):  # the whole letter, then its original cut to a digest and a prefix
                attempt = letter if keep is None else truncated_letter(letter, keep)
                sent = await self._produce_alone(attempt)
                if not isinstance(sent, BaseException):
                    break
            else:
                raise UnsendableDeadLetter(f"{self.stage}: {self.dlq} refused even a truncated dead letter: {sent!r}")

    async def _produce_alone(self, out: Output) -> tuple[int, int] | BaseException:
        """(partition, offset) once acknowledged, retrying transient failures; the error if it can never be sent."""
        attempt = 0
        unknown = 0
        while True:
            publisher = self.publisher
            assert publisher is not None
            try:
                published = await publisher.publish([out])
                acked = await asyncio.gather(*published.futures)
                return published.offset_of(0, acked)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                unknown += isinstance(exc, UnknownError)
                if unsendable(exc, unknown):
                    await self._renew_producer(publisher, exc)
                    return exc
                if isinstance(exc, OutOfOrderSequenceNumber):
                    await self._renew_producer(publisher, exc)
                attempt += 1
                delay = self.backoff.delay(attempt)
                log.warning("%s: produce failed (attempt %d), retrying in %.2fs: %r", self.stage, attempt, delay, exc)
                await asyncio.sleep(delay)

    async def _renew_producer(self, failed: BatchPublisher | None, error: BaseException) -> None:
        """A fresh idempotent producer after a batch failed for good: aiokafka does not rewind its sequence
        numbers then, so every later batch of that partition would fail with OutOfOrderSequenceNumber."""
        if failed is None or failed is not self.publisher:
            return  # already renewed since that batch was sent
        log.warning("%s: replacing the producer after %r", self.stage, error)
        producer = durable_producer(self.bootstrap, self.client_id)
        await producer.start()
        old, self.producer, self.publisher = self.producer, producer, BatchPublisher(producer)
        if old is not None:  # its queued batches are flushed or failed (`retire`); failed ones are re-sent
            task = asyncio.create_task(retire(old), name=f"{self.stage}-retire-producer")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _input_of(self, out: Output, inputs: Sequence[Record]) -> ConsumerRecord | None:  # type: ignore[type-arg]
        """The input message whose event the output carries (rare path: decodes the output once)."""
        if not inputs or out.topic in self._state_of_changelog or out.topic == self.tallies:
            return None
        try:
            fields = unpack(out.value)
        except Exception:  # not an event
            return None
        if not isinstance(fields, dict) or not fields.get("event_id"):
            return None
        # Tenant and id, as the deduplicator keys events: two tenants may use the same client-chosen id.
        key = (fields.get("tenant"), fields["event_id"])
        matches = [r for r in inputs if (r.event.tenant, r.event.event_id) == key]
        passed = [r for r in matches if r.outcome == "out"]  # not a copy the stage dropped
        return (passed or matches)[0].message if matches else None

    async def _handle(self, records: list[Record], owner: Ownership, carried: list[Output]) -> StepResult:
        """Retry transient errors; on an unexpected error, handle one by one to isolate the culprit.

        `carried` collects the outputs of what already reached a destination (parts delivered before a
        partial failure, records handled one by one): a revocation publishes them with the batch given up.
        """
        if not records:
            return StepResult()
        try:
            result = await self._with_retries(lambda: self.handler(records), owner, carried)
            result.outputs.extend(carried)
            return result
        except _Unexpected:
            pass
        result = StepResult()
        for record in records:
            try:
                one = await self._with_retries(lambda r=record: self.handler([r]), owner, carried)
            except _Unexpected as wrapped:
                sentry_sdk.capture_exception(wrapped.__cause__)
                result.dead.append(DeadLetter(record.message, wrapped.__cause__ or wrapped))
                if self.hold_dead_letters is not None:
                    self.hold_dead_letters([record.message])
                continue
            carried.extend(one.outputs)  # its receipts survive a revocation during a later record's retry
            result.dead.extend(one.dead)
        result.outputs.extend(carried)
        return result

    async def _with_retries(
        self, call: Callable[[], Awaitable[StepResult]], owner: Ownership, carried: list[Output]
    ) -> StepResult:
        """Call until it succeeds, while `owner` holds the partitions; `_Revoked` once it does not."""
        attempt = 0
        while True:
            if not owner.owned:
                raise _Revoked(carried)
            attempt += 1
            try:
                return await call()
            except TransientError as exc:
                if isinstance(exc, HandledInPart):
                    carried.extend(exc.outputs)
                delay = self.backoff.delay(attempt, exc.retry_after)
                self.metrics.retries.labels(self.stage).inc()
                log.warning("%s: transient error (attempt %d), retrying in %.2fs: %s", self.stage, attempt, delay, exc)
                if not await owner.sleep(delay):
                    raise _Revoked(carried) from None
            except (InvalidEvent, PermanentSinkError):
                raise _Unexpected() from None  # handlers dead-letter these themselves; a stray one is a bug
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("%s: unexpected error in handler", self.stage)
                raise _Unexpected() from exc

    def _records_of(self, result: StepResult) -> list[Output]:
        """What a batch sends: its outputs, then its dead letters."""
        letters = [letter_output(self.stage, self.dlq, letter) for letter in result.dead]
        return [*result.outputs, *letters] if letters else list(result.outputs)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.runner._cancel_restore()
        await self.runner._on_revoked(revoked)
        await self.runner._hold_rejoin_if_instance_id_taken()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.runner._on_assigned(assigned)


class PartitionWatchdog:
    """Consumer lag per partition, and a stuck-partition alarm.

    Lag in offsets is the high watermark minus the committed offset (or, before the first commit, the
    offset after the last durable batch); lag in seconds is the age of the last event read while lag
    remains (0 when caught up). A partition with lag whose committed offset has not moved for
    `stuck_after_s` pages once and makes the worker rejoin its group, which re-runs assignment and
    restarts the partition's fetch from the committed offset.
    """

    def __init__(self, runner: StageRunner, metrics: StageMetrics, alerter: Any, stuck_after_s: float) -> None:
        from prometheus_client import Gauge

        self.runner = runner
        self.stage = runner.stage
        self.alerter = alerter
        self.stuck_after_s = stuck_after_s
        self.progress: dict[Any, tuple[int | None, float]] = {}  # tp -> (committed, since when)
        self.rejoins = 0
        self.lag_messages = Gauge(
            "hifi_consumer_lag_messages",
            "High watermark minus the committed offset",
            ["stage", "partition"],
            registry=metrics.registry,
        )
        self.lag_seconds = Gauge(
            "hifi_consumer_lag_seconds",
            "Age of the oldest unprocessed event (approximated by the last processed one) while there is lag",
            ["stage", "partition"],
            registry=metrics.registry,
        )
        self.partitions: dict[str, dict[str, Any]] = {}

    async def check(self) -> None:
        try:
            self._check()
        except Exception:  # a watchdog must not take the worker down
            log.exception("%s: partition watchdog failed", self.stage)

    def _check(self) -> None:
        runner = self.runner
        consumer = runner.consumer
        if consumer is None:
            return
        now = time.monotonic()
        seen = {}
        stuck: list[str] = []
        for tp in sorted(runner.assigned):
            highwater = consumer.highwater(tp)
            committed = runner.committed.get(tp, runner.done.get(tp))
            if highwater is None or committed is None:
                continue
            lag = max(0, highwater - committed)
            last_ts = runner.last_timestamp.get(tp)
            lag_s = max(0.0, time.time() - last_ts / 1000) if lag and last_ts else 0.0
            self.lag_messages.labels(self.stage, str(tp.partition)).set(lag)
            self.lag_seconds.labels(self.stage, str(tp.partition)).set(lag_s)
            previous = self.progress.get(tp)
            if previous is None or previous[0] != committed or lag == 0:
                self.progress[tp] = (committed, now)
                stalled_s = 0.0
            else:
                stalled_s = now - previous[1]
            seen[f"{tp.topic}:{tp.partition}"] = {
                "committed": committed,
                "next": runner.done.get(tp),
                "highwater": highwater,
                "lag_messages": lag,
                "lag_seconds": round(lag_s, 3),
                "stalled_s": round(stalled_s, 1),
            }
            if stalled_s > self.stuck_after_s:
                stuck.append(f"{tp.topic}:{tp.partition} ({lag} waiting, committed {committed}, {stalled_s:.0f}s)")
        self.partitions = seen
        # One page per stage and episode, however many of its partitions are stuck.
        if stuck:
            fired = self.alerter.fire(
                "stuck_partition",
                f"{self.stage}: partitions with lag whose committed offset has not moved for over "
                f"{self.stuck_after_s:.0f}s: {', '.join(stuck)}; rejoining the group",
                partitions=stuck,
            )
            if fired:
                self._rejoin()
        else:
            self.alerter.resolve("stuck_partition")

    def _rejoin(self) -> None:
        """Ask the group coordinator for a rebalance (aiokafka's own rejoin)."""
        try:
            assert self.runner.consumer is not None
            self.runner.consumer._coordinator.request_rejoin()
            self.rejoins += 1
        except Exception:
            log.exception("%s: could not request a rejoin", self.stage)


class _Unexpected(Exception):
    """Internal: the handler failed in a way retrying the batch won't fix."""


class _Revoked(Exception):
    """Internal: the batch's partitions were revoked; `carried` already reached a destination."""

    def __init__(self, carried: list[Output]) -> None:
        super().__init__("partitions revoked")
        self.carried = carried
