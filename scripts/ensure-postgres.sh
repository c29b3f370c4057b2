#!/usr/bin/env bash
# Make sure a PostgreSQL answers on 127.0.0.1:5432 with trust auth for the consumer kit's tests
# (relay.consumer.PostgresInbox): use one that runs, start an installed cluster, or install Debian's
# postgresql first. Creates the database `test` when it is missing.
set -euo pipefail
answers() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }

if ! answers; then
  if ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing postgresql (Debian package)"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
      echo "No PostgreSQL on 127.0.0.1:5432 and postgresql is not installed (apt-get install postgresql)" >&2
      exit 1
    fi
  fi
  version=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
  if command -v pg_lsclusters >/dev/null 2>&1 && [ -z "$(pg_lsclusters -h 2>/dev/null | awk -v v="$version" '$1 == v')" ]; then
    pg_createcluster "$version" main >/dev/null
  fi
  conf=/etc/postgresql/$version/main
  if [ -d "$conf" ]; then
    # Tests connect as postgres without a password, on loopback only.
    if ! grep -q "relay-tests" "$conf/pg_hba.conf"; then
      sed -i '1i host all all 127.0.0.1/32 trust # relay-tests\nhost all all ::1/128 trust # relay-tests' "$conf/pg_hba.conf"
    fi
    sed -i "s/^#\?listen_addresses.*/listen_addresses = '127.0.0.1'/" "$conf/postgresql.conf"
  fi
  echo "starting postgresql $version"
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster "$version" main start || pg_ctlcluster "$version" main reload  # apt may have started it
  else
    service postgresql start
  fi
  for _ in $(seq 1 60); do
    if answers; then break; fi
    sleep 0.5
  done
  if ! answers; then
    echo "PostgreSQL did not come up" >&2
    exit 1
  fi
fi
echo "PostgreSQL answers on 127.0.0.1:5432"
if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
  psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE test"
fi
