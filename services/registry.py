"""The registry of services: name -> build function. `hifi run NAME` looks it up here; adding a
stage means one entry, not a copy of a service."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.auditor.app import build as build_auditor
from services.collector.app import build as build_collector
from services.deduplicator.app import build as build_deduplicator
from services.enricher.app import build as build_enricher
from services.router.app import build as build_router
from services.sender.app import build as build_sender

SERVICES: dict[str, Callable[[Any], Any]] = {
    "collector": build_collector,
    "enricher": build_enricher,
    "deduplicator": build_deduplicator,
    "router": build_router,
    "sender": build_sender,
    "auditor": build_auditor,
}

PIPELINE = ("collector", "enricher", "deduplicator", "router", "sender", "auditor")
