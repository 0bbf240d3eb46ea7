"""One runner for every service, in the same steps (snuba-style):

parse settings and config -> logging and Sentry -> metrics -> create topics -> build the service's
Faust app -> run the worker, whose signal handler only requests shutdown (SIGTERM drains, commits,
leaves the group).

The app hands in its registry (name -> build function, `services.registry.SERVICES`): the library
never imports the app.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust

from shared import pipeline
from shared.alerts import OutageClock
from shared.app import HifiApp, create_app
from shared.config import HifiConfig, Settings
from shared.dlq import DeadLetterQueues
from shared.gc_policy import apply_gc_policy
from shared.keywindow import KeyWindow, RocksKeyWindow
from shared.membership import requested_exit_code
from shared.metrics import StageMetrics
from shared.redis_window import RedisKeyWindow
from shared.sentry import init_sentry
from shared.stage import StageRunner
from shared.topics import Topics, ensure_topics
from shared.watchdog import PartitionWatchdog
from shared.web import add_dlq_views, denied

log = logging.getLogger(__name__)

Registry = Mapping[str, Callable[["ServiceContext"], HifiApp]]
"""Service name -> the function that builds its Faust app; the app (services/) defines it."""


@dataclass
class ServiceContext:
    """What a service's `build` gets: everything shared, nothing global."""

    name: str
    settings: Settings
    config: HifiConfig
    sink: str | None = None
    metrics: StageMetrics = field(default_factory=StageMetrics)
    app: Any = None
    partitioned: list[RocksKeyWindow] = field(default_factory=list)  # their changelogs are created at start

    @property
    def topics(self) -> Topics:
        return Topics(self.settings.namespace)

    @property
    def spec(self) -> pipeline.StageSpec:
        """This service's place in the pipeline: its source, outputs, group and port."""
        return pipeline.stage(self.name)

    @property
    def source_topic(self) -> str:
        """The topic this service consumes, under the namespace."""
        source = self.spec.source_topic(self.sink)
        if source is None:
            raise ValueError(f"{self.name} consumes no topic")
        return self.topics.name(source)

    @property
    def output_topics(self) -> list[str]:
        """The topics this service writes events and tallies to, under the namespace (one per sink or tenant
        where its layout names a prefix)."""
        return self.topics.outputs(self.spec, list(self.config.sinks), list(self.config.tenants))

    def key_window(self, name: str) -> KeyWindow:
        """The dedupe window or delivered ledger on the configured backend: Redis, or RocksDB stores."""
        dedupe = self.config.dedupe
        if dedupe.backend == "redis":
            return RedisKeyWindow(self.settings.redis_url, f"hifi:{self.settings.namespace}:{name}:", dedupe.window_s)
        group = str(self.app.conf.id)
        window = RocksKeyWindow(
            name,
            Path(self.settings.data_dir).resolve() / "tables" / group / name,
            # Not Faust's `{app}-{table}-changelog`: an installation upgraded from Faust tables keeps that
            # topic, whose records (one key each) this store does not read.
            changelog_topic=f"{group}.{name}.changelog",
            bootstrap=self.settings.broker,
            window_s=dedupe.window_s,
            partitions=self.settings.partitions,
            group=group,
        )
        self.partitioned.append(window)
        return window

    def create_app(self, **overrides: Any) -> HifiApp:
        """The service's Faust app, its id (consumer group) and default web port from its StageSpec."""
        spec = self.spec
        group = self.topics.group(spec.group(self.sink))
        self.app = create_app(group, self.settings, spec.port(list(self.config.sinks), self.sink), **overrides)
        return self.app

    def attach(self, runner: StageRunner) -> StageRunner:
        """Run the stage's runner with the app (as its dependency), configured from the settings, with its
        DLQ and /partitions views, its broker-outage alert and its partition watchdog."""
        app = runner.app
        queues = DeadLetterQueues(runner.bootstrap, self.topics, list(self.config.sinks))
        add_dlq_views(app, runner.stage, queues, self.settings)
        audit = self.config.audit
        runner.checkpoint_interval_s = self.settings.table_checkpoint_s
        runner.standby_replicas = self.settings.standby_replicas
        runner.warm_up_max_s = self.settings.standby_warm_up_s
        runner.tallies = self.topics.tallies
        runner.produces_to = self.output_topics
        runner.bucket_s = audit.bucket_s
        if runner.group_instance_id is None and self.settings.worker_id:
            runner.group_instance_id = self.settings.worker_id
        runner.session_timeout_ms = int(self.settings.session_timeout_s * 1000)
        if runner.leave_group_on_stop is None and self.settings.leave_group_on_stop != "auto":
            runner.leave_group_on_stop = self.settings.leave_group_on_stop == "yes"
        alerter = runner.alerter
        runner.broker_outage = OutageClock(
            alerter, "broker_unreachable", "the Kafka broker", audit.outage_alert_after_s
        )
        watchdog = runner.watchdog = PartitionWatchdog(runner, runner.metrics, alerter, audit.stuck_after_s)
        app.timer(min(5.0, audit.stuck_after_s / 2))(watchdog.check)
        settings = self.settings

        @app.page("/partitions")
        async def partitions(view: Any, request: Any) -> Any:
            """Consumer lag and progress per partition this worker owns, and the watchdog's rejoins."""
            refused = denied(view, request, settings)
            return refused or view.json(
                {"stage": runner.stage, "partitions": watchdog.partitions, "rejoins": watchdog.rejoins}
            )

        app.add_dependency(runner)
        return runner


def prepare(
    services: Registry, name: str, settings: Settings, sink: str | None = None
) -> tuple[ServiceContext, HifiApp]:
    if name not in services:
        raise SystemExit(f"unknown service {name!r}; choose from {', '.join(services)}")
    config = HifiConfig.load(settings.config_path)
    spec = pipeline.stage(name)
    if spec.per_sink:
        if sink is None:
            raise SystemExit(f"the {name} needs --sink NAME (one {name} process per sink)")
        if sink not in config.sinks:
            raise SystemExit(f"unknown sink {sink!r}; the config has {', '.join(config.sinks)}")
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{name}{'.' + sink if sink else ''}] %(name)s: %(message)s",
    )
    init_sentry(settings.sentry_dsn, spec.label(sink) if spec.per_sink else name, settings.environment)
    asyncio.run(
        ensure_topics(
            settings.broker,
            Topics(settings.namespace).all(list(config.sinks), list(config.tenants)),
            settings.partitions,
            settings.replication,
            settings.min_insync,
        )
    )
    ctx = ServiceContext(name, settings, config, sink)
    app = services[name](ctx)
    # A window's changelog has the source topic's partition count (entry and event share a partition)
    # and keeps the window plus an hour (`changelog_retention_s`): older entries are expired anyway.
    for window in ctx.partitioned:
        asyncio.run(
            ensure_topics(
                settings.broker,
                [window.changelog_topic],
                settings.partitions,
                settings.replication,
                settings.min_insync,
                extra_configs={"retention.ms": str(int(window.changelog_retention_s * 1000))},
            )
        )
    return ctx, app


class GracefulWorker(faust.Worker):
    """SIGTERM drains in-flight work, commits and leaves the group; past the grace period the process exits
    anyway. That is safe: nothing was committed past what is durable downstream."""

    def __init__(self, app: Any, *services: Any, log_level: str, shutdown_grace_s: float, **options: Any) -> None:
        super().__init__(app, *services, loglevel=log_level, **options)
        self.log_level = log_level
        self.shutdown_grace_s = shutdown_grace_s

    def _setup_logging(self) -> None:
        super()._setup_logging()
        # mode leaves the root logger at DEBUG and filters in its handlers, so every debug call in
        # aiokafka and Faust built a log record: about a tenth of a stage's CPU under load.
        logging.getLogger().setLevel(self.log_level)

    def _on_sigterm(self) -> None:
        timer = threading.Timer(self.shutdown_grace_s, _grace_expired, args=(self.shutdown_grace_s,))
        timer.daemon = True
        timer.start()
        super()._on_sigterm()

    def _shutdown_loop(self) -> None:
        # A crash, or a start that raised (mode's `execute_from_commandline` stops the worker in its `finally`
        # and re-raises after this returns, which sets no crash reason): mode's way, exiting non-zero.
        if self.crash_reason or sys.exc_info()[1] is not None:
            super()._shutdown_loop()
            return
        # Stopped: drained, committed, stores closed. mode would sleep 1 to 2 s more and the interpreter's
        # teardown took seconds under load, while a worker keeping its partitions for its restart stalls them.
        _exit_now(requested_exit_code())


def run(services: Registry, name: str, settings: Settings, sink: str | None = None) -> None:
    _, app = prepare(services, name, settings, sink)
    # uvloop: the same asyncio API, a faster loop (Faust's consumer thread gets one too).
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    log.info("starting %s with settings %s", name, settings)
    worker = GracefulWorker(
        app,
        log_level=settings.log_level.upper(),
        shutdown_grace_s=settings.shutdown_grace_s,
        quiet=True,
        redirect_stdouts=False,
    )
    apply_gc_policy(settings.gc_young_threshold)  # what the process keeps is built: freeze it
    try:
        worker.execute_from_commandline()
    finally:
        # A stage that stopped on a fault (its instance id taken) exits non-zero, after the drain.
        if code := requested_exit_code():
            sys.exit(code)


def _exit_now(code: int) -> None:
    """Exit with `code` without the interpreter's teardown, once what must be written (logs, Sentry) is out."""
    import sentry_sdk

    sentry_sdk.flush(timeout=2.0)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _grace_expired(grace_s: float) -> None:
    log.error("shutdown did not finish within %.0fs; exiting, uncommitted work will be replayed", grace_s)
    logging.shutdown()
    os._exit(requested_exit_code() or 75)  # a worker that found its name taken still says so (78), not 75
