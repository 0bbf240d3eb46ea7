"""collector: HTTP in, raw topic out. An event is reported accepted only once the broker has it.

POST /v1/events  headers: X-Api-Key (or Authorization: Bearer KEY), Content-Type json or msgpack
body: a list of events, or {"events": [...]}. Answer: {"accepted": [ids], "rejected": [{...}]}.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from typing import Any

from faust import web

from shared.codec import encode_event, unpack
from shared.errors import InvalidEvent
from shared.event import Event, EventValidator, now_ms
from shared.service import ServiceContext
from shared.web import add_common_views

log = logging.getLogger(__name__)

WEB_PORT = 8080
JSON_TYPES = ("application/json",)
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
PRODUCE_TIMEOUT_S = 10.0


class RequestError(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


class Collector:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.validator = EventValidator(ctx.config.limits)
        self.raw_topic = ctx.topics.raw
        self.keys = {h: t.name for t in ctx.config.tenants.values() for h in t.api_key_hashes}

    def authenticate(self, headers: Any) -> str:
        key = headers.get("X-Api-Key")
        if key is None:
            auth = headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                key = auth[7:]
        if not key:
            raise RequestError(401, "missing_api_key", "send the tenant's key in X-Api-Key")
        digest = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
        # Compare against every hash in constant time, so timing reveals nothing about near-misses.
        tenant = None
        for known, name in self.keys.items():
            if hmac.compare_digest(known, digest):
                tenant = name
        if tenant is None:
            raise RequestError(401, "invalid_api_key", "unknown API key")
        return tenant

    def parse_body(self, content_type: str, body: bytes) -> list[Any]:
        ctype = content_type.split(";")[0].strip().lower()
        try:
            if ctype in JSON_TYPES:
                data = json.loads(body, parse_constant=_reject_constant)
            elif ctype in MSGPACK_TYPES:
                data = unpack(body)
            else:
                raise RequestError(415, "unsupported_content_type", "use application/json or application/msgpack")
        except (ValueError, RecursionError, InvalidEvent) as exc:
            raise RequestError(400, "malformed_body", str(exc)[:200]) from None
        if isinstance(data, dict) and set(data) == {"events"}:
            data = data["events"]
        if not isinstance(data, list):
            raise RequestError(400, "malformed_body", 'expected a list of events or {"events": [...]}')
        if not data:
            raise RequestError(400, "empty_batch", "no events in the batch")
        if len(data) > self.config.limits.max_events_per_batch:
            raise RequestError(
                413, "too_many_events", f"{len(data)} > {self.config.limits.max_events_per_batch} events per batch"
            )
        return data

    async def ingest(
        self, tenant: str, items: list[Any], user_agent: str | None, ip: str | None
    ) -> tuple[int, dict[str, Any]]:
        metrics = self.ctx.metrics
        accepted: list[str] = []
        rejected: list[dict[str, Any]] = []
        pending: list[tuple[int, Event, asyncio.Future[Any]]] = []
        ingest_ts = now_ms()
        producer = self.ctx.app.producer
        for index, item in enumerate(items):
            try:
                event = self.validator.validate(item, tenant)
            except InvalidEvent as exc:
                rejected.append({"index": index, "event_id": exc.event_id, "reason": exc.reason, "detail": exc.detail})
                metrics.rejected.labels(tenant, exc.reason).inc()
                continue
            if user_agent and "user_agent" not in event.context:
                event.context["user_agent"] = user_agent
            if ip and "ip" not in event.context:
                event.context["ip"] = ip
            event.ingest_ts = ingest_ts
            event.stamp("collector")
            future = await producer.send(self.raw_topic, event.partition_key, encode_event(event), None, None, None)
            pending.append((index, event, future))
        unavailable = 0
        if pending:
            done = (
                await asyncio.wait_for(
                    asyncio.gather(*(f for _, _, f in pending), return_exceptions=True), PRODUCE_TIMEOUT_S
                )
                if pending
                else []
            )
            for (index, event, _), outcome in zip(pending, done, strict=True):
                if isinstance(outcome, BaseException):
                    unavailable += 1
                    rejected.append(
                        {
                            "index": index,
                            "event_id": event.event_id,
                            "reason": "broker_unavailable",
                            "detail": type(outcome).__name__,
                        }
                    )
                else:
                    accepted.append(event.event_id)
        metrics.accepted.labels(tenant).inc(len(accepted))
        rejected.sort(key=lambda r: r["index"])
        body = {"accepted": accepted, "rejected": rejected}
        if unavailable:
            return 503, body
        if not accepted:
            return 422, body
        return 200, body


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def build(ctx: ServiceContext) -> Any:
    app = ctx.create_app("hifi-collector", WEB_PORT)
    collector = Collector(ctx)
    max_body = ctx.config.limits.max_body_bytes

    @app.page("/v1/events")
    class Events(web.View):
        async def post(self, request: web.Request) -> web.Response:
            try:
                tenant = collector.authenticate(request.headers)
                if (request.content_length or 0) > max_body:
                    raise RequestError(413, "body_too_large", f"body > {max_body} bytes")
                body = await _read_limited(request, max_body)
                items = collector.parse_body(request.headers.get("Content-Type", ""), body)
                status, answer = await collector.ingest(
                    tenant, items, request.headers.get("User-Agent"), request.remote
                )
            except RequestError as exc:
                return self.json({"error": exc.reason, "detail": exc.detail}, status=exc.status)
            except TimeoutError:
                return self.json(
                    {"error": "broker_unavailable", "detail": "the broker did not acknowledge in time"},
                    status=503,
                    headers={"Retry-After": "1"},
                )
            headers = {"Retry-After": "1"} if status == 503 else None
            return self.json(answer, status=status, headers=headers)

    def stats() -> dict[str, Any]:
        m = ctx.metrics
        return {"accepted": m.total(m.accepted), "rejected": m.total(m.rejected)}

    add_common_views(app, "collector", ctx.metrics, stats)
    return app


async def _read_limited(request: Any, limit: int) -> bytes:
    """Read at most `limit` bytes, whatever Content-Length claimed (chunked bodies have none)."""
    chunks = []
    size = 0
    async for chunk in request.content.iter_chunked(65_536):
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body_too_large", f"body > {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
