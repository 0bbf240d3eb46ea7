"""An example receiver of signed webhooks (README "Signed webhooks"): verify, then take the events.

It checks the `Authorization` header it expects (if any), then the Standard Webhooks signature against its
secrets (two during a rotation), and answers 401 to anything else, so the sender pages instead of
dead-lettering. It keeps each event once per `idempotency_key` (`events_by_key`), not per webhook-id: a
batch split after a refusal arrives again as new requests with new ids. Tests use it as the receiving end;
`verify` plus that dedupe is all a real receiver needs.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from devtools.webhook import WebhookReceiver
from shared.webhook_signing import SignatureError, verify


@dataclass
class SignedWebhookReceiver(WebhookReceiver):
    secrets: list[str] = field(default_factory=list)  # `whsec_...`, as the sender's environment holds them
    authorization: str | None = None  # the exact Authorization header to expect, if any
    refused_signatures: list[str] = field(default_factory=list)  # why each refused request was refused
    message_ids: list[str] = field(default_factory=list)  # webhook-id of each verified request
    events_by_key: dict[str, dict[str, Any]] = field(default_factory=dict)  # what a receiver stores: once per key

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()  # the raw bytes: re-serialised JSON would not match the signature
        if self.authorization is not None and not hmac.compare_digest(
            request.headers.get("Authorization", ""), self.authorization
        ):
            self.refused_signatures.append("authorization")
            return web.json_response({"error": "unauthorized"}, status=401)
        try:
            self.message_ids.append(verify(self.secrets, request.headers, body))
        except SignatureError as exc:
            self.refused_signatures.append(str(exc))
            return web.json_response({"error": f"bad signature: {exc}"}, status=401)
        response = await super()._handle(request)
        if response.status == 200:
            for event in json.loads(body)["events"]:
                self.events_by_key.setdefault(event["idempotency_key"], event)  # a copy changes nothing
        return response
