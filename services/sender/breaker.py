"""Sink isolation inside one sender: a circuit breaker, and AIMD throttling when the sink says 429.

Each sink also has its own process, consumer group and topic, so a slow or dead sink holds back
only its own partitions; these two keep the sender from hammering a sink that is already failing. A sink-wide refusal
(401/403/404/405/407/410/415) opens the circuit at once (`open_now`).
One batch per sender is in hand at a time, but its source partitions are delivered concurrently, so several
requests can be in flight at once; an isolation round asks the breaker only before its first request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from shared.errors import TransientError


class CircuitOpen(TransientError):
    """Not sent: the breaker is open. Retried after the breaker's probe delay."""


@dataclass
class CircuitBreaker:
    failure_threshold: int = 5
    reset_after_s: float = 5.0
    state: str = "closed"  # closed -> open -> half_open -> closed | open
    failures: int = 0
    opened_at: float = 0.0
    opened_count: int = 0

    def before_call(self) -> None:
        if self.state == "open":
            waited = time.monotonic() - self.opened_at
            if waited < self.reset_after_s:
                raise CircuitOpen("circuit open", retry_after=self.reset_after_s - waited)
            self.state = "half_open"  # let one probe through

    def on_success(self) -> None:
        self.state = "closed"
        self.failures = 0

    def open_now(self) -> bool:
        """Open at once (the sink refuses every request); return True if it was not open already."""
        opened = self.state != "open"
        self.state = "open"
        self.opened_at = time.monotonic()
        self.failures = max(self.failures, self.failure_threshold)
        if opened:
            self.opened_count += 1
        return opened

    def on_failure(self) -> bool:
        """Record a failure; return True if this one opened the circuit."""
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.failure_threshold:
            opened = self.state != "open"
            self.state = "open"
            self.opened_at = time.monotonic()
            if opened:
                self.opened_count += 1
            return opened
        return False


@dataclass
class Throttle:
    """Pacing between batches, driven by 429 answers: the gap doubles (at least to Retry-After) on
    each 429 and shrinks by 30 % on each success, so a sink that recovers is back to full speed
    within a dozen batches rather than minutes."""

    min_interval_s: float = 0.0
    max_interval_s: float = 10.0
    interval_s: float = 0.0
    last_send: float = 0.0

    async def wait_turn(self) -> None:
        if self.interval_s > 0:
            delay = self.last_send + self.interval_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        self.last_send = time.monotonic()

    def on_throttled(self, retry_after: float | None) -> None:
        self.interval_s = min(self.max_interval_s, max(self.interval_s * 2, 0.05, retry_after or 0.0))

    def on_success(self) -> None:
        shrunk = self.interval_s * 0.7
        self.interval_s = shrunk if shrunk > max(0.01, self.min_interval_s) else self.min_interval_s
