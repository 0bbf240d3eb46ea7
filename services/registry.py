"""The registry of services: name -> build function, handed to `shared.service.run` by `services.cli`.
The layout (topics, groups, ports) is in `shared.pipeline`; adding a stage means an entry in each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.auditor.app import build as build_auditor
from services.collector.app import build as build_collector
from services.deduplicator.app import build as build_deduplicator
from services.enricher.app import build as build_enricher
from services.router.app import build as build_router
from services.sender.app import build as build_sender
from shared import pipeline

SERVICES: dict[str, Callable[[Any], Any]] = {
    pipeline.COLLECTOR.name: build_collector,
    pipeline.ENRICHER.name: build_enricher,
    pipeline.DEDUPLICATOR.name: build_deduplicator,
    pipeline.ROUTER.name: build_router,
    pipeline.SENDER.name: build_sender,
    pipeline.AUDITOR.name: build_auditor,
}
