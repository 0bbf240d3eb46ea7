"""The S3 archive's layout: where an object goes, what it holds, and how to read a time range back.

Objects: `<prefix>tenant=<T>/dt=<YYYY-MM-DD>/hour=<HH>/<topic>-<partition>-<first>-<last>-<ids>.jsonl.gz`, gzip
JSON lines of `Event.to_wire()`, hour = the event's ingest time (UTC). `first`/`last` are the source offsets (in
the archive sink's input topic) of the first and last event in the object, zero-padded so names sort by offset;
`ids` is a digest of the object's event ids (objects written before it have none and read the same). A name is
a function of the offsets and the events, so a batch re-uploaded after a crash overwrites its object with the
same bytes, and a PUT never replaces an object holding other events (two writers' 10..50, one without an event
it dead-lettered, would have). A writer skips the events already in an object whose range meets its batch, by
id (an object need not hold every offset in its range). Two writers of one source partition at once (a zombie
owner and the new one) can both list before either PUTs and write overlapping objects: after its PUT a writer
lists again and deletes an overlapping object whose events another holds (a reader can meet a missing key: list
again). The sink writer lives in services/sender/archive.py; `hifi replay` (shared/replay.py) reads ranges back.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from obstore.store import S3Store

from shared.config import SinkConfig
from shared.errors import HifiError
from shared.event import Event

OFFSET_DIGITS = 20
# Marks a message `hifi replay` produced into a sink's input topic: b"1" (the ledger decides) or b"force".
REPLAY_HEADER = "hifi-replay"
REPLAY_ONCE, REPLAY_FORCE = "once", "force"
OBJECT_NAME = re.compile(
    r"^(?P<topic>.+)-(?P<partition>\d+)-(?P<first>\d{20})-(?P<last>\d{20})(?:-(?P<ids>[0-9a-f]{16}))?\.jsonl\.gz$"
)


class ArchiveConfigError(HifiError):
    """The archive sink's options cannot make an S3 client (a missing credential variable)."""


@dataclass(frozen=True)
class ObjectRange:
    key: str
    topic: str
    partition: int
    first: int
    last: int


def replay_mode(headers: Any) -> str | None:
    """REPLAY_ONCE or REPLAY_FORCE for a message `hifi replay` produced, else None (live traffic)."""
    for name, value in headers or ():
        if name == REPLAY_HEADER:
            return REPLAY_FORCE if value == REPLAY_FORCE.encode() else REPLAY_ONCE
    return None


def hour_of(ingest_ts_ms: float) -> datetime:
    return datetime.fromtimestamp(ingest_ts_ms / 1000, UTC).replace(minute=0, second=0, microsecond=0)


def hour_prefix(prefix: str, tenant: str, hour: datetime) -> str:
    hour = hour.astimezone(UTC)  # the layout's hours are UTC, whatever offset the caller's time has
    return f"{prefix}tenant={tenant}/dt={hour:%Y-%m-%d}/hour={hour:%H}/"


def object_key(
    prefix: str, tenant: str, hour: datetime, topic: str, partition: int, first: int, last: int, event_ids: list[str]
) -> str:
    ids = hashlib.blake2b("\n".join(sorted(event_ids)).encode(), digest_size=8).hexdigest()
    name = f"{topic}-{partition}-{first:0{OFFSET_DIGITS}d}-{last:0{OFFSET_DIGITS}d}-{ids}.jsonl.gz"
    return hour_prefix(prefix, tenant, hour) + name


def parse_key(key: str) -> ObjectRange | None:
    match = OBJECT_NAME.match(key.rsplit("/", 1)[-1])
    if match is None:
        return None
    return ObjectRange(key, match["topic"], int(match["partition"]), int(match["first"]), int(match["last"]))


def encode_object(events: list[Event]) -> bytes:
    lines = "".join(json.dumps(e.to_wire(), separators=(",", ":")) + "\n" for e in events)
    # mtime=0: the same events give the same bytes, so a re-upload is byte-identical
    return gzip.compress(lines.encode(), compresslevel=6, mtime=0)


def decode_object(data: bytes) -> list[Event]:
    return [Event.from_wire(json.loads(line)) for line in gzip.decompress(data).splitlines() if line.strip()]


def hours_between(since: datetime, until: datetime) -> list[datetime]:
    """Every UTC hour that can hold an event in [since, until) (aware times, any offset)."""
    # floored in UTC: an offset of +05:30 floors to a half hour, which names no object's hour
    hour = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    hours = []
    while hour < until:
        hours.append(hour)
        hour += timedelta(hours=1)
    return hours


# obstore's own retries of one request (5xx, connection errors): few, inside the sink's timeout, so a PUT
# fails within about `timeout_s` and the sender's backoff, breaker and throttle decide what comes next.
STORE_MAX_RETRIES = 2


def make_store(config: SinkConfig) -> S3Store:
    """The S3 client of an `s3_archive` sink; credentials come from the environment variables it names.

    Each request times out after the sink's `timeout_s` (milliseconds kept), and obstore's retries of it
    stop once `timeout_s` has passed since the first attempt.
    """
    options: dict[str, Any] = config.options
    key_env = options.get("access_key_env", "HIFI_ARCHIVE_ACCESS_KEY_ID")
    secret_env = options.get("secret_key_env", "HIFI_ARCHIVE_SECRET_ACCESS_KEY")
    access_key, secret_key = os.environ.get(key_env), os.environ.get(secret_env)
    if not access_key or not secret_key:
        raise ArchiveConfigError(f"archive sink {config.name}: set {key_env} and {secret_env}")
    endpoint = options.get("endpoint")
    timeout = timedelta(milliseconds=max(1, round(config.timeout_s * 1000)))
    kwargs: dict[str, Any] = {}
    if endpoint:
        kwargs["endpoint"] = endpoint
        kwargs["allow_http"] = endpoint.startswith("http://")
        kwargs["virtual_hosted_style_request"] = False
    return S3Store(
        options["bucket"],
        access_key_id=access_key,
        secret_access_key=secret_key,
        region=options.get("region", "us-east-1"),
        client_options={"timeout": timeout, "connect_timeout": timeout},
        retry_config={
            "max_retries": STORE_MAX_RETRIES,
            "retry_timeout": timeout,
            "backoff": {"init_backoff": timeout / 10, "max_backoff": timeout / 2, "base": 2.0},
        },
        **kwargs,
    )
