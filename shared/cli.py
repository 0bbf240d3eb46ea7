"""The `hifi` command line of the runtime: run a service, create topics, dead letters, key hashes.

`hifi` is `services.cli:main`, which passes the app's registry of services in; this module does not
know the services, so `run` works only with a registry. Development commands (a local broker, the
whole pipeline, chaos, the bench) come from the `hifi-devtools` distribution through the
`hifi.commands` entry points, so the runtime image does not carry them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from shared.config import Settings, hash_api_key

if TYPE_CHECKING:
    from shared.service import Registry

COMMAND_PLUGINS = "hifi.commands"


def main(argv: list[str] | None = None, services: Registry | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hifi", description="Lossless, low-latency event streams")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one service in this process")
    run.add_argument("service")
    run.add_argument("--sink", help="for the sender: which sink this process delivers to")

    replay = sub.add_parser("replay", help="re-deliver a time range of the S3 archive to one sink (HIFI_* env)")
    replay.add_argument("--tenant", required=True)
    replay.add_argument("--since", required=True, help="ISO 8601 UTC time (or epoch seconds), inclusive")
    replay.add_argument("--until", required=True, help="ISO 8601 UTC time (or epoch seconds), exclusive")
    replay.add_argument("--to-sink", required=True, dest="to_sink")
    replay.add_argument("--rate", type=float, default=0.0, help="events per second (0 = unlimited)")
    replay.add_argument("--force", action="store_true", help="re-send events the sink's ledger already has")

    dlq = sub.add_parser("dlq", help="inspect and replay dead letters (uses HIFI_BROKER, HIFI_CONFIG, ...)")
    dlq.add_argument("action", choices=["list", "show", "replay"])
    dlq.add_argument("stage", nargs="?", help="enricher, deduplicator, router or sender.<sink>")
    dlq.add_argument("--limit", type=int, default=None)
    dlq.add_argument("--rate", type=float, default=100.0, help="replayed letters per second (0 = unlimited)")

    failed = sub.add_parser("failed", help="list, show and replay events quarantined for breaking a schema")
    failed.add_argument("action", choices=["list", "show", "replay"])
    failed.add_argument("--tenant", required=True)
    failed.add_argument("--type", dest="event_type", default=None, help="only events of this type")
    failed.add_argument("--event-id", default=None, help="show: only this event")
    failed.add_argument("--limit", type=int, default=None)
    failed.add_argument("--rate", type=float, default=100.0, help="replayed events per second (0 = unlimited)")
    failed.add_argument(
        "--from-start", action="store_true", help="replay: re-submit every record, also those replayed before"
    )

    trace = sub.add_parser("trace", help="where is my event? its path through every stage and sink (HIFI_REDIS_URL)")
    trace.add_argument("event_id")
    trace.add_argument("--tenant", default=None, help="only this tenant's event of that id")
    trace.add_argument("--json", action="store_true", help="the trace as JSON")

    sub.add_parser("topics", help="create every topic of the config (idempotent; the Helm chart's pre-install job)")

    key = sub.add_parser("hash-key", help="print the hash of an API key, for the config's api_keys")
    key.add_argument("key")

    handlers = _command_plugins(sub)

    args = parser.parse_args(argv)
    if args.command in handlers:
        handlers[args.command](args)
    elif args.command == "run":
        from shared.service import run as run_service

        if services is None:
            raise SystemExit("`run` needs the app's services: use `hifi run` or `python -m services.cli run`")
        run_service(services, args.service, Settings.from_env(), args.sink)
    elif args.command == "replay":
        run_replay(args)
    elif args.command == "dlq":
        run_dlq(args)
    elif args.command == "failed":
        run_failed(args)
    elif args.command == "trace":
        sys.exit(run_trace(args))
    elif args.command == "topics":
        import asyncio

        from shared.config import HifiConfig
        from shared.topics import Topics, ensure_topics

        settings = Settings.from_env()
        config = HifiConfig.load(settings.config_path)
        names = Topics(settings.namespace).all(list(config.sinks), list(config.tenants))
        asyncio.run(
            ensure_topics(settings.broker, names, settings.partitions, settings.replication, settings.min_insync)
        )
        print(f"{len(names)} topics present at {settings.broker}")
    elif args.command == "hash-key":
        print(hash_api_key(args.key))


def _command_plugins(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Subcommands other distributions add (the dev tools: `up`, `kafka`, `chaos`, `bench`, ...).

    Each entry point of the group is a function that adds its subparsers and returns their handlers by
    command name. The runtime image installs none, so its `hifi` has only the commands a pod or an
    operator runs.
    """
    handlers: dict[str, Callable[[argparse.Namespace], None]] = {}
    for entry in entry_points(group=COMMAND_PLUGINS):
        handlers.update(entry.load()(sub))
    return handlers


def run_replay(args: argparse.Namespace) -> None:
    import asyncio

    from shared.config import HifiConfig
    from shared.replay import ReplayError, parse_time, replay

    settings = Settings.from_env()
    config = HifiConfig.load(settings.config_path)
    try:
        since, until = parse_time(args.since), parse_time(args.until)
        report = asyncio.run(replay(settings, config, args.tenant, since, until, args.to_sink, args.rate, args.force))
    except ReplayError as exc:
        raise SystemExit(f"replay: {exc}") from None
    print(
        f"replayed {report.events} events of {args.tenant} from {report.objects} archive objects to {args.to_sink}"
        f" ({report.filtered} kept out by its filter or consent rule)"
    )


def run_trace(args: argparse.Namespace) -> int:
    """Print the event's path; exit 1 if no stage has said anything about it (within the retention)."""
    import asyncio
    import json

    from shared.errors import TransientError
    from shared.trace import TraceIndex
    from shared.trace_render import render

    settings = Settings.from_env()

    async def lookup() -> dict[str, object]:
        index = TraceIndex(settings.trace_index_url, settings.namespace)
        try:
            return await index.lookup(args.event_id, args.tenant)
        finally:
            await index.close()

    try:
        found = asyncio.run(lookup())
    except TransientError as exc:
        raise SystemExit(f"hifi trace: {exc}") from None
    print(json.dumps(found, indent=2) if args.json else render(found))
    return 0 if found["found"] else 1


def run_dlq(args: argparse.Namespace) -> None:
    import asyncio
    import json

    from shared.config import HifiConfig
    from shared.dlq import DeadLetterQueues, UnknownStage
    from shared.topics import Topics

    settings = Settings.from_env()
    config = HifiConfig.load(settings.config_path)
    queues = DeadLetterQueues(settings.broker, Topics(settings.namespace), list(config.sinks))
    try:
        if args.action == "list":
            for stage, count in asyncio.run(queues.counts()).items():
                print(f"{stage:<24} {count:>8}  {queues.topics.dlq(stage)}")
            return
        if not args.stage:
            raise SystemExit("name a stage: enricher, deduplicator, router or sender.<sink>")
        if args.action == "show":
            for letter in asyncio.run(queues.read(args.stage, args.limit or 20)):
                print(json.dumps(letter, default=str))
        else:
            done = asyncio.run(queues.replay(args.stage, args.rate, args.limit))
            print(f"replayed {done} dead letters of {args.stage}")
    except UnknownStage as exc:
        raise SystemExit(str(exc)) from None


def run_failed(args: argparse.Namespace) -> None:
    import asyncio
    import json

    from shared.config import HifiConfig
    from shared.quarantine import (
        FailedEvents,
        ReplayAlreadyRunning,
        ReplayProgressUnavailable,
        UnknownTenant,
        describe_progress,
    )
    from shared.topics import Topics

    settings = Settings.from_env()
    config = HifiConfig.load(settings.config_path)
    failed = FailedEvents(settings.broker, Topics(settings.namespace), list(config.tenants), config.audit.bucket_s)
    try:
        if args.action == "list":
            counts = asyncio.run(failed.counts(args.tenant))
            print(f"{sum(counts.values())} failed events in {failed.topic(args.tenant)}")
            for event_type, count in sorted(counts.items()):
                if args.event_type is None or event_type == args.event_type:
                    print(f"  {event_type:<32} {count:>8}")
            print(describe_progress(asyncio.run(failed.progress(args.tenant))))
            for record in asyncio.run(failed.read(args.tenant, args.event_type, args.limit or 20)):
                rules = sorted({v["rule"] for v in record.get("violations", [])})
                state = "replayed" if record["replayed"] else "pending"
                print(f"  {record.get('event_id')}  {record.get('type')}  {','.join(rules)}  {state}")
        elif args.action == "show":
            records = asyncio.run(failed.read(args.tenant, args.event_type, args.limit or 20, args.event_id))
            for record in records:
                print(json.dumps(record, default=str))
        else:
            done = asyncio.run(failed.replay(args.tenant, args.event_type, args.rate, args.limit, args.from_start))
            print(f"replayed {done} failed events of {args.tenant} to {failed.topics.raw}")
    except (UnknownTenant, ReplayProgressUnavailable, ReplayAlreadyRunning) as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()
