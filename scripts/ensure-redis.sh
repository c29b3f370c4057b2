#!/usr/bin/env bash
# Make sure a Redis answers on 127.0.0.1:6379 for the enrichment tests: use one that runs, start an
# installed one (nothing persisted), or install Debian's redis-server first.
set -euo pipefail
answers() { (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; }

if answers; then
  echo "Redis answers on 127.0.0.1:6379"
  exit 0
fi
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server (Debian package)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "No Redis on 127.0.0.1:6379 and redis-server is not installed (apt-get install redis-server)" >&2
    exit 1
  fi
fi
echo "starting redis-server"
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp
for _ in $(seq 1 30); do
  if answers; then echo "Redis is up"; exit 0; fi
  sleep 0.5
done
echo "Redis did not come up" >&2
exit 1
