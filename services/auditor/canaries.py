"""Canaries: every `canary_interval_s` one flagged event per tenant, written to the raw topic as the collector
would (with its `accepted` tally), so lag and loss stay measured when traffic is quiet."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from shared.audit import accepted_tally, bucket_of
from shared.codec import encode_event
from shared.config import HifiConfig
from shared.event import Event, now_ms
from shared.topics import Topics

log = logging.getLogger(__name__)


class Canaries:
    def __init__(self, config: HifiConfig, topics: Topics) -> None:
        self.config = config
        self.audit = config.audit
        self.topics = topics
        self.sent = 0

    async def send(self, producer: Any) -> None:
        """One canary per tenant with sinks; it reaches each of them, so every tenant/sink pair is traced."""
        ingest = now_ms()
        bucket = bucket_of(ingest, self.audit.bucket_s)
        for tenant in self.config.tenants.values():
            if not tenant.sinks:
                continue
            event = Event(
                event_id=f"canary-{uuid.uuid4().hex}",
                type="hifi.canary",
                ts=ingest,
                tenant=tenant.name,
                device_id="hifi-canary",
                ingest_ts=ingest,
                canary=True,
            )
            event.stamp("collector")
            try:
                sent = await producer.send(self.topics.raw, event.partition_key, encode_event(event), None, None, None)
                await sent
                tally = accepted_tally("canary", tenant.name, bucket, 1)
                await (await producer.send(self.topics.tallies, b"canary", tally, None, None, None))
                self.sent += 1
            except Exception as exc:
                log.warning("auditor: canary for %s not sent: %r", tenant.name, exc)
