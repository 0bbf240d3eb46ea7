"""Issue 19 part 2: the PostgreSQL sink against a real server (Debian's postgres, started by the fixture):
rows in the documented schema, exactly once per idempotency key across re-delivery and server restarts,
and a row Postgres refuses dead-lettered alone."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from asyncpg.exceptions import _base as asyncpg_base

from devtools.postgres import LocalPostgres, local_postgres_for
from devtools.traffic import EventFactory
from services.sender.postgres import PostgresSink
from services.sender.sinks import make_sink
from shared.config import HifiConfig, SinkConfig
from shared.dlq import DeadLetterQueues
from shared.errors import ConfigError, PermanentSinkError, SinkMisconfigured, TransientError
from shared.event import Event
from shared.topics import Topics
from tests.helpers import post, tenant_block, wait_for
from tests.test_auditor import audit_summary

DSN_ENV = "HIFI_TEST_PG_DSN"
# One xdist worker runs them all: they share the session's Postgres and its databases.
pytestmark = pytest.mark.xdist_group("postgres-session-server")


def events(n: int, prefix: str = "e", tenant: str = "acme") -> list[Event]:
    return [
        Event(
            f"{prefix}{i}", "play", 1_700_000_000_000.0 + i, tenant, {"i": i}, device_id=f"d{i % 3}", ingest_ts=1.7e12
        )
        for i in range(n)
    ]


@pytest.fixture
def table() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def pg_dsn(postgres_server: LocalPostgres, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(DSN_ENV, postgres_server.dsn)
    return postgres_server.dsn


@pytest.fixture
async def pg_sink(pg_dsn: str, table: str) -> AsyncIterator[PostgresSink]:
    sink = PostgresSink(SinkConfig("pg", "postgres", {"dsn_env": DSN_ENV, "table": table}, timeout_s=5))
    await sink.start()
    yield sink
    await sink.close()


async def rows(dsn: str, table: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY event_id")]
    finally:
        await conn.close()


async def test_postgres_sink_writes_rows_in_the_documented_schema(pg_sink, pg_dsn, table):
    batch = events(3)
    batch[1].enrichment = {"geo": {"country": "NL"}}
    await pg_sink.deliver_batch(batch)
    got = await rows(pg_dsn, table)
    assert [r["idempotency_key"] for r in got] == ["pg:acme:e0", "pg:acme:e1", "pg:acme:e2"]
    second = got[1]
    assert (second["event_id"], second["tenant"], second["type"], second["device_id"]) == ("e1", "acme", "play", "d1")
    assert second["ts"].timestamp() * 1000 == pytest.approx(1_700_000_000_001.0)
    assert second["received_at"].timestamp() == pytest.approx(1.7e9)
    assert second["delivered_at"] is not None
    assert json.loads(second["payload"]) == {"i": 1}
    assert json.loads(second["enrichment"]) == {"geo": {"country": "NL"}}


async def test_postgres_sink_workers_creating_the_table_at_once_refuse_no_event(pg_dsn):
    """Several sender workers' first batches race to create the table: Postgres answers one of two
    concurrent CREATE TABLE IF NOT EXISTS with a unique violation (23505), which must not dead-letter."""
    for _ in range(5):
        table = f"race_{uuid.uuid4().hex[:10]}"
        sinks = [PostgresSink(SinkConfig("pg", "postgres", {"dsn_env": DSN_ENV, "table": table})) for _ in range(6)]
        try:
            outcomes = await asyncio.gather(
                *(sink.deliver_batch(events(1, prefix=f"w{i}-")) for i, sink in enumerate(sinks)),
                return_exceptions=True,
            )
        finally:
            for sink in sinks:
                await sink.close()
        assert outcomes == [None] * 6, outcomes
        assert len(await rows(pg_dsn, table)) == 6


async def test_postgres_sink_redelivered_batch_adds_no_rows(pg_sink, pg_dsn, table):
    """The sender's kill window: a batch committed in Postgres whose offsets were never committed is
    delivered again, whole or overlapping a later one."""
    await pg_sink.deliver_batch(events(50))
    await pg_sink.deliver_batch(events(50))
    await pg_sink.deliver_batch(events(80))
    got = Counter(r["event_id"] for r in await rows(pg_dsn, table))
    assert got == Counter({f"e{i}": 1 for i in range(80)})


async def test_postgres_sink_refuses_a_row_postgres_cannot_store(pg_sink, pg_dsn, table):
    """jsonb holds no NUL character: a data error refuses the batch for good (the sender bisects it)."""
    batch = events(3)
    batch[1].payload = {"note": "a\x00b"}
    with pytest.raises(PermanentSinkError, match="SQLSTATE 22"):
        await pg_sink.deliver_batch(batch)
    await pg_sink.deliver_batch([batch[0], batch[2]])
    assert [r["event_id"] for r in await rows(pg_dsn, table)] == ["e0", "e2"]


async def test_postgres_sink_down_is_transient_and_missing_privilege_is_sink_wide(postgres_server, monkeypatch):
    monkeypatch.setenv(DSN_ENV, "postgresql://postgres@127.0.0.1:1/hifi")
    down = PostgresSink(SinkConfig("pg", "postgres", {"dsn_env": DSN_ENV, "table": "t"}, timeout_s=2))
    with pytest.raises(TransientError):
        await down.deliver_batch(events(1))
    with pytest.raises(TransientError):
        await down.probe()
    await down.close()
    monkeypatch.setenv(DSN_ENV, postgres_server.dsn)
    wrong = PostgresSink(SinkConfig("pg", "postgres", {"dsn_env": DSN_ENV, "table": "no_such_schema.t"}, timeout_s=2))
    with pytest.raises(SinkMisconfigured, match="SQLSTATE 3F000"):
        await wrong.deliver_batch(events(1))
    await wrong.close()


def test_postgres_sink_config_names_the_bad_field(monkeypatch):
    def parse(**options: Any) -> HifiConfig:
        return HifiConfig.parse({"tenants": {}, "sinks": {"db": {"type": "postgres", **options}}})

    with pytest.raises(ConfigError, match=r"sinks\.db\.table"):
        parse(dsn_env="PG_DSN")
    with pytest.raises(ConfigError, match=r"sinks\.db\.dsn_env"):
        parse(dsn_env="postgresql://user:secret@db/x", table="events")
    with pytest.raises(ConfigError, match=r"sinks\.db\.table"):
        parse(dsn_env="PG_DSN", table="events; DROP TABLE x")
    config = parse(dsn_env="PG_DSN", table="analytics.events")
    monkeypatch.delenv("PG_DSN", raising=False)
    with pytest.raises(ConfigError, match=r"sinks\.db\.dsn_env: environment variable PG_DSN is not set"):
        make_sink(config.sinks["db"], "b:9092", "redis://127.0.0.1:1/0")


@pytest.mark.slow  # restarts and kills -9 a PostgreSQL server for half a minute: a fault scenario, not the inner loop
async def test_postgres_sink_server_restarted_and_killed_mid_stream_writes_each_event_once(port_base):
    """Postgres is restarted (fast shutdown) and killed -9 while batches are written; the caller retries
    each batch until it is acknowledged, as the sender does."""
    own = LocalPostgres(port=port_base + 43)  # data under .cache: the postgres user cannot enter tmp_path
    own.wipe()
    own.ensure()
    config = SinkConfig("pg", "postgres", {"dsn_env": DSN_ENV, "table": "restarts"}, timeout_s=2)
    os.environ[DSN_ENV] = own.dsn
    sink = PostgresSink(config)
    done = asyncio.Event()
    restarts = 0

    async def restart_now_and_then() -> None:
        nonlocal restarts
        while not done.is_set():
            await asyncio.sleep(0.3)
            await asyncio.to_thread(own.kill if restarts % 2 else own.stop)
            restarts += 1
            await asyncio.to_thread(own.ensure)

    restarter = asyncio.create_task(restart_now_and_then())
    retries = 0
    written = 0  # batches acknowledged: at least 30, and on until both faults (stop, kill -9) have struck
    try:
        while written < 30 or restarts < 2:
            if written >= 3000:
                raise AssertionError(f"only {restarts} restarts while {written} batches were written")
            b, written = written, written + 1
            batch = events(200, prefix=f"b{b}-")
            for _ in range(400):
                try:
                    await sink.deliver_batch(batch)
                    break
                except TransientError:
                    retries += 1
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"batch {b} never acknowledged")
        done.set()
        await restarter
        got = Counter(r["event_id"] for r in await rows(own.dsn, "restarts"))
    finally:
        done.set()
        restarter.cancel()
        await sink.close()
        os.environ.pop(DSN_ENV, None)
        own.wipe()
    assert restarts >= 2 and retries >= 1
    assert got == Counter({f"b{b}-{i}": 1 for b in range(written) for i in range(200)}), {
        k: n for k, n in got.items() if n != 1
    }


@pytest.fixture
def restartable_postgres(port_base: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalPostgres]:
    """A server of the test's own: stopping the session's server failed other tests' connections in CI."""
    own = LocalPostgres(port=port_base + 44)
    own.ensure()
    monkeypatch.setenv(DSN_ENV, own.dsn)
    yield own
    own.stop()


async def test_pipeline_postgres_sink_restart_mid_stream_and_a_bad_row(
    tmp_path: Path, namespace, settings_for, start_pipeline, kafka, table, restartable_postgres
):
    """The real pipeline: Postgres restarted while events flow, and one event Postgres refuses. Every other
    event is a row exactly once; the refused one is dead-lettered with its SQLSTATE."""
    postgres_server = restartable_postgres
    pg_dsn = postgres_server.dsn
    config = tmp_path / "hifi.yaml"
    config.write_text(
        "tenants:\n"
        + tenant_block("acme", "k", ["db"])
        + f"sinks:\n  db: {{type: postgres, dsn_env: {DSN_ENV}, table: {table}, timeout_s: 2}}\n"
        # Buckets settle well after the restart's retries: a late delivery is not a loss.
        + "audit: {bucket_s: 2, settle_s: 20, canary_interval_s: 2, dlq_check_s: 1}\n"
    )
    pipeline = await start_pipeline(settings_for(config), auditor=True)
    queues = DeadLetterQueues(kafka.bootstrap, Topics(namespace), ["db"])
    factory = EventFactory(producer_id=namespace)
    first = [factory.make() for _ in range(200)]
    second = [factory.make() for _ in range(200)]
    first[60]["payload"] = {"note": "nul \u0000 inside"}
    bad = first[60]["event_id"]

    async def count() -> int:
        return len([r for r in await rows(pg_dsn, table) if not r["canary"]]) if await table_exists() else 0

    async def table_exists() -> bool:
        conn = await asyncpg.connect(pg_dsn)
        try:
            return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table))
        finally:
            await conn.close()

    assert (await post(pipeline.collector_url, "k", first))[0] == 200
    await wait_for(lambda: count_ge(count, 150), 60, "the first rows", pipeline)
    await asyncio.to_thread(postgres_server.stop)
    assert (await post(pipeline.collector_url, "k", second))[0] == 200
    await asyncio.sleep(2.0)  # the sender meets a database that is down, and retries
    await asyncio.to_thread(postgres_server.ensure)
    await wait_for(lambda: count_ge(count, 399), 90, "every good row after the restart", pipeline)

    async def one_dead() -> bool:
        return (await queues.counts())["sender.db"] >= 1

    await wait_for(one_dead, 30, "the refused event dead-lettered", pipeline)
    await asyncio.sleep(2.0)  # a duplicate or a stray dead letter would arrive right behind
    letters = await queues.read("sender.db", limit=10)
    table_rows = await rows(pg_dsn, table)
    got = Counter(r["event_id"] for r in table_rows if not r["canary"])
    assert got == Counter(e["event_id"] for e in first + second if e["event_id"] != bad)
    assert [letter["original"]["event_id"] for letter in letters] == [bad]
    assert "SQLSTATE 22" in str(letters[0])
    # The auditor counts the refused event as dead-lettered, never as lost; its canaries reach the table too.
    await wait_for(lambda: audit_summary(pipeline)["buckets_settled"] >= 2, 60, "settled buckets", pipeline)
    summary = audit_summary(pipeline)
    assert summary["lost_by_stage"] == {}, summary
    assert summary["sinks"]["db"]["acme"]["lost"] == 0, summary["sinks"]["db"]
    assert any(r["canary"] for r in table_rows)


async def count_ge(count: Any, n: int) -> bool:
    return await count() >= n


def test_hifi_up_starts_the_postgres_a_sink_needs_and_only_a_local_one(monkeypatch):
    sink = SinkConfig("db", "postgres", {"dsn_env": "HIFI_UP_PG_DSN", "table": "events"})
    monkeypatch.delenv("HIFI_UP_PG_DSN", raising=False)
    server = local_postgres_for(sink)
    assert server is not None and server.port == 5432
    assert os.environ["HIFI_UP_PG_DSN"] == server.dsn, "the services inherit the DSN of the server started"
    monkeypatch.setenv("HIFI_UP_PG_DSN", "postgresql://app:pw@localhost:15499/app")
    assert local_postgres_for(sink).port == 15499
    monkeypatch.setenv("HIFI_UP_PG_DSN", "postgresql://app:pw@db.example.com/app")
    assert local_postgres_for(sink) is None
    assert local_postgres_for(SinkConfig("f", "file", {"path": "x"})) is None


# -- cold review (i19p): write refusals hold, secrets stay secret, commits are synchronous --------------


@pytest.fixture
async def own_database(postgres_server: LocalPostgres, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """A database of this test's own: ALTER DATABASE on it touches no other test's connections."""
    name = f"db_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres_server.dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        dsn = postgres_server.dsn.rsplit("/", 1)[0] + f"/{name}"
        monkeypatch.setenv(DSN_ENV, dsn)
        yield dsn
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


async def alter_database(dsn: str, setting: str) -> None:
    """`ALTER DATABASE <this one> SET ...` (or RESET), from a connection to another database."""
    name = dsn.rsplit("/", 1)[1]
    admin = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/hifi")
    try:
        await admin.execute(f"ALTER DATABASE {name} {setting}")
        # Sessions open before the change keep the old setting: a failover would have cut them too.
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
    finally:
        await admin.close()


async def test_a_database_refusing_writes_holds_the_batch_and_dead_letters_nothing(own_database, redis_server):
    """A server that reads but refuses writes (read-only after a failover, like a full disk or a lock
    timeout) is the sink's state, not the events': the sender holds the batch, however often it retries,
    and it lands once writes are back."""
    from services.sender.delivery import SinkDelivery
    from tests.test_sink_exactly_once import delivery_for, record_of

    table = "readonly_batch"
    config = SinkConfig("pg", "postgres", {"dsn_env": DSN_ENV, "table": table}, timeout_s=2, max_attempts_per_event=2)
    sink = PostgresSink(config)
    await sink.deliver_batch(events(1, prefix="before-"))  # the table exists before the failover
    delivery: SinkDelivery = delivery_for(sink, redis_server.url, f"pgro-{uuid.uuid4().hex[:8]}")
    batch = events(6)
    records = [record_of(e, "in", i % 2, i) for i, e in enumerate(batch)]
    dead: list[Any] = []
    try:
        await alter_database(own_database, "SET default_transaction_read_only = on")
        failures = 0
        for _ in range(12):  # well past max_attempts_per_event: suspicion would have isolated and probed
            try:
                result = await delivery.handle(records)
            except TransientError:
                failures += 1
                await asyncio.sleep(0.06)  # past the test breaker's reset (0.05 s)
                continue
            dead.extend(result.dead)
            break
        assert dead == [], [str(d.error) for d in dead]
        assert failures == 12, "no write can succeed while the database is read-only"
        with pytest.raises(TransientError):
            await sink.probe()  # SELECT 1 answers on a read-only server: the probe must ask about writes
        await alter_database(own_database, "RESET default_transaction_read_only")
        for _ in range(40):
            try:
                result = await delivery.handle(records)
                break
            except TransientError:
                await asyncio.sleep(0.06)
        else:
            raise AssertionError("the batch never landed once writes were back")
        assert result.dead == []
    finally:
        await sink.close()
    got = Counter(r["event_id"] for r in await rows(own_database, table))
    assert got == Counter({"before-0": 1, **{e.event_id: 1 for e in batch}})


async def test_a_batch_too_slow_for_the_statement_timeout_is_split_and_lands(own_database, redis_server):
    """A statement timeout (57014) on a many-row statement may be the batch's size, not the server: held as
    sink-wide it would be sent whole for ever (a stalled partition). Retried, the sender splits it; rows small
    enough for the server's statement_timeout land, each once, and nothing is dead-lettered."""
    from services.sender.delivery import SinkDelivery
    from tests.test_sink_exactly_once import delivery_for, record_of

    table = "slow_batch"
    config = SinkConfig("pg", "postgres", {"dsn_env": DSN_ENV, "table": table}, timeout_s=5, max_attempts_per_event=2)
    sink = PostgresSink(config)
    await sink.deliver_batch(events(1, prefix="before-"))  # the table exists
    admin = await asyncpg.connect(own_database)
    try:  # 60 ms per row: 16 rows take about 1 s, past a 400 ms statement_timeout; 4 rows do not
        await admin.execute(
            "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(0.06); RETURN NEW; END $$"
        )
        await admin.execute(f"CREATE TRIGGER slow BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION slow_row()")
    finally:
        await admin.close()
    await alter_database(own_database, "SET statement_timeout = '400ms'")
    delivery: SinkDelivery = delivery_for(sink, redis_server.url, f"pgslow-{uuid.uuid4().hex[:8]}")
    batch = events(16)
    records = [record_of(e, "in", 0, i) for i, e in enumerate(batch)]
    dead: list[Any] = []
    try:
        for _ in range(60):
            try:
                result = await delivery.handle(records)
            except TransientError:
                await asyncio.sleep(0.06)  # past the test breaker's reset (0.05 s)
                continue
            dead.extend(result.dead)
            break
        else:
            raise AssertionError("the batch never landed: sent whole again and again")
    finally:
        await sink.close()
    assert dead == [], [str(d.error) for d in dead]
    got = Counter(r["event_id"] for r in await rows(own_database, table))
    assert got == Counter({"before-0": 1, **{e.event_id: 1 for e in batch}})


async def test_a_failed_pool_dropped_late_leaves_the_newer_pool_alone(pg_sink, pg_dsn):
    """A delivery failing on an old pool after another delivery already replaced it must not terminate
    the new pool under the requests it serves."""
    await pg_sink.deliver_batch(events(1, prefix="first-"))
    old_pool = pg_sink.pool
    assert old_pool is not None
    late = asyncio.Event()
    entered = asyncio.Event()

    class FailingPool:
        """The old pool, whose first request's connection resets late and whose second resets at once."""

        calls = 0

        async def execute(self, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == 1:
                entered.set()
                await late.wait()
                raise ConnectionResetError("injected: the old pool's connection reset late")
            if self.calls == 2:
                raise ConnectionResetError("injected: connection reset")
            return await old_pool.execute(*args, **kwargs)

        def terminate(self) -> None:
            old_pool.terminate()

    pg_sink.pool = FailingPool()  # type: ignore[assignment]
    slow = asyncio.create_task(pg_sink.deliver_batch(events(1, prefix="slow-")))
    await entered.wait()
    with pytest.raises(TransientError):
        await pg_sink.deliver_batch(events(1, prefix="second-"))
    await pg_sink.deliver_batch(events(1, prefix="second-"))  # on a new pool
    new_pool = pg_sink.pool
    assert new_pool is not None and not isinstance(new_pool, FailingPool) and new_pool is not old_pool
    late.set()
    with pytest.raises(TransientError):
        await slow
    assert pg_sink.pool is new_pool and not new_pool.is_closing()


@pytest.mark.parametrize("password", ["pa/ss-Secret1", "pa#ss-Secret1", "pa?ss-Secret1"])
def test_a_dsn_with_unescaped_password_characters_fails_at_start_without_the_password(
    password, postgres_server, monkeypatch
):
    monkeypatch.setenv(DSN_ENV, f"postgresql://postgres:{password}@127.0.0.1:{postgres_server.port}/hifi")
    with pytest.raises(ConfigError, match=rf"sinks\.pg\.dsn_env: .*{DSN_ENV}") as raised:
        PostgresSink(SinkConfig("pg", "postgres", {"dsn_env": DSN_ENV, "table": "t"}))
    assert "Secret1" not in str(raised.value) and "ss-" not in str(raised.value)
    assert raised.value.__cause__ is None
    for valid in (
        "postgresql://app:pa%2Fss%23w%3F@db.internal:5432/hifi?sslmode=require",
        "postgres://app:pw@h1:5432,h2:5433/hifi?target_session_attrs=read-write",  # multi-host, for failover
    ):
        monkeypatch.setenv(DSN_ENV, valid)
        assert PostgresSink(SinkConfig("pg", "postgres", {"dsn_env": DSN_ENV, "table": "t"})).dsn == valid


async def test_a_pool_that_cannot_be_made_is_sink_wide_and_never_echoes_the_dsn(pg_sink, monkeypatch):
    """Whatever asyncpg raises while connecting (here: a ValueError quoting the DSN, as it does for an
    unparsable one) holds the sink and pages; the password reaches no dead letter, log or Sentry event."""

    async def leaking_create_pool(dsn: str, **kwargs: Any) -> Any:
        raise ValueError(f"invalid literal in {dsn}: 'hunter2-secret'")

    monkeypatch.setattr(asyncpg, "create_pool", leaking_create_pool)
    with pytest.raises(SinkMisconfigured) as raised:
        await pg_sink.deliver_batch(events(1))
    assert "hunter2" not in str(raised.value) and pg_sink.dsn not in str(raised.value)
    assert DSN_ENV in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__context__ is None  # no chained DSN
    with pytest.raises(SinkMisconfigured) as probed:
        await pg_sink.probe()
    assert "hunter2" not in str(probed.value)


async def test_commits_are_synchronous_on_a_server_configured_asynchronous(own_database):
    """synchronous_commit=off acks a commit a crash can lose: the sink's sessions insist on `on`."""
    await alter_database(own_database, "SET synchronous_commit = off")
    check = await asyncpg.connect(own_database)
    try:
        assert await check.fetchval("SHOW synchronous_commit") == "off", "the test server is not set up"
    finally:
        await check.close()
    sink = PostgresSink(SinkConfig("pg", "postgres", {"dsn_env": DSN_ENV, "table": "sync"}, timeout_s=5))
    try:
        await sink.deliver_batch(events(1))
        assert sink.pool is not None
        async with sink.pool.acquire() as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
    finally:
        await sink.close()


async def test_a_value_the_client_cannot_encode_is_refused_for_that_row(pg_sink, pg_dsn, table):
    """A lone surrogate cannot be encoded as UTF-8. asyncpg 0.32 reports it as `asyncpg.DataError` (SQLSTATE
    22000); its client-side `DataError` is an InterfaceError, which must still mean the row, not a lost
    connection (injected below: no pool is dropped, the batch is refused for good)."""
    batch = events(3)
    batch[1].payload = {"note": "half a pair \ud800"}
    with pytest.raises(PermanentSinkError):
        await pg_sink.deliver_batch(batch)
    await pg_sink.deliver_batch([batch[0], batch[2]])
    assert [r["event_id"] for r in await rows(pg_dsn, table)] == ["e0", "e2"]
    pool = pg_sink.pool
    assert pool is not None

    class EncodingFailsPool:
        async def execute(self, *args: Any, **kwargs: Any) -> Any:
            raise asyncpg_base.DataError("invalid input for query argument $9: 'utf-8' codec can't encode")

        def terminate(self) -> None:
            pool.terminate()

    refusing = EncodingFailsPool()
    pg_sink.pool = refusing  # type: ignore[assignment]
    with pytest.raises(PermanentSinkError, match="invalid input for query argument"):
        await pg_sink.deliver_batch([batch[1]])
    assert pg_sink.pool is refusing, "an encoding failure is no reason to reconnect"
    pg_sink.pool = pool
