"""The collector's admission of a request, up to `ingest`: the tenant's API key, its optional signature, the
body's size, arrival time, type and shape, and the tenant's rate. A request refused here gets a `RequestError`
answer (4xx) and none of its events reaches the producer.

`Admission` is a part of `Collector` (services/collector/app.py), which sets the keys, secrets and limiter
it reads and provides `ingest`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from typing import Any

import msgspec

from shared.codec import unique_pairs, unpack_client
from shared.config import HifiConfig
from shared.errors import ConfigError, InvalidEvent
from shared.ratelimit import TenantRateLimiter
from shared.service import ServiceContext

JSON_TYPES = ("application/json",)
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
BODY_TIMEOUT_S = 10.0  # a client that trickles its body (slowloris) is cut off
SIGNATURE_TOLERANCE_S = 300.0
# Bodies with more brackets go to the stdlib parser only: msgspec's nests 3 levels deeper before a
# RecursionError, so near Python's limit (~1,000 less the handler's stack) it would take what json refuses.
# 512 keeps about 400 frames of margin and the fast path for a batch of about 170 events of 3 brackets each.
FAST_JSON_MAX_BRACKETS = 512

_json_decoder = msgspec.json.Decoder()
_json_encoder = msgspec.json.Encoder()


class RequestError(Exception):
    def __init__(self, status: int, reason: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class Admission:
    """Collector's request checks and its POST /v1/events answer (see the module's docstring)."""

    # The collector's state these checks read (Collector sets them).
    ctx: ServiceContext
    config: HifiConfig
    keys: dict[str, str]
    secrets: dict[str, bytes]
    limiter: TenantRateLimiter | None

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

    def verify_signature(self, tenant: str, headers: Any, body: bytes, now: float) -> None:
        """Optional per tenant: X-Hifi-Signature = v1=hex(HMAC-SHA256(secret, "<timestamp>." + body)).

        The timestamp bounds replays to a few minutes; within them, event-id dedupe absorbs a replay.
        """
        secret = self.secrets.get(tenant)
        if secret is None:
            return
        stamp = headers.get("X-Hifi-Timestamp", "")
        given = headers.get("X-Hifi-Signature", "")
        try:
            sent_at = float(stamp)
        except ValueError:
            raise RequestError(401, "missing_signature", "send X-Hifi-Timestamp and X-Hifi-Signature") from None
        if abs(now - sent_at) > SIGNATURE_TOLERANCE_S:
            raise RequestError(401, "stale_signature", f"timestamp more than {SIGNATURE_TOLERANCE_S:.0f}s from now")
        expected = "v1=" + hmac.new(secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, given):
            raise RequestError(401, "bad_signature", "signature does not match the body")

    async def check_rate(self, tenant: str, cost: int) -> None:
        limit = self.ctx.config.tenants[tenant].rate_limit
        if limit is None or self.limiter is None:
            return
        if cost > limit.burst:
            raise RequestError(413, "batch_exceeds_burst", f"{cost} events > burst of {limit.burst}")
        wait = await self.limiter.take(tenant, limit, cost)
        if wait is not None:
            raise RequestError(429, "rate_limited", f"over {limit.events_per_s:g} events/s", retry_after=wait)

    def parse_body(self, content_type: str, body: bytes) -> list[Any]:
        ctype = content_type.split(";")[0].strip().lower()
        try:
            if ctype in JSON_TYPES:
                data = decode_json(body)
            elif ctype in MSGPACK_TYPES:
                data = unpack_client(body)
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

    async def respond(self, request: Any, max_body: int) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        """POST /v1/events: the status, body and headers of the answer to an aiohttp request."""
        try:
            tenant = self.authenticate(request.headers)
            if (request.content_length or 0) > max_body:
                raise RequestError(413, "body_too_large", f"body > {max_body} bytes")
            try:
                async with asyncio.timeout(BODY_TIMEOUT_S):
                    body = await _read_limited(request, max_body)
            except TimeoutError:
                raise RequestError(408, "body_timeout", f"body not received in {BODY_TIMEOUT_S:.0f}s") from None
            self.verify_signature(tenant, request.headers, body, time.time())
            items = self.parse_body(request.headers.get("Content-Type", ""), body)
            await self.check_rate(tenant, len(items))
            user_agent = _header_text(request.headers.get("User-Agent"))
            status, answer = await self.ingest(tenant, items, user_agent, request.remote)
        except RequestError as exc:
            headers = {"Retry-After": f"{exc.retry_after:.3f}"} if exc.retry_after is not None else None
            return exc.status, {"error": exc.reason, "detail": exc.detail}, headers
        except TimeoutError:
            detail = "the broker did not acknowledge in time"
            return 503, {"error": "broker_unavailable", "detail": detail}, {"Retry-After": "1"}
        return status, answer, {"Retry-After": "1"} if status == 503 else None


def signing_secrets(config: HifiConfig) -> dict[str, bytes]:
    secrets = {}
    for tenant in config.tenants.values():
        if tenant.signing_secret_env:
            value = os.environ.get(tenant.signing_secret_env)
            if not value:
                raise ConfigError(
                    f"tenants.{tenant.name}.signing_secret_env", f"{tenant.signing_secret_env} is not set"
                )
            secrets[tenant.name] = value.encode()
    return secrets


def _header_text(value: str | None) -> str | None:
    """A header as valid text: aiohttp decodes non-UTF-8 bytes as lone surrogates, which no encoder takes."""
    if value is None:
        return None
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def decode_json(body: bytes) -> Any:
    """A JSON body as `json.loads` with a repeated key refused and NaN/Infinity literals rejected decodes it,
    errors included, in about a third of the CPU for the bodies clients send.

    msgspec decodes first; the stdlib decodes whatever msgspec refuses (so every error message is the stdlib's,
    and what only the stdlib takes, UTF-16 or a BOM or a lone surrogate or 1e400 (inf), is taken as before) and
    any body msgspec may have read otherwise: a repeated key, of which msgspec keeps the last. A body that is
    the decoded value re-encoded has none (compact JSON as msgspec, JavaScript and our bench write it).
    Otherwise every `:` of a body is a member's or inside a string, so a body whose colons outnumber the
    re-encoded value's lost a member; an escaped colon (\\u003a) would hide one, so it goes to the stdlib too.
    """
    # One pass over the body: each scan costs about as much as msgspec's decoding of the body.
    if len(body) - len(body.translate(None, b"[{")) <= FAST_JSON_MAX_BRACKETS:
        try:
            data = _json_decoder.decode(body)
            canonical = _json_encoder.encode(data)
        except (msgspec.DecodeError, ValueError, RecursionError, OverflowError, TypeError):
            pass  # the stdlib's answer below, with its error message
        else:
            if canonical == body or (canonical.count(b":") == body.count(b":") and b"\\u003" not in body):
                return data
    return json.loads(body, parse_constant=_reject_constant, object_pairs_hook=unique_pairs)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


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
