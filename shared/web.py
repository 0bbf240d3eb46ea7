"""Web views every service serves: /health, /ready, /metrics and /stats (JSON for `hifi up`).

/health, /ready and /metrics are open (probes and Prometheus). Every other view needs
`Authorization: Bearer <HIFI_READ_TOKEN>` (or the admin token); admin actions need HIFI_ADMIN_TOKEN.
With no token configured, those views answer only on a loopback web host (local development).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from faust import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared.config import Settings
from shared.metrics import StageMetrics

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# aiohttp refuses a charset inside content_type (it adds its own); prometheus-client's constant has one.
PROMETHEUS_CONTENT_TYPE = "; ".join(p.strip() for p in CONTENT_TYPE_LATEST.split(";") if "charset" not in p)


def denied(view: web.View, request: web.Request, settings: Settings, admin: bool = False) -> web.Response | None:
    """None if the request may see this view, else the 401/403 answer to send."""
    tokens = [settings.admin_token] if admin else [settings.read_token, settings.admin_token]
    tokens = [t for t in tokens if t]
    if not tokens:
        if settings.web_host in LOOPBACK and not admin:
            return None
        return view.json({"error": "forbidden", "detail": "set HIFI_READ_TOKEN / HIFI_ADMIN_TOKEN"}, status=403)
    given = request.headers.get("Authorization", "")
    given = given[7:] if given.startswith("Bearer ") else ""
    if any(hmac.compare_digest(given.encode(), t.encode()) for t in tokens):
        return None
    return view.json({"error": "unauthorized", "detail": "bearer token required"}, status=401)


def add_common_views(
    app: Any,
    service: str,
    metrics: StageMetrics,
    stats: Callable[[], dict[str, Any]],
    settings: Settings,
    ready: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """`ready`: a stage's readiness (joined its group, state restored; the collector: producing); without it,
    ready once serving."""

    @app.page("/health")
    async def health(self: web.View, request: web.Request) -> web.Response:
        return self.json({"service": service, "status": "ok"})

    @app.page("/ready")
    async def ready_view(self: web.View, request: web.Request) -> web.Response:
        state = ready() if ready is not None else {}
        ok = bool(state.get("joined", True)) and bool(state.get("producing", True))
        return self.json({"service": service, "ready": ok, **state}, status=200 if ok else 503)

    @app.page("/metrics")
    async def prometheus(self: web.View, request: web.Request) -> web.Response:
        return self.bytes(generate_latest(metrics.registry), content_type=PROMETHEUS_CONTENT_TYPE)

    @app.page("/stats")
    async def stats_view(self: web.View, request: web.Request) -> web.Response:
        refused = denied(self, request, settings)
        return refused or self.json({"service": service, **stats()})


def redact(value: Any, fields: set[str]) -> Any:
    """Mask configured payload fields, at any depth, before a view shows an event."""
    if isinstance(value, dict):
        return {k: "[redacted]" if k in fields else redact(v, fields) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, fields) for v in value]
    return value


def redact_failed(record: dict[str, Any], fields: set[str]) -> dict[str, Any]:
    """A failed record to show: its event masked, and each violation whose message could quote a masked
    value (the value at its pointer is, or holds at any depth, a masked field: a `maxProperties` or `not`
    at /payload quotes the whole object) reduced to its pointer and rule."""
    event = record.get("event")
    shown = {**record, "event": redact(event, fields)}
    if not fields:
        return shown
    violations = []
    for violation in record.get("violations", []):
        at = str(violation.get("pointer", ""))
        if _holds_masked(event, at, fields):
            violation = {**violation, "message": f"[redacted] {violation.get('rule')} at {at or '/'}"}
        violations.append(violation)
    shown["violations"] = violations
    return shown


def _holds_masked(document: Any, at: str, fields: set[str]) -> bool:
    """Whether the value at JSON pointer `at` is a masked field, is inside one, or holds one at any depth."""
    node = document
    for token in at.split("/")[1:] if at else []:
        name = token.replace("~1", "/").replace("~0", "~")
        if name in fields:
            return True
        if isinstance(node, dict) and name in node:
            node = node[name]
        elif isinstance(node, list) and name.isdigit() and int(name) < len(node):
            node = node[int(name)]
        else:
            return True  # a pointer we cannot follow: assume the worst
    return redact(node, fields) != node


def add_dlq_views(app: Any, stage: str, queues: Any, settings: Settings) -> None:
    """GET /dlq (read token): this stage's dead letters. POST /dlq/replay (admin token): replay them."""
    fields = {f.strip() for f in settings.redact_fields.split(",") if f.strip()}

    @app.page("/dlq")
    async def dlq_list(self: web.View, request: web.Request) -> web.Response:
        refused = denied(self, request, settings)
        if refused is not None:
            return refused
        limit = max(1, min(int(request.query.get("limit", "20")), 500))
        letters = await queues.read(stage, limit)
        for letter in letters:
            letter.pop("original_value", None)  # raw bytes could hold anything; the decoded form is redacted
            if isinstance(letter.get("original"), dict):
                letter["original"] = redact(letter["original"], fields)
        counts = await queues.counts()
        return self.json({"stage": stage, "count": counts.get(stage, 0), "letters": letters})

    @app.page("/dlq/replay")
    class Replay(web.View):
        async def post(self, request: web.Request) -> web.Response:
            refused = denied(self, request, settings, admin=True)
            if refused is not None:
                return refused
            rate = float(request.query.get("rate", "100"))
            limit = int(request.query["limit"]) if "limit" in request.query else None
            replayed = await queues.replay(stage, rate, limit)
            return self.json({"stage": stage, "replayed": replayed})


def add_failed_views(app: Any, failed: Any, settings: Settings) -> None:
    """GET /failed?tenant=T[&type=X][&limit=N] (read token): a tenant's quarantined events, redacted.

    The event is masked like every view (HIFI_REDACT_FIELDS), and so are the violations' messages that
    could quote a masked value (`redact_failed`). Each record's `replayed` says whether a replay sent it; if
    the broker cannot tell, it is null and `replayed_unknown` says why."""
    fields = {f.strip() for f in settings.redact_fields.split(",") if f.strip()}

    @app.page("/failed")
    async def failed_list(self: web.View, request: web.Request) -> web.Response:
        refused = denied(self, request, settings)
        if refused is not None:
            return refused
        tenant = request.query.get("tenant", "")
        if tenant not in failed.tenants:
            return self.json({"error": "unknown_tenant", "detail": f"tenants: {', '.join(failed.tenants)}"}, status=404)
        try:
            limit = max(1, min(int(request.query.get("limit", "50")), 500))
        except ValueError:
            return self.json({"error": "bad_limit", "detail": "limit must be an integer"}, status=400)
        view = await failed.view(tenant, request.query.get("type") or None, limit)
        view["failed"] = [redact_failed(record, fields) for record in view["failed"]]
        return self.json(view)
