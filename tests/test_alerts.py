"""Alerts page through Sentry: a real sentry-sdk sends to a local envelope endpoint; each outage
episode produces exactly one event with a stable fingerprint, and no secret or payload in it."""

from __future__ import annotations

import json
import time

import sentry_sdk

from shared.alerts import Alerter, OutageClock
from shared.sentry import init_sentry
from tests.helpers import SentryReceiver


def test_an_outage_pages_once_per_episode_with_a_stable_fingerprint():
    receiver = SentryReceiver()
    try:
        init_sentry(receiver.dsn, "deduplicator", "test")
        clock = OutageClock(Alerter("deduplicator"), "dedupe_store_unreachable", "the dedupe store", alert_after_s=0.05)
        for _ in range(2):  # two episodes
            for _ in range(5):
                clock.failed(ConnectionError("redis://:hunter2@db:6379 refused; payload={'x': 1}"))
                time.sleep(0.03)
            clock.ok()
        sentry_sdk.flush(timeout=5)
        events = receiver.events
        assert len(events) == 2, events  # once per episode, not once per retry
        assert all(e["fingerprint"] == ["hifi", "dedupe_store_unreachable", "deduplicator"] for e in events)
        assert events[0]["tags"]["service"] == "deduplicator" and events[0]["level"] == "error"
        assert "hunter2" not in json.dumps(events), "URL credentials must not reach Sentry"
    finally:
        sentry_sdk.init(dsn=None)
        receiver.close()
