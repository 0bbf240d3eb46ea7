"""How the runner calls a stage's handler: transient errors retried with backoff while the batch's partitions
are owned, and an unexpected error isolated to the event that caused it (the rest of the batch passes)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import sentry_sdk
from aiokafka.structs import ConsumerRecord

from shared.dlq import DeadLetter
from shared.errors import HandledInPart, InvalidEvent, PermanentSinkError, TransientError
from shared.publish import Output
from shared.retry import Backoff
from shared.step import Handler, Ownership, Record, StepResult

log = logging.getLogger(__name__)


class Revoked(Exception):
    """The batch's partitions were revoked; `carried` already reached a destination."""

    def __init__(self, carried: list[Output]) -> None:
        super().__init__("partitions revoked")
        self.carried = carried


class _Unexpected(Exception):
    """Internal: the handler failed in a way retrying the batch won't fix."""


@dataclass
class RetryingStep:
    """Runs a stage's handler: retries transient errors with backoff while the batch's partitions are owned,
    and on an unexpected error handles the batch one by one so only the culprit is dead-lettered."""

    stage: str
    handler: Handler
    backoff: Backoff
    retries: Any  # the stage's retries counter (a prometheus child)
    # Told of each culprit before the batch's letters are durable (a handler that commits offsets itself).
    hold_dead_letters: Callable[[list[ConsumerRecord]], None] | None = None  # type: ignore[type-arg]

    async def __call__(self, records: list[Record], owner: Ownership, carried: list[Output]) -> StepResult:
        """Retry transient errors; on an unexpected error, handle one by one to isolate the culprit.

        `carried` collects the outputs of what already reached a destination (parts delivered before a
        partial failure, records handled one by one): a revocation (`Revoked`) publishes them with the batch
        given up.
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
        """Call until it succeeds, while `owner` holds the partitions; `Revoked` once it does not."""
        attempt = 0
        while True:
            if not owner.owned:
                raise Revoked(carried)
            attempt += 1
            try:
                return await call()
            except TransientError as exc:
                if isinstance(exc, HandledInPart):
                    carried.extend(exc.outputs)
                delay = self.backoff.delay(attempt, exc.retry_after)
                self.retries.inc()
                log.warning("%s: transient error (attempt %d), retrying in %.2fs: %s", self.stage, attempt, delay, exc)
                if not await owner.sleep(delay):
                    raise Revoked(carried) from None
            except (InvalidEvent, PermanentSinkError):
                raise _Unexpected() from None  # handlers dead-letter these themselves; a stray one is a bug
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("%s: unexpected error in handler", self.stage)
                raise _Unexpected() from exc
