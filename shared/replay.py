"""`hifi replay`: re-deliver a tenant's archived events of a time range to one sink.

The archived events (shared/archive.py) whose ingest time lies in [since, until) go through the sink's rules as
the router applies them (`shared.transforms.sink_copy`: filter, consent, transform; those it keeps out are
counted `filtered`), then are produced into the sink's own input topic (the router's output for it) with the
header `hifi-replay`, so the sink's sender delivers them
with its normal ledger and idempotency keys: an event the sink already has is skipped (outcome
`replay_skipped`), unless `--force` (header value `force`). The sender tallies them as `replayed` /
`replay_skipped`, sends no receipts for them, and counts them in `hifi_replayed_events`; the auditor keeps
them out of the live loss ledger. Any sink the tenant subscribes to in the current config works, including one
added after the events; a sink it does not subscribe to is refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import obstore
from obstore.exceptions import BaseError

from shared.app import durable_producer
from shared.archive import (
    REPLAY_FORCE,
    REPLAY_HEADER,
    REPLAY_ONCE,
    decode_object,
    hour_prefix,
    hours_between,
    make_store,
    parse_key,
)
from shared.codec import pack
from shared.config import HifiConfig, Settings
from shared.errors import HifiError
from shared.topics import Topics, ensure_topics
from shared.transforms import Secrets, copy_key, sink_copy

log = logging.getLogger(__name__)


class ReplayError(HifiError):
    """The replay cannot start: no archive, an unknown sink, a bad time range, or the archive unreadable."""


@dataclass(frozen=True)
class ReplayReport:
    objects: int
    events: int  # produced into the sink's input topic
    filtered: int = 0  # kept out by the sink's filter or consent rule, as the router would have


def parse_time(value: str) -> datetime:
    """ISO 8601 (naive means UTC) or epoch seconds."""
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ReplayError(f"not a time: {value!r} (ISO 8601 or epoch seconds)") from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


async def replay(
    settings: Settings,
    config: HifiConfig,
    tenant: str,
    since: datetime,
    until: datetime,
    to_sink: str,
    rate: float = 0.0,
    force: bool = False,
) -> ReplayReport:
    if to_sink not in config.sinks:
        raise ReplayError(f"unknown sink {to_sink!r}; the config has {', '.join(config.sinks)}")
    archives = config.archive_sinks()
    if not archives:
        raise ReplayError("the config has no s3_archive sink to replay from")
    if to_sink in archives:
        raise ReplayError(f"{to_sink} is the archive itself")
    if to_sink not in config.subscribers(tenant):
        raise ReplayError(f"tenant {tenant!r} does not subscribe to sink {to_sink!r} in the current config")
    rules = config.sinks[to_sink].rules
    hashing = {tenant} if rules.transform.hashes else set()
    found = config.tenants[tenant]
    try:  # the router's secrets: a hashed field must come out as it would live
        secrets = Secrets.from_env({tenant: found.pii_secret_env} if found.pii_secret_env else {}, os.environ, hashing)
    except HifiError as exc:
        raise ReplayError(f"sink {to_sink} hashes fields: {exc}") from exc
    if until <= since:
        raise ReplayError(f"empty range: --until {until.isoformat()} is not after --since {since.isoformat()}")
    archive = config.sinks[archives[0]]
    store = make_store(archive)
    prefix = archive.options.get("prefix", "")
    topics = Topics(settings.namespace)
    topic = topics.sink(to_sink)
    await ensure_topics(settings.broker, [topic], settings.partitions, settings.replication, settings.min_insync)
    header = [(REPLAY_HEADER, (REPLAY_FORCE if force else REPLAY_ONCE).encode())]
    since_ms, until_ms = since.timestamp() * 1000, until.timestamp() * 1000

    async def archived_keys(hour: datetime) -> list[str]:
        try:
            listed = await obstore.list(store, prefix=hour_prefix(prefix, tenant, hour)).collect_async()
        except (BaseError, OSError) as exc:
            raise ReplayError(f"archive {archive.name}: listing {hour:%Y-%m-%d %H}h: {exc}") from exc
        return sorted(m["path"] for m in listed if parse_key(m["path"]) is not None)

    producer = durable_producer(settings.broker)
    await producer.start()
    objects = events = filtered = 0
    seen: set[str] = set()
    started = time.monotonic()
    try:
        for hour in hours_between(since, until):
            keys, read = await archived_keys(hour), set()
            while keys:
                key = keys.pop(0)
                read.add(key)
                try:
                    data = bytes(await (await obstore.get_async(store, key)).bytes_async())
                except FileNotFoundError:
                    # the archive dropped it, an overlapping object holds its events (ArchiveSink._drop_overlaps);
                    # that one can be newer than our listing
                    keys = [k for k in await archived_keys(hour) if k not in read]
                    continue
                except (BaseError, OSError) as exc:
                    raise ReplayError(f"archive {archive.name}: reading {key}: {exc}") from exc
                objects += 1
                pending = []
                for event in decode_object(data):
                    if not since_ms <= event.ingest_ts < until_ms or event.event_id in seen:
                        continue
                    seen.add(event.event_id)
                    copy, _reason = sink_copy(rules, event.to_wire(), secrets)
                    if copy is None:
                        filtered += 1
                        continue
                    if rate > 0:  # paced from the start: a slow object does not make the next burst
                        delay = started + events / rate - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    pending.append(await producer.send(topic, pack(copy), key=copy_key(copy), headers=header))
                    events += 1
                await asyncio.gather(*pending)  # acked (acks=all) before the next object
    finally:
        await producer.stop()
    if filtered:
        log.info("replay to %s: %d events kept out by its filter or consent rule", to_sink, filtered)
    return ReplayReport(objects, events, filtered)
