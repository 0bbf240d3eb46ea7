"""The PostgreSQL sink: one table per sink, each event's row written once per idempotency key.

A batch is one statement, `INSERT .. SELECT .. FROM unnest(...) ON CONFLICT (idempotency_key) DO NOTHING`,
committed (synchronous_commit) before `deliver_batch` returns. A batch re-sent after a kill of the sender, a
timeout or a server restart (outcome unknown) inserts only the rows that are not there yet: exactly once in
the database. The table is created if missing (`TABLE_SCHEMA`).
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from typing import Any

import asyncpg

from shared.config import SinkConfig
from shared.errors import ConfigError, PermanentSinkError, SinkMisconfigured, TransientError
from shared.event import Event

from .sinks import Source, idempotency_key

# The documented schema (README "PostgreSQL sink"). Times are timestamptz; `ts` is the client's clock,
# `received_at` the collector's, `delivered_at` the first successful insert; `canary`: the auditor's probe
# events (filter them out, or set the sink's `drop_canaries: true`).
TABLE_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    idempotency_key text PRIMARY KEY,
    event_id        text NOT NULL,
    tenant          text NOT NULL,
    type            text NOT NULL,
    ts              timestamptz NOT NULL,
    received_at     timestamptz,
    delivered_at    timestamptz NOT NULL DEFAULT now(),
    device_id       text,
    session_id      text,
    payload         jsonb NOT NULL,
    context         jsonb NOT NULL,
    enrichment      jsonb NOT NULL,
    canary          boolean NOT NULL DEFAULT false
)
"""

INSERT_ONCE = """
INSERT INTO {table} (idempotency_key, event_id, tenant, type, ts, received_at, device_id, session_id,
                     payload, context, enrichment, canary)
SELECT k, e, tn, ty, ts, ra, d, s, p::jsonb, c::jsonb, en::jsonb, ca
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[],
            $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::boolean[])
     AS u(k, e, tn, ty, ts, ra, d, s, p, c, en, ca)
ON CONFLICT (idempotency_key) DO NOTHING
"""

# Refused, reset, timed out, or a connection left mid-protocol by a server that went away (asyncpg then
# fails the pool's reset with InternalClientError): all retried on a new pool.
CONNECTION_LOST = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError)

# SQLSTATE classes that say the rows are at fault (22 data exception, 23 integrity): dead-letter them.
BAD_DATA_CLASSES = ("22", "23")
# The sink itself is wrong for every row (28 auth, 3D no database, 3F no schema, 42 no table/privilege/columns).
SINK_WIDE_CLASSES = ("28", "3D", "3F", "42")


def dsn_from_env(config: SinkConfig) -> str:
    """The DSN is a secret: only the name of its environment variable is in the config file."""
    name = config.options["dsn_env"]
    dsn = os.environ.get(name)
    if not dsn:
        raise ConfigError(f"sinks.{config.name}.dsn_env", f"environment variable {name} is not set")
    return dsn


def _time(ms: float) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000.0, UTC) if ms else None


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class PostgresSink:
    """Rows into `options.table` over an asyncpg pool (connected lazily, so a sender starts while Postgres
    is down). Connection loss, timeouts, server restarts and overload are TransientError (the batch is
    retried, which ON CONFLICT makes safe); a data error refuses the batch (PermanentSinkError: the sender
    bisects and dead-letters only the culprit); auth, a missing table or a privilege refuse every batch
    (SinkMisconfigured)."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self.dsn = dsn_from_env(config)
        self.table = config.options["table"]
        self.insert = INSERT_ONCE.format(table=self.table)
        self.pool: asyncpg.Pool | None = None
        self.table_ready = False
        self.connecting = asyncio.Lock()

    async def start(self) -> None:
        pass  # connect on first use: a database that is down must not keep the sender from starting

    async def _pool(self) -> asyncpg.Pool:
        async with self.connecting:
            if self.pool is None:
                self.pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=0,
                    max_size=4,
                    command_timeout=self.config.timeout_s,
                    timeout=self.config.timeout_s,
                )
            if not self.table_ready:
                await self._create_table(self.pool)
                self.table_ready = True
            return self.pool

    async def _create_table(self, pool: asyncpg.Pool) -> None:
        """CREATE TABLE IF NOT EXISTS is not safe against itself: of two at once, one fails with a unique
        violation (23505) on pg_type. An advisory lock per table name makes the workers take turns; and no
        error here is the events' fault, so none is a PermanentSinkError."""
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"hifi.sink.{self.table}")
                await conn.execute(TABLE_SCHEMA.format(table=self.table))
        except asyncpg.PostgresError as exc:
            error = self._classify(exc)
            if isinstance(error, PermanentSinkError):
                raise TransientError(str(error)) from exc
            raise error from exc

    def _rows(self, events: list[Event]) -> list[list[Any]]:
        columns: list[list[Any]] = [[] for _ in range(12)]
        for event in events:
            try:
                row = (
                    idempotency_key(self.config.name, event),
                    event.event_id,
                    event.tenant,
                    event.type,
                    _time(event.ts) or datetime.fromtimestamp(0, UTC),
                    _time(event.ingest_ts),
                    event.device_id,
                    event.session_id,
                    _json(event.payload),
                    _json(event.context),
                    _json(event.enrichment),
                    event.canary,
                )
            except (ValueError, OverflowError, OSError, TypeError) as exc:  # a ts no timestamptz can hold
                raise PermanentSinkError(
                    f"postgres sink {self.config.name}: event {event.event_id}: {type(exc).__name__}: {exc}"
                ) from exc
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        return columns

    async def deliver_batch(self, events: list[Event], source: Source | None = None) -> None:
        columns = self._rows(events)
        try:
            pool = await self._pool()
            await pool.execute(self.insert, *columns)
        except asyncpg.PostgresError as exc:
            error = self._classify(exc)
            if isinstance(exc, asyncpg.PostgresConnectionError) or str(exc.sqlstate).startswith("57P"):
                await self._drop_pool()
            raise error from exc
        except CONNECTION_LOST as exc:
            await self._drop_pool()
            raise TransientError(f"postgres sink {self.config.name}: {type(exc).__name__}: {exc}") from exc

    async def _drop_pool(self) -> None:
        """After a lost connection or a server restart: new connections next time, none half-reset."""
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.terminate()

    def _classify(self, exc: asyncpg.PostgresError) -> Exception:
        state = getattr(exc, "sqlstate", None) or ""
        message = f"postgres sink {self.config.name}: SQLSTATE {state} {type(exc).__name__}: {exc}"
        if state.startswith(BAD_DATA_CLASSES):
            return PermanentSinkError(message)
        if state.startswith(SINK_WIDE_CLASSES):
            self.table_ready = False  # a dropped table is created again once the operator allows it
            return SinkMisconfigured(message)
        return TransientError(message)  # 08 connection, 53 resources, 57 shutdown, 40 rollback, ...

    async def probe(self) -> None:
        try:
            pool = await self._pool()
            await pool.fetchval("SELECT 1")
        except (asyncpg.PostgresError, *CONNECTION_LOST) as exc:
            await self._drop_pool()
            raise TransientError(f"postgres sink {self.config.name} probe: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), self.config.timeout_s)
            except TimeoutError:
                self.pool.terminate()
