#!/usr/bin/env bash
# A second local Kafka 4.x node, secured as production clusters are: same jars and scripts
# as kafka.sh (sourced), its own state in .local/kafka-secure, certificates from
# deploy/local/tls/certs (.local/tls). Not started by a bare `deploy/local/up`; start it
# with `deploy/local/up kafka-secure` (the integration tests do when it does not answer).
#
#   127.0.0.1:9094  SASL_SSL   SCRAM-SHA-512 and SCRAM-SHA-256, user envoygeo, password in
#                              .local/kafka-secure/password (random, made at first start)
#   127.0.0.1:9095  SSL (MTLS) client certificate required (.local/tls/client.pem/.key)
#   127.0.0.1:9096  SSL        the broker shows an expired certificate   (negative tests)
#   127.0.0.1:9097  SSL        the broker shows a wrong-host certificate (negative tests)
#   127.0.0.1:9098  PLAINTEXT  inter-broker, readiness; 9099 the KRaft controller
# Ports: KAFKA_SECURE_BASE_PORT (default 9094) and the five after it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
base="${KAFKA_SECURE_BASE_PORT:-9094}"
export KAFKA_NAME=kafka-secure
export KAFKA_PORT=$((base + 4)) KAFKA_CONTROLLER_PORT=$((base + 5))
export KAFKA_HEAP="${KAFKA_SECURE_HEAP:-384m}"
export KAFKA_TEMPLATE="$here/../kafka/server-secure.properties.in"
# shellcheck source=kafka.sh
source "$here/kafka.sh"

TLS="${KAFKA_SECURE_TLS_DIR:-$STATE/tls}"
USER_NAME=envoygeo
SUBST=(-e "s|@SASL_SSL_PORT@|$base|g" -e "s|@MTLS_PORT@|$((base + 1))|g"
       -e "s|@EXPIRED_PORT@|$((base + 2))|g" -e "s|@WRONGHOST_PORT@|$((base + 3))|g"
       -e "s|@TLS@|$TLS|g")

secure_start() {
  if port_open "$PORT"; then start; return; fi  # says "already running"
  bash "$ROOT/deploy/local/tls/certs" "$TLS" >&2
  mkdir -p "$DIR"
  (umask 077
   # Kafka reads a PEM key store as one file holding the key and its certificate.
   cat "$TLS/expired.pem" "$TLS/expired.key" > "$DIR/expired-bundle.pem"
   cat "$TLS/wronghost.pem" "$TLS/wronghost.key" > "$DIR/wronghost-bundle.pem"
   # The SCRAM password is made once, with the storage it is formatted into.
   [[ -s $DIR/password && -f $DIR/data/meta.properties ]] \
     || { rm -rf "$DIR/data"; openssl rand -hex 16 > "$DIR/password"; })
  local password; password=$(cat "$DIR/password")
  FORMAT_ARGS=(--add-scram "SCRAM-SHA-512=[name=$USER_NAME,password=$password]"
               --add-scram "SCRAM-SHA-256=[name=$USER_NAME,password=$password]")
  start
  echo "  SASL_SSL 127.0.0.1:$base (SCRAM-SHA-512, user $USER_NAME, password file $DIR/password)"
  echo "  SSL+mTLS 127.0.0.1:$((base + 1)) (CA $TLS/ca.pem, client $TLS/client.pem)"
}

case "${1:-}" in
  start) secure_start ;; stop) stop ;; status) status ;; version) version ;;
  *) echo "usage: $0 start|stop|status|version" >&2; exit 2 ;;
esac
