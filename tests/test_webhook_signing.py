"""Issue 19 part 3: webhooks signed per Standard Webhooks, secrets rotated, auth and headers from secrets;
verified by the example receiver and cross-checked with the `standardwebhooks` reference package."""

from __future__ import annotations

import base64
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from devtools.signed_webhook import SignedWebhookReceiver
from devtools.traffic import EventFactory
from services.sender.webhook import WebhookSink
from shared.config import HifiConfig, SinkConfig
from shared.errors import ConfigError, SinkMisconfigured
from shared.event import Event
from shared.webhook_signing import SignatureError, sign_headers, verify
from tests.helpers import post, tenant_block, wait_for

NEW = "whsec_" + base64.b64encode(b"n" * 32).decode()
OLD = "whsec_" + base64.b64encode(b"o" * 32).decode()


def events(n: int) -> list[Event]:
    return [Event(f"e{i}", "play", 1.0, "acme", {"i": i}, device_id=f"d{i % 3}") for i in range(n)]


@dataclass
class CapturingReceiver(SignedWebhookReceiver):
    """Keeps each request's raw headers and body, to verify with the reference implementation too."""

    raw: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def _handle(self, request: web.Request) -> web.Response:
        self.raw.append((dict(request.headers), await request.read()))
        return await super()._handle(request)


def hook_config(port: int, **options: Any) -> SinkConfig:
    config = HifiConfig.parse(
        {"tenants": {}, "sinks": {"hook": {"type": "webhook", "url": f"http://127.0.0.1:{port}/in", **options}}}
    )
    return config.sinks["hook"]


async def deliver(config: SinkConfig, batch: list[Event]) -> None:
    sink = WebhookSink(config)
    await sink.start()
    try:
        await sink.deliver_batch(batch)
    finally:
        await sink.close()


async def test_signed_request_verifies_in_the_example_receiver_and_the_reference_package(port_base, monkeypatch):
    monkeypatch.setenv("HOOK_SECRET", NEW)
    receiver = CapturingReceiver(port=port_base + 21, secrets=[NEW])
    await receiver.start()
    try:
        await deliver(hook_config(receiver.port, signing_secret_env="HOOK_SECRET"), events(3))
        await deliver(hook_config(receiver.port, signing_secret_env="HOOK_SECRET"), events(3))  # a retry
    finally:
        await receiver.stop()
    assert receiver.refused_signatures == [] and len(receiver.received) == 6
    assert receiver.message_ids[0] == receiver.message_ids[1], "a retried batch keeps its webhook-id"
    headers, body = receiver.raw[0]
    assert headers["webhook-signature"].startswith("v1,")
    Webhook(NEW).verify(body, headers)  # raises if the reference implementation disagrees
    with pytest.raises(WebhookVerificationError):
        Webhook(NEW).verify(body.replace(b'"i":1', b'"i":7'), headers)


async def test_the_signed_body_is_utf8_json_of_each_event_and_its_key(port_base, monkeypatch):
    """Non-ASCII text, 64-bit integers and floats arrive as sent, in the bytes the signature covers."""
    import json

    from services.sender.sinks import sink_record

    monkeypatch.setenv("HOOK_SECRET", NEW)
    batch = [
        Event("é-1", "play", 1764510000123.25, "acme", {"title": "Amélie ✓", "n": 2**63 - 1, "r": 0.1, "e": 1e16}),
        Event("e-2", "seek", 2.0, "acme", {"neg": -(2**63), "nested": [{"k": None, "b": True}]}, device_id="d"),
    ]
    receiver = CapturingReceiver(port=port_base + 23, secrets=[NEW])
    await receiver.start()
    try:
        await deliver(hook_config(receiver.port, signing_secret_env="HOOK_SECRET"), batch)
    finally:
        await receiver.stop()
    headers, body = receiver.raw[0]
    Webhook(NEW).verify(body, headers)
    assert "Amélie ✓".encode() in body and headers["Content-Type"] == "application/json; charset=utf-8"
    assert json.loads(body) == {"sink": "hook", "events": [sink_record("hook", e) for e in batch]}


async def test_rotation_signs_with_both_secrets_and_either_receiver_verifies(port_base, monkeypatch):
    monkeypatch.setenv("HOOK_SECRET", NEW)
    monkeypatch.setenv("HOOK_SECRET_OLD", OLD)
    config = hook_config(port_base + 22, signing_secret_env=["HOOK_SECRET", "HOOK_SECRET_OLD"])
    for secrets in ([OLD], [NEW], [NEW, OLD]):
        receiver = CapturingReceiver(port=port_base + 22, secrets=secrets)
        await receiver.start()
        try:
            await deliver(config, events(2))
        finally:
            await receiver.stop()
        assert receiver.refused_signatures == [], secrets
        headers, body = receiver.raw[0]
        assert len(headers["webhook-signature"].split(" ")) == 2
        for secret in secrets:
            Webhook(secret).verify(body, headers)


async def test_a_receiver_with_another_secret_answers_401_and_the_sink_is_held_not_dead_lettered(
    port_base, monkeypatch
):
    monkeypatch.setenv("HOOK_SECRET", OLD)
    receiver = SignedWebhookReceiver(port=port_base + 23, secrets=[NEW])
    await receiver.start()
    try:
        with pytest.raises(SinkMisconfigured):
            await deliver(hook_config(receiver.port, signing_secret_env="HOOK_SECRET"), events(1))
    finally:
        await receiver.stop()
    assert receiver.refused_signatures == ["no signature matches"] and not receiver.received


def test_verify_refuses_tampering_stale_timestamps_and_missing_headers():
    body = b'{"sink":"hook","events":[]}'
    key = base64.b64decode(NEW.removeprefix("whsec_"))
    headers = sign_headers([key], "msg_1", body)
    assert verify([NEW], headers, body) == "msg_1"
    with pytest.raises(SignatureError, match="no signature matches"):
        verify([NEW], headers, body + b" ")
    with pytest.raises(SignatureError, match="no signature matches"):
        verify([NEW], {**headers, "webhook-id": "msg_2"}, body)
    stale = sign_headers([key], "msg_1", body, timestamp=int(time.time()) - 600)
    with pytest.raises(SignatureError, match="tolerance"):
        verify([NEW], stale, body)
    with pytest.raises(SignatureError, match="missing"):
        verify([NEW], {"webhook-id": "msg_1"}, body)


async def test_bearer_basic_and_secret_headers_come_from_the_environment(port_base, monkeypatch):
    monkeypatch.setenv("HOOK_TOKEN", "t0ken")
    monkeypatch.setenv("HOOK_PASSWORD", "pa:ss")
    monkeypatch.setenv("HOOK_TENANT_KEY", "k-123")
    bearer = CapturingReceiver(port=port_base + 24, authorization="Bearer t0ken", secrets=[NEW])
    monkeypatch.setenv("HOOK_SECRET", NEW)
    await bearer.start()
    try:
        await deliver(
            hook_config(
                bearer.port,
                signing_secret_env="HOOK_SECRET",
                auth={"type": "bearer", "token_env": "HOOK_TOKEN"},
                headers_env={"X-Tenant-Key": "HOOK_TENANT_KEY"},
            ),
            events(1),
        )
    finally:
        await bearer.stop()
    assert len(bearer.received) == 1 and bearer.raw[0][0]["X-Tenant-Key"] == "k-123"
    basic_header = "Basic " + base64.b64encode(b"acme:pa:ss").decode()
    basic = SignedWebhookReceiver(port=port_base + 25, authorization=basic_header, secrets=[NEW])
    await basic.start()
    try:
        config = hook_config(
            basic.port,
            signing_secret_env="HOOK_SECRET",
            auth={"type": "basic", "username": "acme", "password_env": "HOOK_PASSWORD"},
        )
        await deliver(config, events(1))
    finally:
        await basic.stop()
    assert len(basic.received) == 1 and basic.refused_signatures == []


def test_startup_validation_names_the_field(monkeypatch):
    def parse(**options: Any) -> SinkConfig:
        return hook_config(1, **options)

    with pytest.raises(ConfigError, match=r"sinks\.hook\.signing_secret_env\[0\]"):
        parse(signing_secret_env=NEW)  # the secret itself instead of its variable's name
    with pytest.raises(ConfigError, match=r"sinks\.hook\.signing_secret_env"):
        parse(signing_secret_env=["A", "B", "C"])
    with pytest.raises(ConfigError, match=r"sinks\.hook\.auth\.type"):
        parse(auth={"type": "digest"})
    with pytest.raises(ConfigError, match=r"sinks\.hook\.auth\.token_env"):
        parse(auth={"type": "bearer"})
    with pytest.raises(ConfigError, match=r"sinks\.hook\.auth"):
        parse(auth={"type": "basic", "password_env": "P"})
    with pytest.raises(ConfigError, match=r"sinks\.hook\.headers_env\.X-Key"):
        parse(headers_env={"X-Key": "lower-case"})
    monkeypatch.delenv("HOOK_SECRET", raising=False)
    with pytest.raises(ConfigError, match=r"sinks\.hook\.signing_secret_env\[0\]: environment variable HOOK_SECRET"):
        WebhookSink(parse(signing_secret_env="HOOK_SECRET"))
    monkeypatch.setenv("HOOK_SECRET", "not-a-whsec")
    with pytest.raises(ConfigError, match=r"signing_secret_env\[0\]: environment variable HOOK_SECRET: must start"):
        WebhookSink(parse(signing_secret_env="HOOK_SECRET"))
    monkeypatch.delenv("HOOK_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"sinks\.hook\.auth\.token_env: environment variable HOOK_TOKEN is not set"):
        WebhookSink(parse(auth={"type": "bearer", "token_env": "HOOK_TOKEN"}))


async def test_pipeline_signed_webhook_delivers_every_event_once_to_a_verifying_receiver(
    tmp_path, port_base, settings_for, start_pipeline, monkeypatch
):
    """The real sender process reads the secrets from its environment; the receiver verifies each request."""
    monkeypatch.setenv("HIFI_TEST_HOOK_SECRET", NEW)
    monkeypatch.setenv("HIFI_TEST_HOOK_TOKEN", "pipeline-token")
    receiver = SignedWebhookReceiver(port=port_base + 26, secrets=[NEW], authorization="Bearer pipeline-token")
    await receiver.start()
    config = tmp_path / "hifi.yaml"
    config.write_text(
        "tenants:\n"
        + tenant_block("acme", "k", ["hook"])
        + "sinks:\n  hook:\n    type: webhook\n"
        + f'    url: "http://127.0.0.1:{receiver.port}/in"\n'
        + "    signing_secret_env: HIFI_TEST_HOOK_SECRET\n"
        + "    auth: {type: bearer, token_env: HIFI_TEST_HOOK_TOKEN}\n"
    )
    try:
        assert os.environ["HIFI_TEST_HOOK_SECRET"] == NEW
        pipeline = await start_pipeline(settings_for(config))
        factory = EventFactory(producer_id="signed")
        sent = [factory.make() for _ in range(120)]
        assert (await post(pipeline.collector_url, "k", sent))[0] == 200
        await wait_for(lambda: len(receiver.received) >= 120, 60, "signed deliveries", pipeline)
    finally:
        await receiver.stop()
    assert receiver.refused_signatures == []
    assert Counter(e["event_id"] for e in receiver.received) == Counter(e["event_id"] for e in sent)


def test_a_url_safe_secret_stops_the_sender_at_start_without_the_secret(monkeypatch):
    """`-` and `_` are not standard base64: decoding leniently drops them and signs with another key, which
    every receiver then refuses. Refused at start, naming the variable and never the value."""
    # A random key whose URL-safe base64 has four `-`/`_`: decoded leniently, 29 bytes of another key.
    key = bytes.fromhex("27a0aeb3fee9232f8af2211f9ee491c5b10becb5563bfc1e6f93427ecbc8fe29")
    url_safe = "whsec_" + base64.urlsafe_b64encode(key).decode()
    assert "-" in url_safe and "_" in url_safe[6:]
    monkeypatch.setenv("HOOK_SECRET", url_safe)
    with pytest.raises(
        ConfigError, match=r"sinks\.hook\.signing_secret_env\[0\]: environment variable HOOK_SECRET"
    ) as raised:
        WebhookSink(hook_config(1, signing_secret_env="HOOK_SECRET"))
    assert url_safe[6:16] not in str(raised.value)
    monkeypatch.setenv("HOOK_SECRET", "whsec_" + base64.b64encode(key).decode().rstrip("="))
    assert WebhookSink(hook_config(1, signing_secret_env="HOOK_SECRET")).signing_keys == [key]  # unpadded is fine


async def test_receivers_dedupe_on_each_events_idempotency_key_not_on_the_webhook_id(port_base, monkeypatch):
    """A batch split after a refusal is re-sent as smaller requests with new webhook-ids: only each event's
    `idempotency_key` tells a receiver it has the event already (the example receiver keeps one per key)."""
    monkeypatch.setenv("HOOK_SECRET", NEW)
    receiver = SignedWebhookReceiver(port=port_base + 27, secrets=[NEW])
    await receiver.start()
    try:
        config = hook_config(receiver.port, signing_secret_env="HOOK_SECRET")
        batch = events(4)
        await deliver(config, batch)  # the receiver took it, but the answer was lost: the sender splits
        await deliver(config, batch[:2])
        await deliver(config, batch[2:])
    finally:
        await receiver.stop()
    assert len(set(receiver.message_ids)) == 3, "each request of the split has a webhook-id of its own"
    assert len(receiver.received) == 8
    assert sorted(receiver.events_by_key) == sorted(f"hook:acme:{e.event_id}" for e in batch)
    assert "idempotency_key" in (verify.__doc__ or "")
