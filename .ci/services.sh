#!/usr/bin/env bash
# Starts (or installs, on a machine without them) the services the tests use:
# PostgreSQL on 127.0.0.1:5432, RabbitMQ on 127.0.0.1:5672 and NATS with JetStream on
# 127.0.0.1:4222. Never stops or restarts a
# service that is already running. With CI=true an unreachable service is an error;
# otherwise it is a warning and the tests that need it fail with a clear message.
set -uo pipefail

log() { printf '[services] %s\n' "$*"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 seconds=$2
  for _ in $(seq "$seconds"); do
    port_open "$port" && return 0
    sleep 1
  done
  return 1
}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {
  port_open 5432 && { log "PostgreSQL is up"; return 0; }
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql || return 1
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  local hba="/etc/postgresql/$version/main/pg_hba.conf"
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba" 2>/dev/null; then
    log "allowing local connections without a password (test machine)"
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust' "$hba"
  fi
  log "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_port 5432 60 || return 1
  as_root su postgres -c "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname='test'\" | grep -q 1 || createdb test" || true
  log "PostgreSQL is up"
}

ensure_rabbitmq() {
  port_open 5672 && { log "RabbitMQ is up"; return 0; }
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    apt_install rabbitmq-server || return 1
  fi
  log "starting RabbitMQ"
  as_root rabbitmq-server -detached || true
  wait_port 5672 120 || return 1
  log "RabbitMQ is up"
}

ensure_nats() {
  port_open 4222 && { log "NATS is up"; return 0; }
  if ! command -v nats-server >/dev/null 2>&1; then
    apt_install nats-server || return 1
  fi
  local store=/var/tmp/steward-nats
  log "starting nats-server with JetStream (store $store)"
  mkdir -p "$store" &&
    setsid nohup nats-server -js -a 127.0.0.1 -p 4222 -sd "$store" >"$store/server.log" 2>&1 </dev/null &
  wait_port 4222 30 || return 1
  log "NATS is up"
}

status=0
for service in postgres rabbitmq nats; do
  if ! "ensure_$service"; then
    if [ "${CI:-}" = "true" ]; then
      log "ERROR: $service is not reachable"
      status=1
    else
      log "WARNING: $service is not reachable; tests that need it will fail"
    fi
  fi
done
exit $status
