#!/usr/bin/env bash
# Elasticsearch as production clusters are reached: over TLS, with authentication. The
# local node has no security module, so a real HAProxy (Debian's) terminates TLS in front
# of it and checks the credentials; certificates from deploy/local/tls/certs (.local/tls).
# Not started by a bare `deploy/local/up`; start it with `deploy/local/up es-tls` (the
# integration tests do when it does not answer).
#
#   https://127.0.0.1:9243  server.pem (CN/SAN localhost, 127.0.0.1, signed by ca.pem)
#   https://127.0.0.1:9244  wronghost.pem (SAN not-this-host.invalid only)  negative tests
#   https://127.0.0.1:9245  expired.pem                                    negative tests
# Every port forwards to http://127.0.0.1:${ES_PORT:-9200} only requests carrying
#   Authorization: Basic   user envoygeo, password in .local/es-tls/password
#   Authorization: ApiKey  base64(id:key), the encoded key in .local/es-tls/api_key
# (both random, made at first start); anything else gets 401 with WWW-Authenticate.
# Ports: ES_TLS_PORT (default 9243) and the two after it; ES_TLS_STATE (default
# .local/es-tls) holds the configuration, credentials and pid file.
set -euo pipefail
source "$(dirname "$0")/common.sh"

PORT="${ES_TLS_PORT:-9243}"
ES_PORT="${ES_PORT:-9200}"
DIR="${ES_TLS_STATE:-$STATE/es-tls}"  # another instance: ES_TLS_STATE + ES_TLS_PORT
TLS="${ES_TLS_DIR:-$STATE/tls}"
PIDFILE="$DIR/haproxy.pid"
USER_NAME=envoygeo

version() { haproxy -v | sed -nE '1s/^HAProxy version ([^ ]+).*/\1/p'; }

running() { [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && port_open "$PORT"; }

endpoints() {
  echo "es-tls https://127.0.0.1:$PORT -> http://127.0.0.1:$ES_PORT (HAProxy $(version))$1"
  echo "  CA $TLS/ca.pem; basic auth user $USER_NAME, password file $DIR/password;" \
       "API key file $DIR/api_key"
  echo "  wrong-host certificate https://127.0.0.1:$((PORT + 1)), expired" \
       "https://127.0.0.1:$((PORT + 2))"
}

start() {
  if ! command -v haproxy >/dev/null; then
    log "haproxy missing: run deploy/local/install (apt-get install haproxy)"
    exit 1
  fi
  if running; then endpoints " (already running)"; return 0; fi
  bash "$ROOT/deploy/local/tls/certs" "$TLS" >&2
  mkdir -p "$DIR"
  (umask 077
   [[ -s $DIR/password ]] || openssl rand -hex 16 > "$DIR/password"
   # An Elasticsearch API key's encoded form: base64("<id>:<key>").
   [[ -s $DIR/api_key ]] || printf '%s:%s' "envoygeo-$(openssl rand -hex 4)" \
       "$(openssl rand -hex 16)" | base64 -w0 > "$DIR/api_key"
   cat "$TLS/wronghost.pem" "$TLS/wronghost.key" > "$DIR/wronghost-bundle.pem"
   cat "$TLS/expired.pem" "$TLS/expired.key" > "$DIR/expired-bundle.pem"
   auth="    acl basic_ok http_auth(envoygeo_users)
    acl apikey_ok req.hdr(Authorization) -m str \"ApiKey $(cat "$DIR/api_key")\"
    http-request auth realm elasticsearch unless basic_ok || apikey_ok
    http-request del-header Authorization
    default_backend elasticsearch"
   cat > "$DIR/haproxy.cfg" <<CFG
# Made by deploy/local/services/es-tls.sh; holds the credentials (mode 600).
global
    pidfile $PIDFILE
    log stderr format short local0 notice
    # Room for a whole small request body (a saved-objects import is ~21 KB) ...
    tune.bufsize 65536
defaults
    mode http
    # ... read before the credentials are judged: a 401 sent while the client is still
    # uploading would reach it as a reset connection, not as the 401.
    option http-buffer-request
    log global
    timeout connect 5s
    timeout client 120s
    timeout server 120s
userlist envoygeo_users
    user $USER_NAME insecure-password $(cat "$DIR/password")
frontend es_tls
    bind 127.0.0.1:$PORT ssl crt $TLS/server-bundle.pem
$auth
frontend es_tls_wronghost
    bind 127.0.0.1:$((PORT + 1)) ssl crt $DIR/wronghost-bundle.pem
$auth
frontend es_tls_expired
    bind 127.0.0.1:$((PORT + 2)) ssl crt $DIR/expired-bundle.pem
$auth
backend elasticsearch
    server es 127.0.0.1:$ES_PORT
CFG
  )
  haproxy -c -q -f "$DIR/haproxy.cfg"
  haproxy -D -f "$DIR/haproxy.cfg" 2>>"$DIR/haproxy.log"
  wait_for 15 "es-tls (HAProxy)" port_open "$PORT"
  port_open "$ES_PORT" || log "es-tls: nothing answers on 127.0.0.1:$ES_PORT yet" \
    "(deploy/local/up elasticsearch)"
  endpoints ""
}

stop() { stop_pidfile "$PIDFILE" es-tls; }

status() { running && endpoints " up"; }

case "${1:-}" in
  start) start ;; stop) stop ;; status) status ;; version) version ;;
  *) echo "usage: $0 start|stop|status|version" >&2; exit 2 ;;
esac
