"""The app factory every service uses: a Faust app with Hifi's safe defaults.

Faust gives each service its agents, tables (RocksDB), web server and group membership. Two things
are changed on purpose:
- the producer is idempotent with acks=all (Faust only does that inside transactions);
- values and keys are raw bytes: each stage decodes msgpack itself, once, so undecodable bytes are
  dead-lettered with a reason instead of being logged and skipped by Faust's deserializer.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from shared.config import Settings

log = logging.getLogger(__name__)


class IdempotentProducer(faust_aiokafka.Producer):
    """Durable by default: the broker acks only once every in-sync replica has the record."""

    def _settings_extra(self) -> dict[str, Any]:
        return {"acks": "all", "enable_idempotence": True}


class GaplessConsumer(faust_aiokafka.Consumer):
    """Never commits over offsets nobody processed.

    Faust records a jump in read offsets as a "gap" and later counts it as acked, for topics with
    transaction markers or compaction. Hifi's stage topics have neither; there a jump means events
    Faust dropped during a rebalance, which the stage runner re-reads (see `PartitionCursors`).
    """

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        return None


class HifiTransport(faust_aiokafka.Transport):
    Producer = IdempotentProducer
    Consumer = GaplessConsumer


class HifiApp(faust.App):
    def _new_transport(self) -> HifiTransport:
        return HifiTransport(self.conf.broker_consumer, self)

    def _new_producer_transport(self) -> HifiTransport:
        return HifiTransport(self.conf.broker_producer, self)


def create_app(app_id: str, settings: Settings, web_port: int, **overrides: Any) -> HifiApp:
    """One Faust app per service process. `app_id` is also the consumer group id."""
    datadir = Path(settings.data_dir).resolve() / "faust" / app_id
    datadir.mkdir(parents=True, exist_ok=True)
    port = settings.web_port or web_port
    host = settings.advertised_host or (
        settings.web_host if settings.web_host not in ("0.0.0.0", "::") else socket.gethostname()
    )
    options: dict[str, Any] = dict(
        broker=[f"kafka://{hp}" for hp in settings.broker.split(",")],
        autodiscover=False,
        key_serializer="raw",
        value_serializer="raw",
        store="rocksdb://",
        datadir=str(datadir),
        web_enabled=True,
        web_host=settings.web_host,
        web_port=port,
        canonical_url=f"http://{host}:{port}",
        web_in_thread=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication,
        topic_allow_declare=True,
        producer_acks=-1,
        producer_linger_ms=2,
        producer_max_batch_size=256 * 1024,
        producer_request_timeout=30.0,
        # A crash replays at most ~1 s of input; the deduplicator and the sink ledger absorb it.
        broker_commit_interval=1.0,
        broker_commit_every=2_000,
        # Rejoin in seconds after a restart, not after Faust's default 60 s session timeout.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        broker_request_timeout=40.0,
        broker_rebalance_timeout=30.0,
        broker_max_poll_records=1000,
        consumer_auto_offset_reset="earliest",
        # On rebalance and shutdown wait until in-flight events are acked before committing.
        stream_wait_empty=True,
        stream_buffer_maxsize=8192,
        table_standby_replicas=0,
        logging_config=None,
    )
    options.update(overrides)
    return HifiApp(app_id, **options)
