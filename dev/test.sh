#!/usr/bin/env bash
# `make test`: start a fresh test broker (port 19092), and Redis, PostgreSQL and s3proxy (port 19594)
# if none answers, run lint and the suite, then stop what this script started, whatever the outcome.
set -uo pipefail
cd "$(dirname "$0")/.."
HIFI=.venv/bin/hifi
PORT=${HIFI_TEST_KAFKA_PORT:-19092}
REDIS_URL=${HIFI_TEST_REDIS_URL:-redis://127.0.0.1:6379/15}
PG_PORT=${HIFI_TEST_POSTGRES_PORT:-15432}
DATA=.cache/kafka/test-$PORT
S3_PORT=${HIFI_TEST_S3_PORT:-19594}

cleanup() {
  $HIFI kafka stop --port "$PORT" --data-dir "$DATA" >/dev/null 2>&1
  $HIFI redis stop --url "$REDIS_URL" >/dev/null 2>&1
  $HIFI postgres stop --port "$PG_PORT" >/dev/null 2>&1
  $HIFI s3 stop --port "$S3_PORT" >/dev/null 2>&1
}
trap cleanup EXIT

.venv/bin/ruff check . || exit 1
$HIFI kafka wipe --port "$PORT" --data-dir "$DATA" >/dev/null
$HIFI kafka start --port "$PORT" --data-dir "$DATA" || exit 1
$HIFI redis start --url "$REDIS_URL" || exit 1
$HIFI postgres start --port "$PG_PORT" || exit 1
$HIFI s3 start --port "$S3_PORT" || exit 1
.venv/bin/pytest "$@"
