"""The Redis Stream sink: XADD each event once per idempotency key."""

from __future__ import annotations

import json

import redis.asyncio as aioredis
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    OutOfMemoryError,
    RedisError,
    ResponseError,
)

from shared.config import SinkConfig
from shared.errors import (
    SinkMisconfigured,
    TransientError,
)
from shared.event import Event

from .sinks import Source, sink_record

# One script call per event: a batch retried whole skips what the server already applied. The marker is set after
# XADD, so a failed XADD leaves none (a script is not rolled back). A kill that cuts Redis 7.0's AOF write short
# after the XADD can still revive it beside the retry's (docs/RELIABILITY.md, Remaining windows); the marker first
# would turn that into a loss when another transaction closes the cut one, so the order stays.
# KEYS: stream, marker. ARGV: marker TTL (ms), MAXLEN ('' for none), then field, value pairs.
APPEND_ONCE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local cmd = {'XADD', KEYS[1]}
if ARGV[2] ~= '' then
  cmd[#cmd + 1] = 'MAXLEN'; cmd[#cmd + 1] = '~'; cmd[#cmd + 1] = ARGV[2]
end
cmd[#cmd + 1] = '*'
for i = 3, #ARGV do cmd[#cmd + 1] = ARGV[i] end
local id = redis.call(unpack(cmd))
redis.call('SET', KEYS[2], id, 'PX', ARGV[1])
return 1
"""


def _has_hash_tag(name: str) -> bool:
    start = name.find("{")
    return start != -1 and name.find("}", start + 1) > start + 1


class RedisStreamSink:
    """XADD each event to a Redis Stream once per idempotency key: one pipelined round trip per batch of
    `APPEND_ONCE` script calls. The key's marker lives for the dedupe window (option
    `dedupe_window_s`, default the pipeline's `dedupe.window_s`)."""

    def __init__(self, config: SinkConfig, default_url: str, dedupe_window_s: float = 86_400.0) -> None:
        self.config = config
        self.stream = config.options["stream"]
        self.maxlen = config.options.get("maxlen")
        self.marker_ttl_ms = int(float(config.options.get("dedupe_window_s") or dedupe_window_s) * 1000)
        self.client = aioredis.from_url(
            config.options.get("url") or default_url, socket_timeout=config.timeout_s, socket_connect_timeout=2.0
        )
        self.append_once = self.client.register_script(APPEND_ONCE)

    def marker_key(self, key: str) -> str:
        # Named so marker and stream would share a Redis Cluster slot (the stream's own hash tag, or its
        # whole name as the tag); the sink's client is not a cluster client, so this is only a naming rule.
        if _has_hash_tag(self.stream):
            return f"{self.stream}:idem:{key}"
        return f"{{{self.stream}}}:idem:{key}"

    async def start(self) -> None:
        pass

    async def deliver_batch(self, events: list[Event], source: Source | None = None) -> None:
        maxlen = "" if self.maxlen is None else str(int(self.maxlen))
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for event in events:
                    record = sink_record(self.config.name, event)
                    key = record["idempotency_key"]
                    fields = {
                        "event_id": event.event_id,
                        "tenant": event.tenant,
                        "type": event.type,
                        "idempotency_key": key,
                        "data": json.dumps(record, separators=(",", ":")),
                    }
                    args = [self.marker_ttl_ms, maxlen, *(x for pair in fields.items() for x in pair)]
                    await self.append_once([self.stream, self.marker_key(key)], args, client=pipe)
                await pipe.execute()
        except (AuthenticationError, AuthorizationError, NoPermissionError) as exc:
            raise SinkMisconfigured(f"redis stream {self.config.name}: {exc}") from exc
        except OutOfMemoryError as exc:
            # maxmemory reached under noeviction: every append fails until an operator adds memory or trims
            raise SinkMisconfigured(f"redis stream {self.config.name}: OOM (maxmemory reached): {exc}") from exc
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):  # the stream's key holds something else: every append fails
                raise SinkMisconfigured(f"redis stream {self.config.name}: {self.stream}: {exc}") from exc
            raise TransientError(f"redis stream {self.config.name}: {exc!r}") from exc
        except (RedisError, OSError) as exc:
            raise TransientError(f"redis stream {self.config.name}: {exc!r}") from exc

    async def probe(self) -> None:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise TransientError(f"redis stream {self.config.name} probe: {exc!r}") from exc

    async def close(self) -> None:
        await self.client.aclose()
