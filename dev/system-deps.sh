#!/usr/bin/env bash
# Installs the system packages Hifi needs when they are missing: Java 17+ and Maven (to fetch and run
# Apache Kafka from Maven Central), redis-server, postgresql, and chromium + chromium-driver (the dashboard test).
# Uses apt-get (Debian/Ubuntu) as root or via sudo.
set -euo pipefail
missing=()
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# the Postgres sink's tests and `hifi up` run Debian's server (binaries under /usr/lib/postgresql/<ver>/bin)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing+=(postgresql)
# headless Chromium drives the dashboard test
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
python3 -c 'import sys, venv; assert sys.version_info >= (3, 11)' 2>/dev/null || missing+=(python3-venv)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing system packages: ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "please install: ${missing[*]} (no apt-get here)" >&2
  exit 1
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
