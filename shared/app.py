"""The app factory every service uses: a Faust app with Hifi's safe defaults.

Faust runs each service: its web views, timers, lifecycle and signal handling, and the producer of
the collector and the auditor. The stages read and write Kafka through their `StageRunner` (see
shared/stage.py), so no app boots Faust's consumer (`NoConsumerBoot`).
Two Faust defaults are changed on purpose:
- the producer is idempotent with acks=all (Faust only does that inside transactions);
- values and keys are raw bytes: each service decodes msgpack itself, once.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from faust.app.base import BootStrategy
from faust.transport.drivers import aiokafka as faust_aiokafka

from shared.config import Settings

log = logging.getLogger(__name__)


class IdempotentProducer(faust_aiokafka.Producer):
    """Durable by default: the broker acks only once every in-sync replica has the record."""

    def _settings_extra(self) -> dict[str, Any]:
        return {"acks": "all", "enable_idempotence": True}


class HifiTransport(faust_aiokafka.Transport):
    Producer = IdempotentProducer


class HifiApp(faust.App):
    def _new_transport(self) -> HifiTransport:
        return HifiTransport(self.conf.broker_consumer, self)

    def _new_producer_transport(self) -> HifiTransport:
        return HifiTransport(self.conf.broker_producer, self)


def durable_producer(
    bootstrap: str, client_id: str | None = None, linger_ms: int = 2, request_timeout_ms: int = 30_000
) -> AIOKafkaProducer:
    """aiokafka's defaults are acks=1 without idempotence; whatever Hifi writes must survive a broker failover."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=client_id or "hifi",
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        max_batch_size=256 * 1024,
        request_timeout_ms=request_timeout_ms,
    )


class NoConsumerBoot(BootStrategy):
    """Web server, sensors and producer; never Faust's consumer. The stages read Kafka with their own
    `StageRunner` (which owns the group membership: Faust's consumer would join the same group), and
    the auditor with its own reader; a Faust consumer with nothing to read would only rebalance."""

    enable_kafka_consumer = False


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
        logging_config=None,
    )
    options.update(overrides)
    app = HifiApp(app_id, **options)
    app.boot_strategy = NoConsumerBoot(app)
    return app
