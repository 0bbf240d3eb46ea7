"""Web views every service serves: /health, /ready, /metrics and /stats (JSON for `hifi up`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from faust import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared.metrics import StageMetrics


def add_common_views(app: Any, service: str, metrics: StageMetrics, stats: Callable[[], dict[str, Any]]) -> None:
    @app.page("/health")
    async def health(self: web.View, request: web.Request) -> web.Response:
        return self.json({"service": service, "status": "ok"})

    @app.page("/ready")
    async def ready(self: web.View, request: web.Request) -> web.Response:
        # Ready once the worker joined its group and recovered its tables (no recovery in flight).
        joined = app.consumer is not None and bool(app.consumer.assignment()) if app.agents else True
        recovering = bool(app.tables) and not app.tables.recovery.completed.is_set()
        ok = joined and not recovering and not app.rebalancing
        body = {"service": service, "ready": ok, "joined": joined, "recovering": recovering}
        return self.json(body, status=200 if ok else 503)

    @app.page("/metrics")
    async def prometheus(self: web.View, request: web.Request) -> web.Response:
        return self.bytes(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)

    @app.page("/stats")
    async def stats_view(self: web.View, request: web.Request) -> web.Response:
        return self.json({"service": service, **stats()})
