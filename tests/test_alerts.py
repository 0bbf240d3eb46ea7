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


def test_a_captured_exception_carries_no_frame_locals():
    """Stack-frame locals would hold the event being handled (untransformed, PII): never sent."""
    receiver = SentryReceiver()
    try:
        init_sentry(receiver.dsn, "router", "test")

        def handle(event: dict[str, str]) -> None:
            email = event["email"]
            raise OverflowError(f"cannot handle {len(email)} characters")

        try:
            handle({"email": "@".join(["alice", "example.com"])})  # joined: the source lines Sentry sends lack it
        except OverflowError as exc:
            sentry_sdk.capture_exception(exc)
        sentry_sdk.flush(timeout=5)
        [event] = [e for e in receiver.events if e.get("exception")]
        frames = [f for v in event["exception"]["values"] for f in (v.get("stacktrace") or {}).get("frames", [])]
        assert frames and not any("vars" in f for f in frames)
        assert "alice@example.com" not in json.dumps(event)
    finally:
        sentry_sdk.init(dsn=None)
        receiver.close()
