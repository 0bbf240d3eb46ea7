"""The delivered ledger: checked before a delivery, marked after the sink acked (a replay then skips it)."""

from __future__ import annotations

import asyncio
import logging

import sentry_sdk

from shared.archive import REPLAY_FORCE
from shared.errors import (
    TransientError,
)
from shared.retry import Backoff
from shared.stage import Record

log = logging.getLogger(__name__)


class DeliveredLedgerMarks:
    """SinkDelivery's reads and writes of its delivered ledger (a mixin over its `ledger`, `ledger_outage`
    and `pass_through`)."""

    async def _ledger_seen(self, records: list[Record], keys: list[str]) -> list[bool]:
        try:
            seen = await self.ledger.seen(keys, records)
        except TransientError as exc:
            self.ledger_outage.failed(exc)
            if not self.pass_through:
                raise
            return [False] * len(records)
        self.ledger_outage.ok()
        return seen

    async def _mark_delivered(self, records: list[Record]) -> None:
        """The sink has acked: failing the batch now would deliver twice, so only this step is retried.

        Never raises: an event the sink acknowledged is delivered, whatever happens to the ledger.
        """
        forced = [r for r in records if self.replay_of.get(id(r.message)) == REPLAY_FORCE]
        keys = [self._key(r) for r in records] + [self._forced_key(r) for r in forced]
        backoff = Backoff()
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.ledger.mark(keys, [*records, *forced])
                self.ledger_outage.ok()
                return
            except TransientError as exc:
                self.ledger_outage.failed(exc)
                if self.pass_through:
                    return
                delay = backoff.delay(attempt)
                log.warning("sender %s: ledger write failed (attempt %d): %s", self.name, attempt, exc)
                await asyncio.sleep(delay)
            except Exception as exc:  # a bug: report it, keep the delivery
                log.exception("sender %s: ledger write failed; a replay of these events could re-deliver", self.name)
                sentry_sdk.capture_exception(exc)
                return
