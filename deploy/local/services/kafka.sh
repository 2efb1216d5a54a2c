#!/usr/bin/env bash
# Local Apache Kafka 4.x: one KRaft node (broker + controller) on 127.0.0.1:${KAFKA_PORT:-9092}.
# Jars come from Maven Central (deploy/local/kafka/pom.xml), cached outside the clone;
# storage is formatted on first start; the broker runs with `java` directly.
# kafka-secure.sh sources this file for a second node (its own name, state, template,
# placeholders and storage-format arguments) and reuses everything else.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PORT="${KAFKA_PORT:-9092}"
CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
HEAP="${KAFKA_HEAP:-512m}"
POM="$ROOT/deploy/local/kafka/pom.xml"
VERSION=$(sed -nE 's:.*<kafka.version>(.*)</kafka.version>.*:\1:p' "$POM")
LIBS="$CACHE/kafka/$VERSION/libs"
NAME="${KAFKA_NAME:-kafka}"
TEMPLATE="${KAFKA_TEMPLATE:-$ROOT/deploy/local/kafka/server.properties.in}"
DIR="$STATE/$NAME"
SUBST=()        # extra sed expressions for the template (kafka-secure.sh)
FORMAT_ARGS=()  # extra `kafka-storage format` arguments (kafka-secure.sh: SCRAM users)
PIDFILE="$DIR/kafka.pid"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"

version() { echo "$VERSION"; }

fetch() {
  [[ -f $LIBS/.complete ]] && return 0
  log "kafka: resolving Kafka $VERSION and its runtime dependencies from Maven Central"
  mkdir -p "$LIBS"
  mvn -q -B -f "$POM" dependency:copy-dependencies \
    -DoutputDirectory="$LIBS" -DincludeScope=runtime >&2
  touch "$LIBS/.complete"
}

configure() {
  mkdir -p "$DIR/data" "$DIR/logs"
  sed -e "s|@PORT@|$PORT|g" -e "s|@CONTROLLER_PORT@|$CONTROLLER_PORT|g" -e "s|@DATA@|$DIR/data|g" \
    "${SUBST[@]}" "$TEMPLATE" > "$DIR/server.properties"
}

JAVA_CMD=("$JAVA" -Xms"$HEAP" -Xmx"$HEAP" -XX:+UseG1GC -XX:ActiveProcessorCount=2
  -Dlog4j2.configurationFile="$ROOT/deploy/local/kafka/log4j2.properties"
  -Dkafka.logs.dir="$DIR/logs" -cp "$LIBS/*")
kjava() { "${JAVA_CMD[@]}" "$@"; }

start() {
  if port_open "$PORT"; then
    echo "$NAME 127.0.0.1:$PORT $VERSION (already running)"
    return 0
  fi
  fetch
  configure
  if [[ ! -f $DIR/data/meta.properties ]]; then
    log "$NAME: formatting KRaft storage in $DIR/data"
    kjava kafka.tools.StorageTool format --standalone \
      -t "$(kjava kafka.tools.StorageTool random-uuid)" -c "$DIR/server.properties" \
      "${FORMAT_ARGS[@]}" >&2
  fi
  setsid nohup "${JAVA_CMD[@]}" kafka.Kafka "$DIR/server.properties" \
    > "$DIR/logs/stdout.log" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  if ! wait_for 120 "$NAME" broker_ready; then
    tail -n 40 "$DIR/logs/server.log" "$DIR/logs/stdout.log" >&2 || true
    exit 1
  fi
  echo "$NAME 127.0.0.1:$PORT $VERSION"
}

# The port opens before the broker has joined the quorum; wait for its own word.
broker_ready() {
  port_open "$PORT" && grep -q "Kafka Server started" "$DIR/logs/server.log"
}

stop() {
  stop_pidfile "$PIDFILE" "$NAME"
}

status() { port_open "$PORT" && echo "$NAME 127.0.0.1:$PORT $VERSION up"; }

[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0  # sourced by kafka-secure.sh
case "${1:-}" in
  start) start ;; stop) stop ;; status) status ;; version) version ;;
  *) echo "usage: $0 start|stop|status|version" >&2; exit 2 ;;
esac
