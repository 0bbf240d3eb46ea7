"""The webhook sink: POST a batch as JSON, signed (Standard Webhooks) when secrets are configured."""

from __future__ import annotations

import base64
import hashlib
import os

import aiohttp
import msgspec

from shared.config import SinkConfig
from shared.errors import (
    ConfigError,
    PermanentSinkError,
    SinkMisconfigured,
    SinkThrottled,
    TransientError,
)
from shared.event import Event
from shared.webhook_signing import parse_secret, sign_headers

from .sinks import SINK_WIDE_STATUSES, Source, sink_record

JSON_UTF8 = "application/json; charset=utf-8"  # the body is raw UTF-8 (msgspec), not \u escapes


class WebhookSink:
    """POST {"sink", "events": [...]} as JSON. 2xx is an ack; 408, 429 and 5xx are retried
    (honouring Retry-After); 401/403/404/405/407/410/415 mean the sink is misconfigured (retried, paged);
    any other 4xx refuses the request's events. A request re-sent after a split carries a new batch
    Idempotency-Key header (its events differ); each event's own `idempotency_key` never changes.
    With `signing_secret_env`, each request is signed per Standard Webhooks (`shared/webhook_signing.py`):
    `webhook-id` is `msg_` + the batch key (the same on a retry of the same batch, new after a split: receivers
    dedupe on each event's `idempotency_key`). `headers_env` and `auth`
    add headers from secrets."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self.url = config.options["url"]
        self.headers = {**(config.options.get("headers") or {}), **webhook_secret_headers(config)}
        self.signing_keys = webhook_signing_keys(config)
        self.session: aiohttp.ClientSession | None = None

    def _signed(self, msg_id: str, body: bytes) -> dict[str, str]:
        """Standard Webhooks headers for this attempt (a fresh timestamp; the same id on every retry)."""
        return sign_headers(self.signing_keys, msg_id, body) if self.signing_keys else {}

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout_s))

    async def deliver_batch(self, events: list[Event], source: Source | None = None) -> None:
        assert self.session is not None
        records = [sink_record(self.config.name, e) for e in events]
        batch_key = hashlib.sha256("\n".join(r["idempotency_key"] for r in records).encode()).hexdigest()
        # Compact UTF-8 JSON (msgspec: a fifth of the sender's CPU went to json.dumps); what is signed is
        # exactly what is sent.
        body = msgspec.json.encode({"sink": self.config.name, "events": records})
        headers = {
            "Content-Type": JSON_UTF8,
            "Idempotency-Key": batch_key,
            **self.headers,
            **self._signed(f"msg_{batch_key[:32]}", body),
        }
        try:
            async with self.session.post(self.url, data=body, headers=headers) as resp:
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                text = (await resp.text())[:200] if status >= 300 else ""
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransientError(f"webhook {self.config.name}: {type(exc).__name__}: {exc}") from exc
        if 200 <= status < 300:
            return
        if status == 429:
            raise SinkThrottled(f"webhook {self.config.name}: HTTP 429 {text}", retry_after)
        if status == 408 or status >= 500:
            raise TransientError(f"webhook {self.config.name}: HTTP {status} {text}", retry_after)
        if status in SINK_WIDE_STATUSES:
            raise SinkMisconfigured(f"webhook {self.config.name}: HTTP {status} {text}", status, retry_after)
        raise PermanentSinkError(f"webhook {self.config.name}: HTTP {status} {text}", status)

    async def probe(self) -> None:
        """POST a request with no events: any answer but 408, 429 or 5xx means the sink is up."""
        assert self.session is not None
        body = msgspec.json.encode({"sink": self.config.name, "events": []})
        try:
            probe_headers = {"Content-Type": JSON_UTF8, **self.headers, **self._signed("msg_probe", body)}
            async with self.session.post(self.url, data=body, headers=probe_headers) as resp:
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransientError(f"webhook {self.config.name} probe: {type(exc).__name__}: {exc}") from exc
        if status in (408, 429) or status >= 500:
            raise TransientError(f"webhook {self.config.name} probe: HTTP {status}")

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _secret_env(config: SinkConfig, name: str, field: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"sinks.{config.name}.{field}", f"environment variable {name} is not set")
    return value


def webhook_signing_keys(config: SinkConfig) -> list[bytes]:
    """The keys of `signing_secret_env` (new first, then the one being retired), checked at start-up."""
    keys = []
    for i, name in enumerate(config.options.get("signing_secret_env") or []):
        field = f"signing_secret_env[{i}]"
        try:
            keys.append(parse_secret(_secret_env(config, name, field)))
        except ValueError as exc:
            raise ConfigError(f"sinks.{config.name}.{field}", f"environment variable {name}: {exc}") from None
    return keys


def webhook_secret_headers(config: SinkConfig) -> dict[str, str]:
    """`headers_env` and `auth`, read from the environment at start-up: a missing variable names its field."""
    headers = {
        header: _secret_env(config, name, f"headers_env.{header}")
        for header, name in (config.options.get("headers_env") or {}).items()
    }
    auth = config.options.get("auth")
    if auth and auth["type"] == "bearer":
        headers["Authorization"] = "Bearer " + _secret_env(config, auth["token_env"], "auth.token_env")
    elif auth:
        user = auth.get("username") or _secret_env(config, auth.get("username_env", ""), "auth.username_env")
        password = _secret_env(config, auth["password_env"], "auth.password_env")
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return headers


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff
