"""Dead letters keep what is needed to understand and replay them; a replay is idempotent."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import aiohttp

from devtools.traffic import EventFactory
from devtools.webhook import WebhookReceiver
from shared.dlq import DeadLetterQueues
from shared.topics import Topics
from tests.helpers import post, wait_for, write_webhook_config


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args], env=env, capture_output=True, text=True, check=True
    )


async def test_a_refused_batch_is_dead_lettered_then_replayed_exactly_once(
    tmp_path, namespace, port_base, settings_for, start_pipeline, kafka
):
    hook = WebhookReceiver(port=port_base + 19)
    await hook.start()
    config = write_webhook_config(tmp_path / "hifi.yaml", hook.port)
    settings = settings_for(config, read_token="r-token", admin_token="a-token", redact_fields="position_s")
    pipeline = await start_pipeline(settings)
    queues = DeadLetterQueues(kafka.bootstrap, Topics(namespace), ["hook"])
    try:
        factory = EventFactory(producer_id=namespace)
        events = [factory.make() for _ in range(60)]
        refused = {e["event_id"] for e in events[::2]}  # the sink refuses these for good (400), takes the others
        hook.reject_event = refused.__contains__
        assert (await post(pipeline.collector_url, "k", events))[0] == 200

        async def all_dead() -> bool:
            return (await queues.counts())["sender.hook"] == 30

        await wait_for(all_dead, 60, "dead letters", pipeline)
        assert {e["event_id"] for e in hook.received} == {e["event_id"] for e in events} - refused
        letters = await queues.read("sender.hook", limit=30)
        assert {letter["original"]["event_id"] for letter in letters} == refused
        first = letters[0]
        assert first["error_class"] == "PermanentSinkError" and "HTTP 400" in first["error"]
        assert first["stage"] == "sender.hook" and first["attempts"] == 1
        assert (
            first["topic"] == Topics(namespace).sink("hook") and first["dead_lettered_ms"] >= first["first_failed_ms"]
        )

        env = {**os.environ, **settings.as_env()}
        listed = (await asyncio.to_thread(cli, env, "dlq", "list")).stdout
        assert any(line.split()[:2] == ["sender.hook", "30"] for line in listed.splitlines()), listed
        shown = (await asyncio.to_thread(cli, env, "dlq", "show", "sender.hook", "--limit", "2")).stdout.splitlines()
        assert len(shown) == 2 and json.loads(shown[0])["reason"] == "PermanentSinkError"

        # The stage's own views: reading needs the read token and hides redacted fields; replay needs admin.
        dlq_url = pipeline.services["sender.hook"].url("/dlq")
        async with aiohttp.ClientSession() as session:
            async with session.get(dlq_url) as resp:
                assert resp.status == 401
            async with session.get(dlq_url + "?limit=5", headers={"Authorization": "Bearer r-token"}) as resp:
                view = await resp.json()
            assert view["count"] == 30 and len(view["letters"]) == 5
            assert all(letter["original"]["payload"]["position_s"] == "[redacted]" for letter in view["letters"])
            assert "original_value" not in view["letters"][0]
            replay_url = pipeline.services["sender.hook"].url("/dlq/replay?rate=0")
            async with session.post(replay_url, headers={"Authorization": "Bearer r-token"}) as resp:
                assert resp.status == 401, "the read token cannot replay"
            hook.reject_event = None  # the destination is fixed: replay
            async with session.post(replay_url, headers={"Authorization": "Bearer a-token"}) as resp:
                assert resp.status == 200 and (await resp.json())["replayed"] == 30
        await wait_for(lambda: len(hook.received) >= 60, 60, "replayed delivery", pipeline)
        assert await queues.replay("sender.hook", rate=0) == 0, "a finished replay does not repeat"
        await asyncio.sleep(2.0)
        assert sorted(hook.counts().values()) == [1] * 60
    finally:
        await hook.stop()
