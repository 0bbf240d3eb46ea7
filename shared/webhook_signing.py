"""Standard Webhooks signatures (standardwebhooks.com), for the webhook sink and for receivers.

A signed request carries `webhook-id` (the same on every retry of the same request; a batch split after a
refusal is re-sent as new requests with new ids, so receivers dedupe on each event's `idempotency_key`),
`webhook-timestamp`
(Unix seconds of this attempt) and `webhook-signature`: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`,
one per secret, space separated, so a receiver holding either secret verifies during a rotation.
Secrets are `whsec_` + standard base64 of the key bytes (padding optional; URL-safe `-`/`_` refused).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence

from shared.errors import HifiError

SECRET_PREFIX = "whsec_"
TOLERANCE_S = 300  # the spec's replay window: a timestamp further than this from now is refused


class SignatureError(HifiError):
    """A request whose signature headers are missing, stale or match none of the receiver's secrets."""


def parse_secret(value: str) -> bytes:
    """`whsec_<base64>` -> key bytes; ValueError says what is wrong (never the secret). Strict: a lenient
    decode drops characters outside the alphabet (URL-safe `-`/`_`) and yields another key, which every
    receiver would refuse."""
    if not value.startswith(SECRET_PREFIX):
        raise ValueError(f"must start with {SECRET_PREFIX!r} (Standard Webhooks secret format)")
    encoded = value[len(SECRET_PREFIX) :].rstrip("=")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"not standard base64 after {SECRET_PREFIX!r} (URL-safe '-' or '_', spaces or other characters)"
        ) from None
    if len(key) < 16:
        raise ValueError("shorter than 16 bytes (128 bits)")
    return key


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_headers(keys: Sequence[bytes], msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The three headers for one attempt: one signature per key (two during a rotation)."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": " ".join(signature(k, msg_id, ts, body) for k in keys),
    }


def verify(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    now: float | None = None,
    tolerance_s: int = TOLERANCE_S,
) -> str:
    """What a receiver does: check the timestamp, then that some `v1` signature matches one of its secrets
    (constant-time compare). Returns the webhook-id (for logs: a retry of the same request repeats it, but a
    batch split after a refusal is re-sent under new ids); dedupe on each event's `idempotency_key`, which
    never changes. Raises SignatureError otherwise.
    `headers` must look names up case-insensitively (aiohttp's and requests' headers do)."""
    msg_id, stamp, signatures = (headers.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not msg_id or not stamp or not signatures:
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        ts = int(stamp)
    except ValueError:
        raise SignatureError("webhook-timestamp is not an integer") from None
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        raise SignatureError("webhook-timestamp outside the tolerance (a replay, or a clock off)")
    offered = [s.split(",", 1)[1] for s in signatures.split(" ") if s.startswith("v1,")]
    for secret in secrets:
        expected = signature(parse_secret(secret), msg_id, ts, body).split(",", 1)[1]
        if any(hmac.compare_digest(expected, candidate) for candidate in offered):
            return msg_id
    raise SignatureError("no signature matches")
