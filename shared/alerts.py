"""Alerts that page through Sentry: one event per episode, with a stable fingerprint.

An alert fires once when its condition starts and is re-armed when the condition clears, so a
flapping sink or a long Redis outage pages once, not once per retry.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import sentry_sdk

from shared.sentry import mask_secrets

log = logging.getLogger(__name__)


@dataclass
class Alerter:
    service: str
    active: dict[tuple[str, ...], float] = field(default_factory=dict)
    fired: list[dict[str, Any]] = field(default_factory=list)

    def fire(self, name: str, message: str, level: str = "error", key: str = "", **context: Any) -> bool:
        """Send the alert unless this (name, key) episode already fired; return whether it was sent."""
        fingerprint = ("hifi", name, self.service, key) if key else ("hifi", name, self.service)
        if fingerprint in self.active:
            return False
        self.active[fingerprint] = time.time()
        message = mask_secrets(message)
        # Warning, not error: Sentry's logging integration would turn an error log into a second page.
        log.warning("ALERT %s: %s", name, message)
        with sentry_sdk.new_scope() as scope:
            scope.fingerprint = list(fingerprint)
            scope.set_tag("alert", name)
            scope.set_tag("service", self.service)
            for k, v in context.items():
                scope.set_extra(k, v)
            sentry_sdk.capture_message(f"{name}: {message}", level=level)  # type: ignore[arg-type]
        self.fired.append({"name": name, "key": key, "message": message, "level": level})
        return True

    def resolve(self, name: str, key: str = "") -> None:
        fingerprint = ("hifi", name, self.service, key) if key else ("hifi", name, self.service)
        if self.active.pop(fingerprint, None) is not None:
            log.info("resolved %s %s", name, key)


@dataclass
class OutageClock:
    """Tracks how long a dependency has been failing; `alert_after_s` of failure raises an alert."""

    alerter: Alerter
    name: str
    what: str
    alert_after_s: float = 30.0
    since: float | None = None

    def failed(self, error: Exception) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
        elif now - self.since >= self.alert_after_s:
            self.alerter.fire(self.name, f"{self.what} unreachable for {now - self.since:.0f}s: {error}")

    def ok(self) -> None:
        if self.since is not None:
            self.since = None
            self.alerter.resolve(self.name)
