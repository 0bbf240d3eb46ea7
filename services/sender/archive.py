"""The S3 archive sink (type `s3_archive`): every tenant's events, after dedupe, as gzip JSON lines objects
partitioned by tenant and hour (layout in shared/archive.py).

It is a sender like any other, so the StageRunner's contract holds: a batch's objects are each one PUT of the
finished object (S3 makes it visible whole or not at all) and `deliver_batch` returns only after every PUT
was acknowledged, so the sender marks its ledger and commits the input offsets only once the archive holds the
batch. A crash between the PUTs and the commit re-reads the batch: before writing, the sink lists the
objects of the batch's (tenant, hour, source partition) and skips every offset one of them covers, so the
retry never archives an event twice, whatever batch boundaries the re-read has. Two writers at once (a zombie
owner after its session expired, and the new owner) can both list before either PUTs: after each PUT the
sink lists again and drops an overlapping object whose events another object holds (`_drop_overlaps`), so the
later writer removes the copy. Batches are the sender's:
`batch_max` events, fetched for up to `linger_s` (e.g. 5000 and 60: one object per tenant, hour and source
partition a minute at most); nothing is committed before its object is in.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from datetime import datetime

import obstore
from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

from shared.archive import (
    ObjectRange,
    decode_object,
    encode_object,
    hour_of,
    hour_prefix,
    make_store,
    object_key,
    parse_key,
)
from shared.config import SinkConfig
from shared.errors import SinkMisconfigured, SinkThrottled, TransientError
from shared.event import Event

from .sinks import SINK_WIDE_STATUSES, Source

log = logging.getLogger(__name__)


# obstore reports most S3 refusals as GenericError; the status in its message says whose fault it is
STATUS = re.compile(r"status code: (\d{3})")
# S3 asks a client to slow down with 503 SlowDown (and 429 elsewhere): the bucket's request rate, not the events
THROTTLED = re.compile(r"SlowDown|status code: 429")


def classify(sink: str, exc: Exception) -> TransientError:
    """A bad credential, signature or missing bucket refuses every request (page); SlowDown/429 is throttling
    (the sender waits, no event is suspected); anything else is retried."""
    found = STATUS.search(str(exc))
    status = int(found[1]) if found else None
    message = f"archive {sink}: {type(exc).__name__}: {str(exc)[:500]}"
    if (
        isinstance(exc, (PermissionDeniedError, UnauthenticatedError, FileNotFoundError))
        or status in SINK_WIDE_STATUSES
    ):
        return SinkMisconfigured(message, status)
    if THROTTLED.search(str(exc)):
        return SinkThrottled(message)
    return TransientError(message)


class ArchiveSink:
    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self.prefix = config.options.get("prefix", "")
        self.store: S3Store | None = None
        self.objects_written = 0
        self.events_skipped = 0  # already in an object: a batch re-read after a crash
        self.overlaps_dropped = 0  # objects deleted because an overlapping one holds their events (two writers)
        # Event ids of the objects this batch read or wrote: a name is a function of its events, so they cannot
        # change, and the skip and the clean-up need the same ones (read once per batch, not once per check).
        self.ids_by_key: dict[str, frozenset[str]] = {}
        # Test hook (tests/test_archive.py): exit like kill -9 right after this many PUTs, before any commit.
        crash_after = os.environ.get("HIFI_TEST_ARCHIVE_CRASH_AFTER_PUTS")
        self.crash_after_puts = int(crash_after) if crash_after else None

    async def start(self) -> None:
        self.store = make_store(self.config)

    async def deliver_batch(self, events: list[Event], source: Source | None = None) -> None:
        assert self.store is not None
        if source is None:
            raise TransientError(f"archive {self.config.name}: a batch without source offsets cannot be named")
        groups: dict[tuple[str, datetime], list[tuple[int, Event]]] = defaultdict(list)
        for event, offset in zip(events, source.offsets, strict=True):
            if not event.canary:  # canaries trace the pipeline; the archive keeps customers' events only
                groups[(event.tenant, hour_of(event.ingest_ts))].append((offset, event))
        self.ids_by_key = {}
        try:
            for (tenant, hour), members in groups.items():
                existing = await self._objects(tenant, hour, source)
                # Objects whose range meets this batch's: it was archived before (a crash, a retry, a zombie).
                first, last = members[0][0], members[-1][0]
                overlapping = [o for o in existing if o.first <= last and first <= o.last]
                archived_ids = await self._archived_ids(overlapping)
                todo = [(o, e) for o, e in members if e.event_id not in archived_ids]
                self.events_skipped += len(members) - len(todo)
                # Objects that already hold some of these events: their clean-up may have failed or been cut by
                # a crash, and only this retry still knows to run it again.
                holding = [o.key for o in overlapping] if len(todo) < len(members) else []
                if todo:
                    key = object_key(
                        self.prefix,
                        tenant,
                        hour,
                        source.topic,
                        source.partition,
                        todo[0][0],
                        todo[-1][0],
                        [e.event_id for _, e in todo],
                    )
                    # One PUT of the finished object: S3 never shows a partial one.
                    await obstore.put_async(self.store, key, encode_object([e for _, e in todo]), use_multipart=False)
                    self.objects_written += 1
                    self.ids_by_key[key] = frozenset(e.event_id for _, e in todo)
                    holding.insert(0, key)
                if holding:
                    # After a PUT one listing serves every check; with none, the listing above does (a fully
                    # covered retry lists once). An object deleted since is skipped by the checks.
                    listed = await self._objects(tenant, hour, source) if todo else existing
                    for mine in holding:
                        await self._drop_overlaps(mine, listed)
                if self.crash_after_puts is not None and self.objects_written >= self.crash_after_puts:
                    log.warning("archive %s: test hook: exiting after %d PUTs", self.config.name, self.objects_written)
                    os._exit(137)
        except (BaseError, OSError) as exc:
            raise classify(self.config.name, exc) from exc

    async def _archived_ids(self, objects: list[ObjectRange]) -> set[str]:
        """The event ids these objects hold. By id, not by range: an object need not hold every offset between
        its first and last (one written without an event held as a dead letter, whose holder then lost the
        partition and the letter with it). An object deleted since the listing counts as holding nothing: an
        event written again is a copy the clean-up removes, never a loss."""
        held: set[str] = set()
        for obj in objects:
            try:
                held |= await self._event_ids(obj.key)
            except FileNotFoundError:
                continue
        return held

    async def _objects(self, tenant: str, hour: datetime, source: Source) -> list[ObjectRange]:
        assert self.store is not None
        # obstore's prefix matches whole path segments: list the hour, keep this source partition's objects
        listed = await obstore.list(self.store, prefix=hour_prefix(self.prefix, tenant, hour)).collect_async()
        ranges = (parse_key(meta["path"]) for meta in listed)
        return [r for r in ranges if r is not None and r.topic == source.topic and r.partition == source.partition]

    async def _drop_overlaps(self, written: str, listed: list[ObjectRange]) -> None:
        """Two writers of one source partition (a zombie whose session expired and the new owner) can both list
        before either PUTs, and write overlapping objects (10..50 and 10..80). After its PUT a writer lists
        again (`listed`: S3 lists after a write consistently, so the later of the two sees both) and deletes an
        overlapping object whose events the other holds, all of them (by event id). The choice depends only on
        the two objects, so both writers delete the same one; overlaps where neither holds the other stay.
        A retry of a batch already archived runs this again for the objects holding its events: a clean-up that
        failed (S3 throttled it) is run again while its writer still retries the batch."""
        assert self.store is not None
        mine = parse_key(written)
        assert mine is not None
        others = [o for o in listed if o.key != written and o.first <= mine.last and mine.first <= o.last]
        if not others:
            return
        try:
            ids = {written: await self._event_ids(written)}
        except FileNotFoundError:
            # The other writer dropped ours: it deletes an object only when its own holds all of that one's events.
            return
        for other in others:
            try:
                ids[other.key] = await self._event_ids(other.key)
            except FileNotFoundError:
                continue  # the other writer dropped it already
            a, b = sorted((written, other.key))
            if ids[a] == ids[b]:
                doomed = b  # the same events twice: keep the first name
            elif ids[a] < ids[b]:
                doomed = a
            elif ids[b] < ids[a]:
                doomed = b
            else:
                log.warning("archive %s: %s and %s overlap, neither holds the other", self.config.name, a, b)
                continue
            log.warning("archive %s: dropping %s, its events are in an overlapping object", self.config.name, doomed)
            try:
                await obstore.delete_async(self.store, doomed)
            except FileNotFoundError:
                pass
            self.overlaps_dropped += 1
            if doomed == written:
                return

    async def _event_ids(self, key: str) -> frozenset[str]:
        assert self.store is not None
        ids = self.ids_by_key.get(key)
        if ids is None:
            data = bytes(await (await obstore.get_async(self.store, key)).bytes_async())
            ids = self.ids_by_key[key] = frozenset(e.event_id for e in decode_object(data))
        return ids

    async def probe(self) -> None:
        assert self.store is not None
        try:
            # one page is the answer: collecting the listing would walk the whole archive
            async for _page in obstore.list(self.store, prefix=self.prefix, chunk_size=1):
                break
        except (BaseError, OSError) as exc:
            raise TransientError(f"archive {self.config.name} probe: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        pass
