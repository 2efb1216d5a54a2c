#!/usr/bin/env bash
# A second local Redis (Debian redis-server 7) secured as a production one is: TLS only
# (no plaintext port) and an ACL user instead of the open default user. Certificates from
# deploy/local/tls/certs (.local/tls). Not started by a bare `deploy/local/up`; start it
# with `deploy/local/up redis-secure` (the integration tests do when it does not answer).
#
#   rediss://envoygeo:<password>@127.0.0.1:${REDIS_SECURE_PORT:-6380}/0
#     server.pem (localhost, 127.0.0.1; CA .local/tls/ca.pem); no client certificate
#     needed; user envoygeo, password in .local/redis-secure/password (random, made at
#     first start), keys envoygeo*; the default user is off.
set -euo pipefail
source "$(dirname "$0")/common.sh"

PORT="${REDIS_SECURE_PORT:-6380}"
DIR="$STATE/redis-secure"
TLS="${REDIS_SECURE_TLS_DIR:-$STATE/tls}"
PIDFILE="$DIR/redis.pid"
USER_NAME=envoygeo

version() { redis-server --version | sed -E 's/.*v=([0-9.]+).*/\1/'; }

ping() {
  REDISCLI_AUTH="$(cat "$DIR/password")" redis-cli --tls --cacert "$TLS/ca.pem" \
    -h 127.0.0.1 -p "$PORT" --user "$USER_NAME" ping 2>/dev/null | grep -q PONG
}

endpoints() {
  echo "redis-secure rediss://$USER_NAME:***@127.0.0.1:$PORT/0 $(version)$1"
  echo "  CA $TLS/ca.pem; password file $DIR/password"
}

start() {
  if ! command -v redis-server >/dev/null; then
    log "redis-server missing: run deploy/local/install (apt-get install redis-server)"
    exit 1
  fi
  if [[ -s $DIR/password ]] && ping; then endpoints " (already running)"; return 0; fi
  bash "$ROOT/deploy/local/tls/certs" "$TLS" >&2
  mkdir -p "$DIR"
  (umask 077
   [[ -s $DIR/password ]] || openssl rand -hex 16 > "$DIR/password"
   # The configuration holds the password: a file (mode 600), not the command line.
   cat > "$DIR/redis.conf" <<CFG
bind 127.0.0.1
port 0
tls-port $PORT
tls-cert-file $TLS/server.pem
tls-key-file $TLS/server.key
tls-ca-cert-file $TLS/ca.pem
tls-auth-clients no
save ""
appendonly no
daemonize yes
pidfile $PIDFILE
logfile $DIR/redis.log
dir $DIR
user default off
user $USER_NAME on >$(cat "$DIR/password") ~envoygeo* +@all
CFG
  )
  redis-server "$DIR/redis.conf"
  wait_for 30 redis-secure ping
  endpoints ""
}

stop() { stop_pidfile "$PIDFILE" redis-secure; }

status() { ping && endpoints " up"; }

case "${1:-}" in
  start) start ;; stop) stop ;; status) status ;; version) version ;;
  *) echo "usage: $0 start|stop|status|version" >&2; exit 2 ;;
esac
