"""The PostgreSQL sink: one table per sink, each event's row written once per idempotency key.

A batch is one statement, `INSERT .. SELECT .. FROM unnest(...) ON CONFLICT (idempotency_key) DO NOTHING`,
committed before `deliver_batch` returns, with `synchronous_commit=on` forced per session (a server or role set
to `off` would ack commits a crash loses). A batch re-sent after a kill of the sender, a
timeout or a server restart (outcome unknown) inserts only the rows that are not there yet: exactly once in
the database. The table is created if missing (`TABLE_SCHEMA`).
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from asyncpg.exceptions import _base as asyncpg_base

from shared.config import SinkConfig
from shared.errors import ConfigError, HifiError, PermanentSinkError, SinkMisconfigured, TransientError
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
# A server that reads but refuses writes: 53 resources (53100 disk full), 25006 read-only (a standby after a
# failover), 57014 statement/lock timeout (of one row; a many-row batch is split, see _classify), 55P03 lock
# not available, 55000 not in prerequisite state. No row is at fault: hold and page, never isolate (a probe
# would find the server up and dead-letter good events).
WRITES_REFUSED_CLASSES = ("53",)
WRITES_REFUSED_STATES = frozenset({"25006", "57014", "55P03", "55000"})
STATEMENT_TIMEOUT = "57014"
READ_ONLY = "25006"  # after a failover the pool may still point at the demoted server: reconnect
DSN_SCHEMES = ("postgres", "postgresql")


def dsn_from_env(config: SinkConfig) -> str:
    """The DSN is a secret: only the name of its environment variable is in the config file, and no error
    here quotes the value (asyncpg's own parse errors do, password included)."""
    name = config.options["dsn_env"]
    dsn = os.environ.get(name)
    field = f"sinks.{config.name}.dsn_env"
    if not dsn:
        raise ConfigError(field, f"environment variable {name} is not set")
    problem = _dsn_problem(dsn)
    if problem:
        raise ConfigError(field, f"environment variable {name}: {problem}")
    return dsn


def _dsn_problem(dsn: str) -> str | None:
    """What is wrong with a `postgresql://` DSN, in words that quote none of it; None if it parses."""
    try:
        parts = urlsplit(dsn)  # no `.port`: a multi-host DSN (`h1:5432,h2:5432`) is valid for asyncpg
    except ValueError:
        return "not a postgresql:// URL (an unescaped '[', ']', '/', '?' or '#'? percent-encode it)"
    if parts.scheme not in DSN_SCHEMES:
        return "must start with postgresql://"
    if "@" in parts.path + parts.query + parts.fragment:
        return "an unescaped '/', '?' or '#' in the user or password ends the host part early: percent-encode it"
    return None


def _time(ms: float) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000.0, UTC) if ms else None


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class PostgresSink:
    """Rows into `options.table` over an asyncpg pool (connected lazily, so a sender starts while Postgres
    is down). Connection loss, client timeouts and server restarts are TransientError (the batch is
    retried, which ON CONFLICT makes safe); a data error refuses the batch (PermanentSinkError: the sender
    bisects and dead-letters only the culprit); auth, a missing table or a privilege, a bad DSN, and a
    server that refuses writes (read-only, disk full, lock timeouts) refuse every batch (SinkMisconfigured)."""

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
                    server_settings={"synchronous_commit": "on"},  # an ack is a durable commit, whatever the role's
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
        pool: asyncpg.Pool | None = None
        unknown: str | None = None
        try:
            pool = await self._pool()
            await pool.execute(self.insert, *columns)
            return
        except HifiError:
            raise  # classified already (the table's creation)
        except asyncpg.PostgresError as exc:
            error = self._classify(exc, len(events))
            state = str(exc.sqlstate)
            if isinstance(exc, asyncpg.PostgresConnectionError) or state.startswith("57P") or state == READ_ONLY:
                await self._drop_pool(pool)
            raise error from exc
        except asyncpg_base.DataError as exc:  # a value the client cannot encode: that row's fault
            raise PermanentSinkError(f"postgres sink {self.config.name}: {type(exc).__name__}: {exc}") from exc
        except asyncpg.ClientConfigurationError as exc:  # a bad DSN parameter: every connection fails alike
            unknown = type(exc).__name__
        except CONNECTION_LOST as exc:
            await self._drop_pool(pool)
            raise TransientError(f"postgres sink {self.config.name}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # asyncpg's DSN parse errors quote the DSN: name the type only
            unknown = type(exc).__name__
        raise self._scrubbed(unknown)  # outside the except: no chained exception carries the DSN either

    def _scrubbed(self, error_type: str) -> SinkMisconfigured:
        """A connection that failed for a reason other than Postgres or the network: the DSN is wrong for every
        event (hold and page). The message names the variable, never the DSN."""
        return SinkMisconfigured(
            f"postgres sink {self.config.name}: {error_type} while connecting: check the DSN in "
            f"{self.config.options['dsn_env']} (not shown: it is a secret)"
        )

    async def _drop_pool(self, pool: asyncpg.Pool | None) -> None:
        """After a lost connection, a server restart or a failover: new connections next time, none half-reset.
        Only the pool that failed: a request failing late on an old pool leaves its successor alone."""
        if pool is None:
            return
        if self.pool is pool:
            self.pool = None
        pool.terminate()

    def _classify(self, exc: asyncpg.PostgresError, rows: int = 1) -> Exception:
        """`rows`: how many rows the failed statement carried."""
        state = getattr(exc, "sqlstate", None) or ""
        message = f"postgres sink {self.config.name}: SQLSTATE {state} {type(exc).__name__}: {exc}"
        if state.startswith(BAD_DATA_CLASSES):
            return PermanentSinkError(message)
        if state.startswith(SINK_WIDE_CLASSES):
            self.table_ready = False  # a dropped table is created again once the operator allows it
            return SinkMisconfigured(message)
        if state == STATEMENT_TIMEOUT and rows > 1:
            # Maybe the batch is too big for the server's statement_timeout: retried, so the sender's
            # isolation splits it. Held as sink-wide it would stall the partition for good. A single row that
            # times out is a lock or the server: hold and page.
            return TransientError(f"{message} ({rows} rows in one statement)")
        if state.startswith(WRITES_REFUSED_CLASSES) or state in WRITES_REFUSED_STATES:
            return SinkMisconfigured(f"{message} (the database refuses writes)")
        return TransientError(message)  # 08 connection, 57P shutdown, 40 rollback, ...

    async def probe(self) -> None:
        """Up means writable: a standby or a read-only database answers `SELECT 1` and refuses every insert."""
        pool: asyncpg.Pool | None = None
        unknown: str | None = None
        try:
            pool = await self._pool()
            row = await pool.fetchrow(
                "SELECT pg_is_in_recovery() AS standby, current_setting('transaction_read_only') = 'on' AS read_only"
            )
        except HifiError:
            raise
        except (asyncpg.PostgresError, *CONNECTION_LOST) as exc:
            if not isinstance(exc, asyncpg.ClientConfigurationError):
                await self._drop_pool(pool)
                raise TransientError(f"postgres sink {self.config.name} probe: {type(exc).__name__}: {exc}") from exc
            unknown = type(exc).__name__
        except Exception as exc:  # as in deliver_batch: never echo the DSN
            unknown = type(exc).__name__
        if unknown is not None:
            raise self._scrubbed(unknown)
        assert row is not None
        if row["standby"] or row["read_only"]:
            await self._drop_pool(pool)  # a failover moves the primary: the next pool may reach it
            raise SinkMisconfigured(
                f"postgres sink {self.config.name} probe: the database is read-only"
                f"{' (a standby in recovery)' if row['standby'] else ''}: writes refused"
            )

    async def close(self) -> None:
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), self.config.timeout_s)
            except TimeoutError:
                self.pool.terminate()
