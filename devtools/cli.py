"""The development commands of `hifi`: a local broker and Redis, the whole pipeline, demo traffic, chaos, bench.

They reach `hifi` through the `hifi.commands` entry point of the `hifi-devtools` distribution
(devtools/pyproject.toml); the runtime image installs only `hifi` itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

Handler = Callable[[argparse.Namespace], None]


def register(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    """Add the dev subcommands to `hifi`'s parser; return their handlers by command name."""
    kafka = sub.add_parser("kafka", help="run a real Apache Kafka (KRaft) broker from the Maven jars")
    kafka.add_argument("action", choices=["start", "stop", "status", "wipe"])
    kafka.add_argument("--nodes", type=int, choices=[1, 3], default=1)
    kafka.add_argument("--port", type=int, default=9092)
    kafka.add_argument("--data-dir", default=None, help="default: .cache/kafka/data-<nodes>n-<port>")

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

    postgres = sub.add_parser("postgres", help="start a local PostgreSQL unless one answers; stop the one started")
    postgres.add_argument("action", choices=["start", "stop", "wipe"])
    postgres.add_argument("--port", type=int, default=5432)
    postgres.add_argument("--data-dir", default=None, help="default .cache/postgres (a pg-<port> dir under it)")

    s3 = sub.add_parser(
        "s3", help="start a local s3proxy (filesystem backend) unless one answers; stop the one started"
    )
    s3.add_argument("action", choices=["start", "stop"])
    s3.add_argument("--port", type=int, default=9000)

    demo_sink = sub.add_parser("demo-sink", help="a webhook destination that counts what it receives")
    demo_sink.add_argument("--host", default="0.0.0.0")
    demo_sink.add_argument("--port", type=int, default=8800)

    chaos = sub.add_parser("chaos", help="fault scenarios on the real pipeline with ground truth")
    chaos.add_argument(
        "scenario",
        nargs="+",
        help="scenario names (docs/RELIABILITY.md lists all 21: kill-stages ... rolling-deploy, outage-scale-out, "
        "outage-rolling-deploy, long-restore, kafka-sink-broker-kill, redis-sink-kill, slow-isr-rebalance, "
        "sink-4xx-mix, kill-restart-single, rolling-deploy-2, postgres-sink-kill, soak, kill-one-of-two), or all",
    )
    chaos.add_argument("--rate", type=float, help="events per second of steady load (default: 200; the soak 1000)")
    chaos.add_argument("--duration", type=float, help="seconds of a timed scenario (the soak: default 1800)")
    chaos.add_argument("--json", dest="json_out", help="also write the results to this file")
    chaos.add_argument("--doc", help="rewrite the results table in this markdown file (docs/RELIABILITY.md)")

    bench = sub.add_parser("bench", help="open-loop benchmark of the whole pipeline (and the raw-relay limit)")
    bench.add_argument("--rate", type=float, action="append", help="events/s (repeat for several; default 2000)")
    bench.add_argument(
        "--step",
        action="store_true",
        help="rates 500, 1k, 2k, 5k, 10k, 20k, 50k until one fails, then bisect (--refine); 2k is always run",
    )
    bench.add_argument(
        "--warmup", type=float, default=20.0, help="seconds of unreported load to warm the fresh broker (0: none)"
    )
    bench.add_argument(
        "--run-warmup",
        type=float,
        default=15.0,
        help="seconds of load at each run's rate before its measured window, every system alike: events counted "
        "for loss and duplicates, latencies reported apart as the warm-up's (0: none)",
    )
    bench.add_argument(
        "--refine", type=int, default=2, help="with --step: bisection runs between the last pass and the first fail"
    )
    bench.add_argument("--duration", type=float, default=60.0, help="seconds per rate")
    bench.add_argument("--batch", type=int, default=20, help="events per HTTP request")
    bench.add_argument(
        "--system",
        action="append",
        choices=["hifi", "hifi-contracts", "raw", "quix"],
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
    bench.add_argument(
        "--second-worker",
        action="store_true",
        help="after the ladder, run hifi again at its ceiling with 2 workers per stage: the planning figure's cost "
        "of a second worker (on 2 cores an overhead, not a speed-up)",
    )

    return {
        "kafka": _kafka,
        "up": _up,
        "send": _send,
        "redis": _redis,
        "postgres": _postgres,
        "s3": _s3,
        "demo-sink": _demo_sink,
        "chaos": _chaos,
        "bench": _bench,
    }


def _kafka(args: argparse.Namespace) -> None:
    from devtools.kafka import LocalKafka

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


def _up(args: argparse.Namespace) -> None:
    from devtools.up import up

    up(args.config, args.rate, args.duration)


def _send(args: argparse.Namespace) -> None:
    from devtools.traffic import send

    send(args.url, args.api_key, args.file, args.count, args.batch, args.rate)


def _redis(args: argparse.Namespace) -> None:
    from devtools.redis import LocalRedis

    server = LocalRedis(url=args.url)
    if args.action == "start":
        print(f"redis: {'started' if server.ensure() else 'already answering'} at {server.url}")
    else:
        server.stop()
        print("redis: stopped (if this project had started it)")


def _postgres(args: argparse.Namespace) -> None:
    from devtools.postgres import LocalPostgres

    pg = LocalPostgres(port=args.port) if args.data_dir is None else LocalPostgres(args.port, Path(args.data_dir))
    if args.action == "start":
        print(f"postgres: {'started' if pg.ensure() else 'already answering'} at {pg.dsn}")
    elif args.action == "stop":
        pg.stop()
        print("postgres: stopped (if this project had started it)")
    else:
        pg.wipe()
        print(f"postgres: stopped and wiped {pg.data_dir}")


def _s3(args: argparse.Namespace) -> None:
    from devtools.s3 import LocalS3

    server = LocalS3(port=args.port)
    if args.action == "start":
        print(f"s3: {'started' if server.ensure() else 'already answering'} at {server.endpoint}")
    else:
        server.stop()
        print("s3: stopped (if this project had started it)")


def _demo_sink(args: argparse.Namespace) -> None:
    from devtools.webhook import serve_forever

    serve_forever(args.host, args.port)


def _chaos(args: argparse.Namespace) -> None:
    from devtools.chaos import main as run_chaos

    sys.exit(run_chaos(args.scenario, args.rate, args.json_out, args.doc, args.duration))


def _bench(args: argparse.Namespace) -> None:
    from devtools.bench import main as run_bench

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
            args.second_worker,
            args.run_warmup,
        )
    except KeyboardInterrupt:
        print("bench interrupted: its pipeline, broker and Redis are stopped; nothing was written", file=sys.stderr)
        code = 130
    sys.exit(code)
