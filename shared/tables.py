"""The table browser every stateful service serves: its key windows, paged, looked up by key, sized,
and which worker owns which partition.

A RocksDB window is partition-local: an entry lives with the partition of the event that wrote it
(the event's partition key, tenant + device), not with the hash of the entry's own key. A lookup
that names the partition (`partition=` or `partition_key=`) is forwarded to the worker that owns it;
one that does not is asked of every worker. A Redis window is shared, so any worker answers.

    GET /tables                                  every table of this worker, sizes, owners
    GET /tables/{name}?cursor=&limit=            one page of this worker's entries
    GET /tables/{name}?key=K[&partition_key=P]   one entry, from the worker that holds it
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.partitioner import murmur2
from faust import web

from shared.config import Settings
from shared.errors import TransientError
from shared.keywindow import KeyWindow, RocksKeyWindow
from shared.web import denied

log = logging.getLogger(__name__)

ROUTED = "X-Hifi-Routed"  # set on forwarded requests, so a worker never forwards a forwarded one


class TableBrowser:
    def __init__(
        self,
        app: Any,
        settings: Settings,
        windows: dict[str, KeyWindow],
        extra: dict[str, Callable[[], list[dict[str, Any]]]] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.windows = windows
        self.extra = extra or {}  # in-memory state shown as a table (e.g. a sender's sink state)
        self._owners: dict[str, tuple[float, dict[str, list[int]]]] = {}

    @property
    def me(self) -> str:
        return str(self.app.conf.canonical_url).rstrip("/")

    async def owners(self, window: KeyWindow) -> dict[str, list[int]]:
        """Worker URL -> partitions it holds, from the consumer group (each member's client id is its URL)."""
        if not isinstance(window, RocksKeyWindow):
            return {}
        cached = self._owners.get(window.group)
        if cached is not None and time.monotonic() - cached[0] < 2.0:
            return cached[1]
        owners: dict[str, list[int]] = {}
        try:
            owners = await partition_owners(window.bootstrap, window.group)
        except Exception as exc:  # the owner map is a convenience: fall back to this worker's own view
            log.warning("could not describe group %s: %r", window.group, exc)
        if not owners:  # before the group is stable, at least this worker's own partitions
            owners = {self.me: sorted(window.dbs)}
        self._owners[window.group] = (time.monotonic(), owners)
        return owners

    def partition_of(self, window: KeyWindow, query: Any) -> int | None:
        if "partition" in query:
            return int(query["partition"])
        if "partition_key" in query and isinstance(window, RocksKeyWindow):
            return (murmur2(query["partition_key"].encode()) & 0x7FFFFFFF) % window.partitions
        return None

    async def summary(self) -> dict[str, Any]:
        tables = []
        for name, window in self.windows.items():
            try:
                size = await window.size()
            except TransientError as exc:
                size = f"unavailable: {exc}"
            tables.append({"name": name, **window.describe(), "size": size, "owners": await self.owners(window)})
        for name, rows in self.extra.items():
            tables.append({"name": name, "backend": "memory", "size": len(rows()), "owners": {self.me: []}})
        return {"worker": self.me, "tables": tables}

    async def page(self, name: str, query: Any) -> dict[str, Any]:
        limit = max(1, min(int(query.get("limit", "50")), 1000))
        if name in self.extra:
            rows = self.extra[name]()
            return {"table": name, "worker": self.me, "entries": rows[:limit], "next_cursor": None}
        window = self.windows[name]
        entries, cursor = await window.browse(query.get("cursor", ""), limit)
        return {
            "table": name,
            "worker": self.me,
            "entries": entries,
            "next_cursor": cursor,
            "owners": await self.owners(window),
        }

    async def lookup(self, name: str, key: str, query: Any, headers: Any) -> tuple[int, dict[str, Any]]:
        window = self.windows[name]
        owners = await self.owners(window)
        partition = self.partition_of(window, query)
        routed = ROUTED in headers
        if isinstance(window, RocksKeyWindow) and not routed:
            if partition is not None:
                owner = next((host for host, parts in owners.items() if partition in parts), self.me)
                if owner != self.me:
                    return await self._forward(owner, name, query, headers)
            else:
                entry = await window.lookup(key)
                if entry is not None:
                    return 200, {"table": name, "worker": self.me, "entry": entry}
                others = [host for host in owners if host != self.me]
                answers = await asyncio.gather(*(self._forward(h, name, query, headers) for h in others))
                for status, body in answers:
                    if status == 200 and body.get("entry") is not None:
                        return 200, body
                return 404, {"table": name, "key": key, "entry": None, "asked": [self.me, *others]}
        entry = await window.lookup(key)
        body = {"table": name, "worker": self.me, "key": key, "entry": entry}
        if partition is not None:
            body["partition"] = partition
        return (200 if entry is not None else 404), body

    async def _forward(self, host: str, name: str, query: Any, headers: Any) -> tuple[int, dict[str, Any]]:
        forwarded = {ROUTED: "1"}
        if "Authorization" in headers:
            forwarded["Authorization"] = headers["Authorization"]
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                async with session.get(f"{host}/tables/{name}", params=dict(query), headers=forwarded) as resp:
                    return resp.status, await resp.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 502, {"table": name, "error": f"owner {host} unreachable: {exc!r}"}


async def partition_owners(bootstrap: str, group: str) -> dict[str, list[int]]:
    """Client id (a worker's canonical URL) -> the partitions assigned to it, from DescribeGroups."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    owners: dict[str, list[int]] = {}
    for described in response.groups:
        members = described[5] if len(described) > 5 else []
        for member in members:
            client_id, assignment = member[1], member[-1]
            if not assignment:
                continue
            decoded = ConsumerProtocolMemberAssignment.decode(assignment)
            parts = sorted(p for _, partitions in decoded.assignment for p in partitions)
            owners[str(client_id).rstrip("/")] = sorted({*owners.get(str(client_id).rstrip("/"), []), *parts})
    return owners


def add_table_views(app: Any, browser: TableBrowser) -> None:
    settings = browser.settings

    @app.page("/tables")
    async def tables(self: web.View, request: web.Request) -> web.Response:
        refused = denied(self, request, settings)
        return refused or self.json(await browser.summary())

    @app.page("/tables/{name}")
    async def table(self: web.View, request: web.Request, name: str) -> web.Response:
        refused = denied(self, request, settings)
        if refused is not None:
            return refused
        if name not in browser.windows and name not in browser.extra:
            known = [*browser.windows, *browser.extra]
            return self.json({"error": f"no table {name!r}", "tables": known}, status=404)
        try:
            if "key" in request.query and name in browser.windows:
                status, body = await browser.lookup(name, request.query["key"], request.query, request.headers)
                return self.json(body, status=status)
            return self.json(await browser.page(name, request.query))
        except TransientError as exc:
            return self.json({"error": str(exc)}, status=503)
        except ValueError as exc:
            return self.json({"error": f"bad parameter: {exc}"}, status=400)
