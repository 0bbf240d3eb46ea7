"""What a stage's handler takes and returns, and the assignment a batch is handled under.

A handler gets a decoded batch (`Record`s) and returns a `StepResult`: outputs to publish and dead letters.
It never lets an exception escape for an event it can judge: transient errors raise `TransientError`
(the runner retries, see shared/retry.py), bad events become dead letters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from aiokafka.structs import ConsumerRecord

from shared.dlq import DeadLetter
from shared.event import Event
from shared.outcome import Outcome
from shared.publish import Output


@dataclass(slots=True)
class Record:
    """A decoded event and the Kafka message it came from (for DLQ context and claims)."""

    event: Event
    message: ConsumerRecord  # type: ignore[type-arg]
    # What the stage did with it, for the loss ledger: out (passed on), dup, quarantined, unrouted,
    # filtered:<sinks> (shared.audit), delivered, skipped (already delivered), canary_dropped, replayed /
    # replay_skipped (`hifi replay`). Dead letters: the runner (shared.audit.batch_tallies).
    outcome: str = Outcome.OUT  # an Outcome, or the router's filtered:<sinks>
    # What `hifi trace` should know about an event the stage did not pass on (dedupe: the claim's holder).
    note: dict[str, Any] | None = None

    @property
    def source(self) -> str:
        msg = self.message
        return f"{msg.topic}:{msg.partition}:{msg.offset}"

    @property
    def partition(self) -> int:
        """The source partition: partition-local state (a RocksDB window) lives with it."""
        return int(self.message.partition)


@dataclass
class StepResult:
    outputs: list[Output] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)


Handler = Callable[[list[Record]], Awaitable[StepResult]]


@runtime_checkable
class PartitionedState(Protocol):
    """State kept with the source partitions this worker owns (a RocksDB key window), and its changelog."""

    changelog_topic: str

    def open(self, partitions: list[int]) -> list[int]:
        """Open the stores of newly owned partitions (no reading); return those that need a restore."""
        ...

    async def restore(self, partitions: list[int], restored: Callable[[int], None] | None = None) -> None:
        """Catch opened stores up with the changelog; `restored(p)` once partition p is."""
        ...

    async def catch_up(self) -> None:
        """Apply changelog records other owners wrote between this worker's own (a capped revoke)."""
        ...

    def checkpoint(self) -> None:
        """Save how far each open store applied its changelog (a kill -9 then replays only the tail)."""
        ...

    def revoke(self, partitions: list[int]) -> None:
        """Close the stores of partitions given away; everything they hold is in the changelog."""
        ...

    def changelog(self) -> list[Output]:
        """The changelog records of the writes since the last call (sent with the batch's outputs)."""
        ...

    def durable(self, partition: int, next_offset: int) -> None:
        """The broker holds this partition's changelog up to `next_offset`."""
        ...


@runtime_checkable
class StandbyState(Protocol):
    """A partitioned state that can keep warm copies of the partitions it does not own (shared/standby.py)."""

    def start_standby(self, hold_back_while: Callable[[], bool] | None = None) -> None:
        """Start tailing; open and apply nothing while `hold_back_while()` (owned partitions come first)."""
        ...

    async def stop_standby(self) -> None: ...

    async def release(self, partitions: list[int]) -> None:
        """Before `open`: the standby stops applying to these partitions, checkpoints and closes them."""
        ...

    def standby_lag(self) -> dict[int, int | None]: ...

    def standby_warm(self, max_lag: int) -> bool:
        """Every partition this worker does not own has a standby store at most `max_lag` changelog records behind."""
        ...

    def standby_errors(self) -> dict[int, str]:
        """Standby partitions whose store failed to open (retried with backoff), and why."""
        ...


@runtime_checkable
class LocalState(Protocol):
    """A state kept in a directory of this worker's volume, which no other process may use at the same time."""

    def hold_directory(self) -> None:
        """Take the directory's exclusive lock, or raise `StateDirInUse` (another process holds it)."""
        ...

    def release_directory(self) -> None: ...


class Ownership:
    """The assignment a batch was fetched under. aiokafka rebalances eagerly: every rebalance (and an
    eviction, on rejoin) revokes every partition, so one generation per worker is one per partition."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.revoked = asyncio.Event()  # set when the revoke callback starts: stop delivering and retrying
        self.ended = False  # set once the revoke callback committed: nothing of it may be marked done after

    @property
    def owned(self) -> bool:
        return not self.revoked.is_set()

    async def sleep(self, delay: float) -> bool:
        """Sleep `delay` seconds, cut short by a revocation; True if the partitions are still owned."""
        try:
            await asyncio.wait_for(self.revoked.wait(), delay)
        except TimeoutError:
            pass
        return self.owned
