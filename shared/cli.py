"""The `hifi` command line: the broker, the services, the whole pipeline, and test traffic.

`hifi` is `services.cli:main`, which passes the app's registry of services in; this module does not
know the services, so `run` works only with a registry.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from shared.config import Settings, hash_api_key

if TYPE_CHECKING:
    from shared.service import Registry


def main(argv: list[str] | None = None, services: Registry | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hifi", description="Lossless, low-latency event streams")
    sub = parser.add_subparsers(dest="command", required=True)

    kafka = sub.add_parser("kafka", help="run a real Apache Kafka (KRaft) broker from the Maven jars")
    kafka.add_argument("action", choices=["start", "stop", "status", "wipe"])
    kafka.add_argument("--nodes", type=int, choices=[1, 3], default=1)
    kafka.add_argument("--port", type=int, default=9092)
    kafka.add_argument("--data-dir", default=None, help="default: .cache/kafka/data-<nodes>n-<port>")

    run = sub.add_parser("run", help="run one service in this process")
    run.add_argument("service")
    run.add_argument("--sink", help="for the sender: which sink this process delivers to")

    up = sub.add_parser("up", help="broker, Redis, every service, a demo sink and demo traffic")
    up.add_argument("--config", default=None, help="default: a generated demo config under var/demo")
    up.add_argument("--rate", type=float, default=200.0, help="demo events per second (0 = none)")
    up.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0 = Ctrl-C)")

    send = sub.add_parser("send", help="post events to the collector, from a file or generated")
    send.add_argument("--url", default="http://127.0.0.1:8080/v1/events")
    send.add_argument("--api-key", required=True)
    send.add_argument("--file", help="JSON lines (one event per line) or a JSON list; '-' for stdin")
    send.add_argument("--count", type=int, default=100, help="generated events (without --file)")
    send.add_argument("--batch", type=int, default=20)
    send.add_argument("--rate", type=float, default=0.0, help="events per second (0 = as fast as possible)")

    redis = sub.add_parser("redis", help="start a local redis-server unless one answers; stop the one started")
    redis.add_argument("action", choices=["start", "stop"])
    redis.add_argument("--url", default="redis://127.0.0.1:6379/0")

    demo_sink = sub.add_parser("demo-sink", help="a webhook destination that counts what it receives")
    demo_sink.add_argument("--host", default="0.0.0.0")
    demo_sink.add_argument("--port", type=int, default=8800)

    dlq = sub.add_parser("dlq", help="inspect and replay dead letters (uses HIFI_BROKER, HIFI_CONFIG, ...)")
    dlq.add_argument("action", choices=["list", "show", "replay"])
    dlq.add_argument("stage", nargs="?", help="enricher, deduplicator, router or sender.<sink>")
    dlq.add_argument("--limit", type=int, default=None)
    dlq.add_argument("--rate", type=float, default=100.0, help="replayed letters per second (0 = unlimited)")

    trace = sub.add_parser("trace", help="where is my event? its path through every stage and sink (HIFI_REDIS_URL)")
    trace.add_argument("event_id")
    trace.add_argument("--tenant", default=None, help="only this tenant's event of that id")
    trace.add_argument("--json", action="store_true", help="the trace as JSON")

    chaos = sub.add_parser("chaos", help="fault scenarios on the real pipeline with ground truth")
    chaos.add_argument(
        "scenario",
        nargs="+",
        help="scenario names (docs/RELIABILITY.md lists all 18: kill-stages ... rolling-deploy, outage-scale-out, "
        "outage-rolling-deploy, long-restore, kafka-sink-broker-kill, redis-sink-kill, slow-isr-rebalance, "
        "sink-4xx-mix, kill-restart-single, rolling-deploy-2), or all",
    )
    chaos.add_argument("--rate", type=float, default=200.0, help="events per second of steady load")
    chaos.add_argument("--json", dest="json_out", help="also write the results to this file")
    chaos.add_argument("--doc", help="rewrite the results table in this markdown file (docs/RELIABILITY.md)")

    bench = sub.add_parser("bench", help="open-loop benchmark of the whole pipeline (and the raw-relay limit)")
    bench.add_argument("--rate", type=float, action="append", help="events/s (repeat for several; default 2000)")
    bench.add_argument(
        "--step",
        action="store_true",
        help="rates 500, 1k, 2k, 5k, 10k, 20k, 50k until one fails, then bisect (--refine)",
    )
    bench.add_argument(
        "--warmup", type=float, default=20.0, help="seconds of unreported load to warm the fresh broker (0: none)"
    )
    bench.add_argument(
        "--refine", type=int, default=2, help="with --step: bisection runs between the last pass and the first fail"
    )
    bench.add_argument("--duration", type=float, default=60.0, help="seconds per rate")
    bench.add_argument("--batch", type=int, default=20, help="events per HTTP request")
    bench.add_argument(
        "--system",
        action="append",
        choices=["hifi", "raw", "quix"],
        help="hifi (default), raw (aiokafka relays: the limit), quix (the Quix Streams peer)",
    )
    bench.add_argument("--json", dest="json_out", help="write the results to this file")
    bench.add_argument("--dedupe", choices=["rocksdb", "redis"], default="rocksdb", help="dedupe/ledger backend")
    bench.add_argument("--doc", help="rewrite the results section of this markdown file (docs/BENCHMARKS.md)")
    bench.add_argument(
        "--shape",
        choices=["production", "minimal"],
        default="production",
        help="production: 2 tenants x (webhook + file sink), auditor and canaries, 200 devices, 5 %% re-sends, "
        "0.5-1 KB events; minimal: 1 tenant, 1 webhook, no auditor",
    )
    bench.add_argument("--kafka-port", type=int, default=19292, help="the bench's own broker")
    bench.add_argument("--redis-url", default="redis://127.0.0.1:6391/0", help="the bench's own Redis")
    bench.add_argument("--port-base", type=int, default=18700, help="services listen on this port and up (+99)")

    sub.add_parser("topics", help="create every topic of the config (idempotent; the Helm chart's pre-install job)")

    key = sub.add_parser("hash-key", help="print the hash of an API key, for the config's api_keys")
    key.add_argument("key")

    args = parser.parse_args(argv)
    if args.command == "kafka":
        from pathlib import Path

        from shared.local.kafka import LocalKafka

        cluster = LocalKafka(nodes=args.nodes, port=args.port, data_root=Path(args.data_dir) if args.data_dir else None)
        if args.action == "start":
            seconds = cluster.start()
            print(f"kafka {cluster.nodes} node(s) ready at {cluster.bootstrap} in {seconds:.1f}s")
        elif args.action == "stop":
            cluster.stop()
            print("kafka stopped")
        elif args.action == "wipe":
            cluster.wipe()
            print(f"kafka stopped and {cluster.root} removed")
        else:
            pids = cluster.running_pids()
            print(f"kafka at {cluster.bootstrap}: " + (f"running {pids}" if pids else "not running"))
            sys.exit(0 if len(pids) == cluster.nodes else 1)
    elif args.command == "run":
        from shared.service import run as run_service

        if services is None:
            raise SystemExit("`run` needs the app's services: use `hifi run` or `python -m services.cli run`")
        run_service(services, args.service, Settings.from_env(), args.sink)
    elif args.command == "up":
        from shared.local.up import up as run_up

        run_up(args.config, args.rate, args.duration)
    elif args.command == "send":
        from shared.local.traffic import send as run_send

        run_send(args.url, args.api_key, args.file, args.count, args.batch, args.rate)
    elif args.command == "redis":
        from shared.local.redis import LocalRedis

        server = LocalRedis(url=args.url)
        if args.action == "start":
            print(f"redis: {'started' if server.ensure() else 'already answering'} at {server.url}")
        else:
            server.stop()
            print("redis: stopped (if this project had started it)")
    elif args.command == "demo-sink":
        from shared.local.webhook import serve_forever

        serve_forever(args.host, args.port)
    elif args.command == "chaos":
        from shared.local.chaos import main as run_chaos

        sys.exit(run_chaos(args.scenario, args.rate, args.json_out, args.doc))
    elif args.command == "dlq":
        run_dlq(args)
    elif args.command == "trace":
        sys.exit(run_trace(args))
    elif args.command == "bench":
        from shared.local.bench import main as run_bench

        rates = [500, 1000, 2000, 5000, 10000, 20000, 50000] if args.step else (args.rate or [2000.0])
        try:
            code = run_bench(
                rates,
                args.duration,
                args.batch,
                args.system or ["hifi"],
                args.step,
                args.json_out,
                args.doc,
                args.dedupe,
                args.refine,
                args.warmup,
                args.shape,
                args.kafka_port,
                args.redis_url,
                args.port_base,
            )
        except KeyboardInterrupt:
            print("bench interrupted: its pipeline, broker and Redis are stopped; nothing was written", file=sys.stderr)
            code = 130
        sys.exit(code)
    elif args.command == "topics":
        import asyncio

        from shared.config import HifiConfig
        from shared.topics import Topics, ensure_topics

        settings = Settings.from_env()
        names = Topics(settings.namespace).all(list(HifiConfig.load(settings.config_path).sinks))
        asyncio.run(
            ensure_topics(settings.broker, names, settings.partitions, settings.replication, settings.min_insync)
        )
        print(f"{len(names)} topics present at {settings.broker}")
    elif args.command == "hash-key":
        print(hash_api_key(args.key))


def run_trace(args: argparse.Namespace) -> int:
    """Print the event's path; exit 1 if no stage has said anything about it (within the retention)."""
    import asyncio
    import json

    from shared.errors import TransientError
    from shared.trace import TraceIndex, render

    settings = Settings.from_env()

    async def lookup() -> dict[str, object]:
        index = TraceIndex(settings.redis_url, settings.namespace)
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


if __name__ == "__main__":
    main()
