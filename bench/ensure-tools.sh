#!/usr/bin/env bash
# Install what `python -m bench.run` needs beyond the project venv, idempotently, on Debian as root:
#   - wrk, the HTTP load generator (Debian package `wrk`, 4.1.0, LuaJIT scripting).
# RabbitMQ itself comes from scripts/ensure-rabbitmq.sh (the benchmark uses the shared local broker).
# Re-running is cheap: nothing is installed when wrk is already on PATH.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have wrk; then
  echo "ensure-tools: wrk present ($(command -v wrk))"
  exit 0
fi
if [ "$(id -u)" = 0 ] && have apt-get; then
  echo "ensure-tools: installing Debian package wrk"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends wrk >/dev/null
  echo "ensure-tools: wrk installed ($(command -v wrk))"
else
  echo "ensure-tools: wrk missing; run this script as root on Debian, or: apt-get install wrk" >&2
  exit 1
fi
