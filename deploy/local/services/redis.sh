#!/usr/bin/env bash
# Local Redis (Debian redis-server) on 127.0.0.1:${REDIS_PORT:-6379}, no persistence.
set -euo pipefail
source "$(dirname "$0")/common.sh"

PORT="${REDIS_PORT:-6379}"
DIR="$STATE/redis"
PIDFILE="$DIR/redis.pid"

version() { redis-server --version | sed -E 's/.*v=([0-9.]+).*/\1/'; }

start() {
  if ! command -v redis-server >/dev/null; then
    log "redis-server missing: run deploy/local/install (apt-get install redis-server)"
    exit 1
  fi
  if redis-cli -p "$PORT" ping >/dev/null 2>&1; then
    echo "redis redis://127.0.0.1:$PORT $(version) (already running)"
    return 0
  fi
  mkdir -p "$DIR"
  redis-server --bind 127.0.0.1 --port "$PORT" --save '' --appendonly no \
    --daemonize yes --pidfile "$PIDFILE" --logfile "$DIR/redis.log" --dir "$DIR"
  wait_for 30 redis redis-cli -p "$PORT" ping
  echo "redis redis://127.0.0.1:$PORT $(version)"
}

stop() {
  if redis-cli -p "$PORT" ping >/dev/null 2>&1 && [[ ! -f $PIDFILE ]]; then
    redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
  fi
  stop_pidfile "$PIDFILE" redis
}

status() { redis-cli -p "$PORT" ping >/dev/null 2>&1 && echo "redis redis://127.0.0.1:$PORT $(version) up"; }

case "${1:-}" in
  start) start ;; stop) stop ;; status) status ;; version) version ;;
  *) echo "usage: $0 start|stop|status|version" >&2; exit 2 ;;
esac
