"""Typed errors. Each carries the context an operator needs; none is ever swallowed with its offset."""

from __future__ import annotations

from typing import Any


class HifiError(Exception):
    """Base of every error Hifi raises on purpose."""


class ConfigError(HifiError):
    """The config file is invalid; `field` names the bad field as a dotted path."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"config: {field}: {problem}")
        self.field = field
        self.problem = problem


class InvalidEvent(HifiError):
    """A permanent, per-event problem: rejected at the collector or dead-lettered downstream."""

    def __init__(self, reason: str, detail: str = "", event_id: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.event_id = event_id


class TransientError(HifiError):
    """Worth retrying: broker, Redis or sink briefly unavailable. `retry_after` honours the peer's hint."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PartialDelivery(TransientError):
    """Part of a batch reached the destination before the rest failed transiently.

    `delivered` is what records that part (a sender's receipts): it is published even if the rest is
    never retried here, e.g. because the partitions moved to another worker.
    """

    def __init__(self, message: str, delivered: list[Any], retry_after: float | None = None) -> None:
        super().__init__(message, retry_after)
        self.delivered = delivered


class SinkThrottled(TransientError):
    """The sink answered 429: slow down (and wait at least `retry_after`)."""


class PermanentSinkError(HifiError):
    """The sink refused the batch for good (4xx other than 408/429): dead-letter, don't retry."""
