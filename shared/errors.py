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


class StateDirInUse(HifiError):
    """Another process holds this worker's state directory: two workers' standbys and owners would open each
    other's RocksDB stores (and crash on their locks)."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"state directory {path} is in use by another worker process: each worker needs its own data directory "
            "(HIFI_DATA_DIR), as each pod has its own volume; a shared volume cannot be scaled"
        )
        self.path = path


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


class HandledInPart(TransientError):
    """Part of a handled batch reached its destination before the rest failed transiently.

    `outputs` records that part (a sender's receipts): the runner publishes them even if the rest is
    never retried here, e.g. because the partitions moved to another worker.
    """

    def __init__(self, message: str, outputs: list[Any], retry_after: float | None = None) -> None:
        super().__init__(message, retry_after)
        self.outputs = outputs


class SinkThrottled(TransientError):
    """The sink answered 429: slow down (and wait at least `retry_after`)."""


class PermanentSinkError(HifiError):
    """The sink refused the request for good (a 4xx other than 408/429 and the sink-wide ones, 401/403/404/405/
    407/410/415):
    the sender isolates the events it is about and dead-letters only those."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SinkMisconfigured(TransientError):
    """The sink refuses every request (HTTP 401/403/404/405/407/410/415, a Redis auth error, OOM or a key of
    the wrong type, or recent answers that refused every event from two devices or more, see
    `SinkDelivery.answers`): not a fault of any event. Opens the circuit and pages (once per episode: only an
    accepted request closes it again); retried with backoff until fixed, never dead-lettered. `status` is the
    HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after)
        self.status = status


class PartialDelivery(TransientError):
    """The sink acknowledged some records of a batch (`delivered`: their indexes) and not the rest: mark
    the acknowledged ones delivered and retry only the others. `refused`: set when the sink refused one of
    the others for good (e.g. a record over the topic's size limit): isolate it instead of retrying."""

    def __init__(self, message: str, delivered: list[int], refused: PermanentSinkError | None = None) -> None:
        super().__init__(message)
        self.delivered = delivered
        self.refused = refused


class EventKeepsFailing(HifiError):
    """One event failed transiently `attempts` times while the sink accepted the others: dead-letter it."""

    def __init__(self, cause: BaseException, attempts: int) -> None:
        super().__init__(f"failed {attempts} times while the sink took other events; last: {cause}")
        self.cause = cause
        self.attempts = attempts
