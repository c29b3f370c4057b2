#!/usr/bin/env bash
# Make sure a RabbitMQ answers on 127.0.0.1:5672: use one that runs, start an installed one, or say how to get one.
set -euo pipefail
answers() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if answers; then
  echo "RabbitMQ answers on 127.0.0.1:5672"
  exit 0
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing rabbitmq-server (Debian package)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
  else
    cat >&2 <<'MSG'
No RabbitMQ on 127.0.0.1:5672 and rabbitmq-server is not installed. Either
  sudo apt-get install rabbitmq-server && sudo rabbitmq-server -detached
or
  docker run -d --name rabbitmq -p 5672:5672 -p 15672:15672 rabbitmq:3-management
or point RELAY_AMQP_URL at your broker.
MSG
    exit 1
  fi
fi
echo "starting rabbitmq-server -detached"
rabbitmq-server -detached
for _ in $(seq 1 60); do
  if answers; then echo "RabbitMQ is up"; exit 0; fi
  sleep 1
done
echo "RabbitMQ did not come up within 60 s (see /var/log/rabbitmq/)" >&2
exit 1
