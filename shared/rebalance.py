"""Rebalances of a stage worker's group, and its static membership.

aiokafka rebalances eagerly: every rebalance (and an eviction, on rejoin) revokes every partition, then
assigns. The revoke callback gives up the batch in hand, waits until every sent batch is durable and
commits, all within one budget under `rebalance_timeout_ms` (the whole group waits on it), and leaves the
stores of the partitions being read open: the assign callback keeps those assigned straight back
(`_keep_or_close_suspended`) and closes the rest; the assign
callback starts every partition at its committed offset as the coordinator verified it (aiokafka reads a
coordinator's error as "never committed"), returns within half the session (aiokafka sends no heartbeats
while it runs) and leaves state restores, and partitions whose commit is still unknown, to tasks
(shared/restore.py, `_start_late`). A static member (KIP-345) that finds its instance id held by another live
process stops instead of rejoining, and leaves the group on stop unless it keeps its partitions for its
restart.

`Rebalancing` is a part of StageRunner, not a separate object: these callbacks move the runner's own
batch lock, in-flight queue, offsets and assignment, and tests hook them on the runner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import sentry_sdk
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from shared.alerts import Alerter
from shared.flight import FlightSender, InFlight
from shared.membership import (
    EXIT_INSTANCE_ID_TAKEN,
    NOT_COMMITTED,
    UNKNOWN_MEMBER_ID,
    InstanceIdTaken,
    MemberRemovalFailed,
    committed_offsets,
    coordinator_generation,
    coordinator_member_id,
    group_members,
    members_with_instance_id,
    remove_static_members,
    request_rejoin,
    settle_position_lookups,
    start_at_reset_policy,
)
from shared.restore import StateRestorer
from shared.step import Ownership, PartitionedState, StepResult

log = logging.getLogger(__name__)

LATE_START_ATTEMPTS = 10  # rounds of asking for a partition's commit after the assign callback, before a rejoin
PEER_LOOKUP_S = 1.0  # a stop's look for another member of the group, before it leaves under auto
REVOKE_RESERVE_S = 3.0  # of the revoke budget, kept after a cancelled handler for its publish and the commit


class Rebalancing:
    """StageRunner's rebalance callbacks and static membership (see the module's docstring)."""

    # The runner's state these callbacks read and move (StageRunner sets them).
    stage: str
    source: str
    bootstrap: str
    group: str
    group_instance_id: str | None
    leave_group_on_stop: bool | None
    standby_replicas: int
    rebalance_timeout_ms: int
    revoke_grace_s: float
    session_timeout_ms: int
    consumer: AIOKafkaConsumer | None
    flights: FlightSender
    restorer: StateRestorer
    states: list[PartitionedState]
    done: dict[TopicPartition, int]
    committed: dict[TopicPartition, int]
    last_timestamp: dict[TopicPartition, float]
    readable_since: dict[TopicPartition, float]
    assigned: set[TopicPartition]
    awaiting_commit: set[TopicPartition]  # owned, paused until the coordinator tells their commit (`_start_late`)
    alerter: Alerter
    joined: bool
    revocations: int
    fenced: InstanceIdTaken | None
    request_shutdown: Callable[[int], None]
    _stopping: bool
    _member_id: str
    # Source partitions revoked with their stores left open, and the generation they were owned in: an eager
    # rebalance revokes everything, and most partitions come straight back (`_keep_or_close_suspended`).
    _suspended: set[int]
    _suspended_by: str  # the member id that owned them
    _owned_generation: int
    _rejoin_held: asyncio.Future[None] | None
    _rejoin_released: asyncio.Event
    _late_start: asyncio.Task[None] | None  # asking again for commits the assign callback could not verify
    _in_flight: asyncio.Queue[InFlight] | None
    _batch_lock: asyncio.Lock | None
    _owner: Ownership
    _handling: asyncio.Task[StepResult] | None
    _commit: Callable[[], Awaitable[None]]  # commit what the acker marked done

    # -- rebalances -------------------------------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Before partitions move: the batch in hand given up, every sent batch durable, done offsets committed.

        The whole group waits on this callback, and a member that outlasts the rebalance timeout is
        evicted, so work it finished afterwards would race the next owner's: every wait comes out of one
        budget below `rebalance_timeout_ms` (`_revoke_budget_s`), with the commit's share kept for last.
        """
        assert self._batch_lock is not None and self._in_flight is not None
        budget_s, commit_s = self._revoke_budget_s()
        began = time.monotonic()
        deadline = began + budget_s

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
            # Stores of partitions being read (restored) stay open, their changelog durable or published above,
            # until the assignment says which come back: closing (a memtable flush each) and reopening them made
            # every rebalance longer. One still restoring or waiting for its commit is closed now: kept, it would be
            # read without the rest of its restore.
            reading = {tp.partition for tp in revoked if tp.topic == self.source and tp in self.assigned}
            if not self._suspended:
                self._suspended_by = self._member_id
            self._suspended |= reading
            self.assigned -= set(revoked)
            self.awaiting_commit -= set(revoked)
            for state in self.states:
                state.revoke(
                    sorted(tp.partition for tp in revoked if tp.topic == self.source and tp.partition not in reading)
                )
        finally:
            if locked:
                self._batch_lock.release()
        if revoked:  # the whole group waits on this callback: its length is part of every rebalance's stall
            log.info(
                "%s: revoked partitions %s in %.0f ms",
                self.stage,
                sorted(tp.partition for tp in revoked if tp.topic == self.source),
                (time.monotonic() - began) * 1000,
            )

    async def _flush_changelog(self, owner: Ownership, left: Callable[[], float]) -> None:
        """Revoking without the batch lock: send the stores' unsent changelog (ledger marks of what a sink took)
        before `revoke` closes the stores and drops it; the next owner's restore or catch-up reads it."""
        assert self._in_flight is not None
        outputs = [out for state in self.states for out in state.changelog()]
        if not outputs:
            return
        flight = InFlight({}, StepResult(outputs=outputs), 0, time.perf_counter(), owner=owner, abandoned=True)
        try:
            await asyncio.wait_for(self._in_flight.put(await self.flights.send(flight)), max(0.5, left()))
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
        """Return quickly: aiokafka sends no heartbeats while this runs. Every partition starts at its committed
        offset as the coordinator verified it (`committed_offsets`); one with state stays paused while its state
        is restored in the background. One whose commit the coordinator did not tell in time stays paused while
        a task asks again (`_start_late`): read from the reset policy's start, it would replay the log."""
        assert self.consumer is not None
        began = time.monotonic()
        # Before any await: a failure below must not leave the previous generation's id here, which the
        # instance-id check would then take for another process holding this worker's name.
        self._member_id = coordinator_member_id(self.consumer)
        owner = self._owner
        sources = sorted((tp for tp in assigned if tp.topic == self.source), key=lambda tp: tp.partition)
        # Before any await: nothing is fetched until its start is verified (and its state restored); aiokafka's
        # own position lookup reads a coordinator's error as "never committed" and resets to the log start.
        self.consumer.pause(*sources)
        await self._cancel_late_start()  # first: a round answered meanwhile would begin a restore (`extend`)
        await self.restorer.cancel()  # normally done by the revocation before; never two restores at once
        self._keep_or_close_suspended({tp.partition for tp in sources})
        starts, unknown = await committed_offsets(self.consumer, set(assigned), self._offset_fetch_budget_s())
        self._seek_to_starts(starts)
        ready = [tp for tp in sources if tp in starts]
        # Stateful partitions stay paused: their stores are opened (a RocksDB WAL replay after a kill -9)
        # and restored by a task, while the worker heartbeats.
        self.assigned = {tp for tp in assigned if tp in starts and (tp.topic != self.source or not self.states)}
        if not self.states:
            self.consumer.resume(*ready)
        self.restorer.begin(ready)  # a task: it starts once this callback returns
        self.readable_since.update((tp, time.monotonic()) for tp in self.assigned)
        self.awaiting_commit = set()
        if unknown is not None:
            log.warning("%s: %s; reading the others, asking again for these", self.stage, unknown)
            late = {tp for tp in sources if tp not in starts}
            self.awaiting_commit = set(late)
            for tp in late:
                # A placeholder, paused: aiokafka holds every fetch from a broker while a partition of it has no
                # position, and would look this one up with the same error. Sought again once its commit is known.
                self.consumer.seek(tp, 0)
            self._late_start = asyncio.create_task(self._start_late(late, owner), name=f"{self.stage}-late-start")
        settle_position_lookups(self.consumer, starts)
        self.joined = True
        log.info(
            "%s: assigned partitions %s in %.0f ms",
            self.stage,
            [tp.partition for tp in sources],
            (time.monotonic() - began) * 1000,
        )

    def _keep_or_close_suspended(self, assigned: set[int]) -> None:
        """Of the stores left open at the revocation, keep those assigned again right after (their open store
        needs no restore: `open` skips it) and close the others, as a revocation did before. Kept only if this
        assignment's generation follows the one that owned them: a member evicted meanwhile (a generation
        without it) may have seen another owner write their changelog, so those are closed and restored; so are
        they if the member id changed (a reset member, or a static rejoin after a twin held the instance id)."""
        generation = coordinator_generation(self.consumer)
        follows = (
            self._owned_generation >= 0
            and generation == self._owned_generation + 1
            and self._member_id == self._suspended_by  # a new member id: reset, or its instance id taken meanwhile
        )
        kept = self._suspended & assigned if follows else set()
        closing = sorted(self._suspended - kept)
        self._suspended = set()
        self._owned_generation = generation
        for state in self.states:
            state.revoke(closing)
        if kept:
            log.info("%s: partitions %s kept their open stores through the rebalance", self.stage, sorted(kept))

    def _seek_to_starts(self, starts: dict[TopicPartition, int]) -> None:
        assert self.consumer is not None
        start_at_reset_policy(self.consumer, [tp for tp, offset in starts.items() if offset == NOT_COMMITTED])
        for tp, offset in starts.items():
            if offset == NOT_COMMITTED:
                continue
            # A seek wins over aiokafka's lookup: it only looks a partition up while it has no position.
            self.consumer.seek(tp, offset)
            self.committed[tp] = self.done[tp] = offset

    async def _start_late(self, late: set[TopicPartition], owner: Ownership) -> None:
        """Ask again, while the worker heartbeats, for the commits of partitions the assign callback could not
        verify; each one is read (or restored) once its commit is known. Past `LATE_START_ATTEMPTS` rounds the
        worker pages and rejoins: a new assignment asks afresh, maybe of another coordinator. An unexpected
        error pages and rejoins too: ended silently, it would leave its partitions paused (and unread)."""
        assert self.consumer is not None
        try:
            late = await self._ask_again(late, owner)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: starting partitions %s late failed; rejoining the group", self.stage, sorted(late))
            self.alerter.fire(
                "late_start_failed",
                f"{self.stage}: starting partitions {sorted(tp.partition for tp in late)} at their commit failed "
                f"({exc!r}); rejoining the group",
                partitions=sorted(tp.partition for tp in late),
            )
            request_rejoin(self.consumer)
            return
        if not late:
            self.alerter.resolve("commit_unknown")
            return
        if not owner.owned:
            return
        partitions = sorted(tp.partition for tp in late)
        log.error("%s: commits of %s still unknown; rejoining the group", self.stage, partitions)
        # Paged (once per episode): a coordinator refusing a partition for good keeps it unread through every rejoin.
        self.alerter.fire(
            "commit_unknown",
            f"{self.stage}: the coordinator did not tell the committed offsets of partitions {partitions} in "
            f"{LATE_START_ATTEMPTS} rounds; they are not read; rejoining the group",
            partitions=partitions,
        )
        request_rejoin(self.consumer)

    async def _ask_again(self, late: set[TopicPartition], owner: Ownership) -> set[TopicPartition]:
        """`LATE_START_ATTEMPTS` rounds of `_start_late`: the partitions whose commit is still unknown."""
        assert self.consumer is not None
        for _ in range(LATE_START_ATTEMPTS):
            starts, unknown = await committed_offsets(self.consumer, late, self._offset_fetch_budget_s())
            if not owner.owned:
                return late  # revoked meanwhile: the next assignment verifies its own starts
            self._seek_to_starts(starts)
            settle_position_lookups(self.consumer, starts)
            known = sorted((tp for tp in late if tp in starts), key=lambda tp: tp.partition)
            late -= set(known)
            self.awaiting_commit -= set(known)
            if known and self.states:
                self.restorer.extend(known)
            elif known:
                self.assigned.update(known)
                self.readable_since.update((tp, time.monotonic()) for tp in known)
                self.consumer.resume(*known)
            if unknown is None:
                log.info(
                    "%s: partitions %s read from their verified commit", self.stage, [tp.partition for tp in known]
                )
                return late
        return late

    async def _cancel_late_start(self) -> None:
        task, self._late_start = self._late_start, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])

    def _offset_fetch_budget_s(self) -> float:
        """How long one round of asking for committed offsets lasts: the assign callback sends no heartbeats
        meanwhile, so well within the session, and within the rebalance budget."""
        return min(self._revoke_budget_s()[0], self.session_timeout_ms / 1000 / 2)

    # -- static membership ------------------------------------------------------------------------------

    async def _leave_as_static_member(self, drained: bool) -> None:
        """After the drain: a static member that is not keeping its partitions for its restart removes itself.

        `drained`: every batch durable and committed. One that was not (a sink request hung past the stop's
        waits) keeps its partitions: its restart reopens its own stores, which hold what the cut batch marked."""
        leaves = self.leave_group_on_stop
        if leaves is None:  # a stateful stage's peers hold warm standbys of its stores: a takeover replays the tail
            leaves = not self.states or self.standby_replicas > 0
        if self.group_instance_id is None or not leaves or self.fenced is not None:
            return  # a fenced member's removal would remove the live process now holding its id
        if self._member_id == UNKNOWN_MEMBER_ID:
            return  # never joined: the id, if anyone holds it, is another process's
        if not drained:
            log.warning("%s: drain unfinished; keeping the partitions for the restart (not leaving)", self.stage)
            return
        if self.leave_group_on_stop is None and not await self._has_peers():
            # Alone, a leave moves nothing: the restart would rejoin an empty group and wait out the broker's
            # group.initial.rebalance.delay.ms, where a static rejoin takes the partitions back at once.
            log.info("%s: no other member in group %s; keeping the partitions for the restart", self.stage, self.group)
            return
        try:
            await asyncio.wait_for(remove_static_members(self.bootstrap, self.group, [self.group_instance_id]), 3.0)
            log.info("%s: left group %s as %s", self.stage, self.group, self.group_instance_id)
        except (TimeoutError, KafkaError, MemberRemovalFailed) as exc:
            log.warning("%s: could not leave the group (%r): its partitions wait out its session", self.stage, exc)

    async def _has_peers(self) -> bool:
        """Another member is in the group to take this one's partitions; False if the lookup fails (keep them)."""
        try:
            members = await asyncio.wait_for(group_members(self.bootstrap, self.group), PEER_LOOKUP_S)
        except (TimeoutError, KafkaError) as exc:
            log.warning("%s: could not describe group %s (%r); keeping the partitions", self.stage, self.group, exc)
            return False
        return any(held_by != self.group_instance_id for _member, held_by in members)

    async def _hold_rejoin_if_instance_id_taken(self) -> None:
        """Between a revocation and the rejoin: a static member whose id aiokafka reset (told UnknownMemberId,
        its heartbeat carries no instance id) rejoins next under its instance id. If another live member holds
        that id, the rejoin would displace it and it would displace this one back, both reading the same
        partitions for ever: stop instead, and hold the rejoin back until the worker has stopped.

        A holder seen once may be dead (a JoinGroup whose SyncGroup never came, e.g. the coordinator moved in
        between): only one still there a session later, i.e. heartbeating, is taken for a live process."""
        previous = self._member_id
        if self.group_instance_id is None or previous == UNKNOWN_MEMBER_ID or self.fenced is not None:
            return  # dynamic, not joined yet, or already stopping
        if coordinator_member_id(self.consumer) != UNKNOWN_MEMBER_ID:
            return  # a plain rebalance: the coordinator still knows this member
        self._rejoin_held = asyncio.get_running_loop().create_future()  # `on_stop` cancels it: no rejoin then
        self._rejoin_released.clear()
        try:
            others = await self._other_holders(previous)
            if others:
                log.warning(
                    "%s: %s is held by member %s; looking again in one session (%d ms) before stopping",
                    self.stage,
                    self.group_instance_id,
                    others[0],
                    self.session_timeout_ms,
                )
                await asyncio.wait([self._rejoin_held], timeout=self.session_timeout_ms / 1000 + 1.0)
                await self._end_if_stopped()
                others = await self._other_holders(previous)
                await self._end_if_stopped()  # a stop during that lookup (up to 5 s) too
            if not others:
                return  # its session expired (nobody holds the id) or only its generation was stale: rejoin
            taken = InstanceIdTaken(self.group, self.group_instance_id, f"member {others[0]}, this one was {previous}")
            self._fence(taken)
            await self._rejoin_held  # aiokafka's coordinator task ends without a JoinGroup once this is cancelled
        finally:
            self._rejoin_released.set()

    async def _end_if_stopped(self) -> None:
        """`on_stop` released the held rejoin: a plain stop, neither a fence nor a rejoin."""
        assert self._rejoin_held is not None
        if self._rejoin_held.done():
            await self._rejoin_held  # raises CancelledError: aiokafka's coordinator task ends, no JoinGroup

    async def _other_holders(self, previous: str) -> list[str]:
        """Members other than this one's last id holding its instance id; none if the lookup fails (rejoin
        rather than stop on a doubt)."""
        assert self.group_instance_id is not None
        try:
            holders = await asyncio.wait_for(
                members_with_instance_id(self.bootstrap, self.group, self.group_instance_id), 5.0
            )
        except (TimeoutError, KafkaError) as exc:
            log.warning("%s: could not look up who holds %s (%r); rejoining", self.stage, self.group_instance_id, exc)
            return []
        return [member for member in holders if member != previous]

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


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: Rebalancing) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # The late start first: a round answered while the restore is cancelled would begin another restore.
        await self.runner._cancel_late_start()
        await self.runner.restorer.cancel()
        await self.runner._on_revoked(revoked)
        await self.runner._hold_rejoin_if_instance_id_taken()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.runner._on_assigned(assigned)
