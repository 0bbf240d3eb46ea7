"""The sender's isolation rounds: bisect a failing request until the events at fault stand alone,
and tell a payload that keeps failing from a sink that is down (a probe with no event)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from shared.errors import (
    EventKeepsFailing,
    PartialDelivery,
    PermanentSinkError,
    SinkMisconfigured,
    SinkThrottled,
    TransientError,
)
from shared.outcome import Outcome
from shared.retry import Backoff
from shared.stage import Record, StepResult

from .breaker import CircuitOpen

log = logging.getLogger(__name__)


class IsolationRounds:
    """SinkDelivery's isolation rounds and its refusal guard (a mixin: the evidence it weighs, `suspect`,
    `isolated`, `last_failed_at`, `answers`, is SinkDelivery's state, set up in its `__init__`)."""

    async def _isolate(
        self,
        todo: list[Record],
        attempts: int,
        result: StepResult,
        refused: PermanentSinkError | None = None,
        depth: int = 0,
    ) -> None:
        """One isolation round: bisect breadth-first until the events at fault stand alone; deliver the rest.

        A refused (4xx) event dead-letters alone, once the batch is in (`_settle_refused`). A 5xx/timeout one
        dead-letters only on evidence that it is the payload: it failed alone twice with another request of the
        round (or a probe) succeeding in between, or `max_attempts_per_event` times alone while the sink took
        other requests: in this round, or between the event's previous failed request and this one
        (`isolated`, `last_failed_at`). When every part of the first split failed, a probe carrying no event
        asks the sink: up, the round goes on (the failures are the payloads'); down, it is an outage (the
        round raises, keeping what was delivered, and the events' evidence is reset). A round also raises
        after `round_max_consecutive` requests failed in a row. The round paces its requests after a failure
        (honouring Retry-After), asks the breaker before its first, and is bounded in requests and time.
        `refused`: the whole of `todo` was just refused, so start with its
        halves. `depth` 1: start with its quarters (the outage test is then: all four failed)."""
        rnd = _Round(started=time.monotonic(), max_requests=4 * len(todo) + 8)
        refused_alone: list[tuple[Record, PermanentSinkError]] = []
        leaves: dict[int, _Leaf] = {}  # events that failed alone transiently, by id
        level: list[list[Record]] = [todo]
        for _ in range(2 * depth):
            level = [half for part in level for half in (_halves(part) if len(part) > 1 else [part]) if half]
        outage_after = 3 if len(level) == 1 else len(level)  # failures with no success: the sink is down
        if refused is not None:
            rnd.sink_answered()
            level = _halves(todo) if len(todo) > 1 else []
            if len(todo) == 1:
                refused_alone.append((todo[0], refused))
        while level:
            next_level: list[list[Record]] = []
            for whole_part in level:
                part = [r for r in whole_part if r.outcome != Outcome.DELIVERED]
                if not part:
                    continue
                if rnd.requests >= rnd.max_requests or time.monotonic() - rnd.started > self.round_max_s:
                    raise TransientError(f"sink {self.name}: isolation round bounded after {rnd.requests} requests")
                await rnd.pause()
                rnd.requests += 1
                failed_before = self.last_failed_at.get(self._key(part[0])) if len(part) == 1 else None
                try:
                    # The breaker is asked once per round: a culprit's failures inside it must not trip it
                    # before its siblings get through; the round's own consecutive-failure bound stops it.
                    await self._deliver_part(part, attempts, result, ask_breaker=rnd.requests == 1)
                    rnd.sink_answered(success=True)
                    continue
                except (CircuitOpen, SinkThrottled, SinkMisconfigured):
                    raise  # about the sink, not this part
                except PartialDelivery:
                    rnd.sink_answered(success=True)
                    part = [r for r in part if r.outcome != Outcome.DELIVERED]
                except PermanentSinkError as exc:
                    rnd.sink_answered()
                    if len(part) == 1:
                        refused_alone.append((part[0], exc))
                        continue
                except TransientError as exc:
                    rnd.failed(exc)
                    probed_up = False
                    if not rnd.successes and rnd.failures >= outage_after:
                        # No request of the round succeeded: down, or only culprits in hand (no sibling can
                        # succeed). A probe with no event tells which.
                        if not await self._sink_is_up():
                            self._outage(todo)
                            raise  # the sink is down, not one event: retry later, nothing dead-letters
                        probed_up = True
                    elif rnd.consecutive >= self.round_max_consecutive:
                        raise  # the sink went down or flaps: retry later, nothing dead-letters
                    if len(part) == 1:
                        key = self._key(part[0])
                        leaf = leaves.setdefault(id(part[0]), _Leaf(part[0], rnd.successes))
                        leaf.failures += 1
                        # Alone, while the sink took other requests: in this round, or between this event's
                        # previous failed request and this one (a group left with only culprits).
                        failed_at = self.last_failed_at.get(key)
                        if rnd.successes or (
                            failed_before is not None and failed_at is not None and failed_at > failed_before
                        ):
                            self.isolated[key] = self.isolated.get(key, 0) + 1
                        proven = leaf.failures >= 2 and rnd.successes > leaf.successes_at_first
                        if probed_up:  # after this failure's evidence: the probe succeeded after it
                            rnd.sink_answered(success=True)
                        if proven or self.isolated.get(key, 0) >= self.max_attempts_per_event:
                            self._dead_letter(part[0], EventKeepsFailing(exc, leaf.failures), attempts)
                        else:
                            next_level.append(part)  # alone again, after its siblings
                        continue
                    if probed_up:
                        rnd.sink_answered(success=True)
                next_level.extend(_halves(part))
            level = next_level
        # Dead-lettered or held once the whole batch is in: other partitions' acceptances are the evidence.
        self.refused.extend((record, error, attempts) for record, error in refused_alone)

    async def _sink_is_up(self) -> bool:
        """Probe the sink with no event: an answer counts as a sink success (evidence for the culprits)."""
        probe = getattr(self.sink, "probe", None)
        if probe is None:  # a sink that cannot be probed: a round of failures is taken for an outage
            return False
        try:
            await probe()
        except TransientError as exc:
            log.info("sender %s: probe failed, the sink is down: %s", self.name, exc)
            return False
        self.sink_successes += 1
        self._sink_answered()
        return True

    def _outage(self, todo: list[Record]) -> None:
        """The round found the sink down: alone failures counted in it were the sink's, not the events'."""
        for record in todo:
            if record.outcome != Outcome.DELIVERED:
                self.isolated.pop(self._key(record), None)

    def _settle_refused(self, held_anyway: bool = False) -> SinkMisconfigured | None:
        """Dead-letter the events this batch's rounds found refused alone, unless the sink accepted no request
        of this batch and its recent answers (with earlier batches') hold `refuse_all_min` refusals, from two
        devices or more, and no acceptance: then the sink changed (schema, endpoint), the events did not; page,
        open the circuit and hold them (the returned error is raised). `held_anyway`: another partition failed
        and the batch is retried whole: the guard holds the refused events without paging on a maybe."""
        refused, self.refused = self.refused, []
        if not refused:
            return None
        counted = {answer[0] for answer in self.answers if answer is not None}
        for record, _, _ in refused:  # a held event refused again on a retry is no new answer
            if self._key(record) not in counted:
                self.answers.append((self._key(record), record.event.partition_key))
        recent = list(self.answers)
        if (
            not self.batch_accepted
            and None not in recent
            and len(recent) >= self.refuse_all_min
            and len({answer[1] for answer in recent if answer is not None}) >= 2
        ):
            held = SinkMisconfigured(
                f"sink {self.name}: its last {len(recent)} answers refused every event: {refused[0][1]}"
            )
            if held_anyway:
                return None  # retried with the failed partition; this guard decides again then
            self.refusing_all = True
            if self.breaker.open_now():
                self.circuit_gauge.labels(self.name).set(1)
            self.alerter.fire("sink_misconfigured", f"sink {self.name} refuses every event", key=self.name)
            return held
        if self.refusing_all:  # the refusals are the events' fault again: the sink answers, the episode ends
            self.refusing_all = False
            self._sink_answered()
        for record, error, attempts in refused:
            self._dead_letter(record, error, attempts)
        return None


@dataclass
class _Round:
    """One isolation round's requests: any success shows the sink is up."""

    started: float
    max_requests: int
    requests: int = 0
    successes: int = 0
    failures: int = 0
    consecutive: int = 0  # transient failures since the sink last answered
    retry_after: float | None = None
    backoff: Backoff = field(default_factory=lambda: Backoff(base_s=0.05, ceiling_s=2.0))

    def sink_answered(self, success: bool = False) -> None:
        self.consecutive = 0
        self.retry_after = None
        self.successes += success

    def failed(self, exc: TransientError) -> None:
        self.failures += 1
        self.consecutive += 1
        self.retry_after = exc.retry_after

    async def pause(self) -> None:
        """After a failure, wait (with jitter, at least Retry-After up to the ceiling) before the next request."""
        if self.consecutive:
            await asyncio.sleep(self.backoff.delay(self.consecutive, self.retry_after))


@dataclass
class _Leaf:
    """An event that failed alone in a round: dead-lettered only on evidence that it is the payload."""

    record: Record
    successes_at_first: int
    failures: int = 0


def _halves(part: list[Record]) -> list[list[Record]]:
    middle = len(part) // 2
    return [part[:middle], part[middle:]]
