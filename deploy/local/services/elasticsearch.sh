#!/usr/bin/env bash
# Local single-node Elasticsearch for envoygeo, assembled from Maven Central.
#
#   deploy/local/services/elasticsearch.sh start|stop|restart|status|version|logs
#
# There is no Docker and no download site reachable here, only package registries.
# Elasticsearch publishes its server jar and the transport-netty4 module on Maven
# Central (for its Java test framework), so we fetch those with mvn, compile a tiny
# launcher (deploy/local/elasticsearch/src) and run a real node from them. See
# deploy/local/elasticsearch/README.md for what that node can and cannot do.
#
# Environment:
#   ES_VERSION            Elasticsearch version (default 9.5.3; the launcher targets 9.5.x)
#   ES_PORT               HTTP port on 127.0.0.1 (default 9200)
#   ES_TRANSPORT_PORT     transport port on 127.0.0.1 (default 9300)
#   ES_HEAP               max heap (default 1g); ES_HEAP_MIN initial heap (default 512m)
#   ES_PROCESSORS         node.processors, sizes the thread pools (default 2)
#   ES_WRITE_QUEUE_SIZE   thread_pool.write.queue_size (default: Elasticsearch's 10000);
#                         a small value makes _bulk items fail with 429 under load
#   ES_SETTINGS           extra settings, whitespace separated key=value pairs
#   ES_JAVA_HOME          JDK to use (needs 21+; default: JAVA_HOME or a JDK found in /usr/lib/jvm)
#   ES_START_TIMEOUT      seconds to wait for the node to answer (default 180)
#   ES_STATE_DIR          data, logs and pid file (default <repo>/.local/elasticsearch)
#   ENVOYGEO_CACHE        artifact cache root (default ~/.cache/envoygeo); jars go to
#                         $ENVOYGEO_CACHE/elasticsearch/<version>/ (and ~/.m2 via mvn)
#
# Settings only apply when the node starts; use `restart` after changing them.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(git -C "$SCRIPT_DIR" rev-parse --show-toplevel 2>/dev/null || (cd "$SCRIPT_DIR/../../.." && pwd))"
LAUNCHER_DIR="$REPO_ROOT/deploy/local/elasticsearch"

ES_VERSION="${ES_VERSION:-9.5.3}"
ES_PORT="${ES_PORT:-9200}"
ES_TRANSPORT_PORT="${ES_TRANSPORT_PORT:-9300}"
ES_HEAP="${ES_HEAP:-1g}"
ES_HEAP_MIN="${ES_HEAP_MIN:-512m}"
ES_PROCESSORS="${ES_PROCESSORS:-2}"
ES_START_TIMEOUT="${ES_START_TIMEOUT:-180}"
ES_URL="http://127.0.0.1:${ES_PORT}"

CACHE_DIR="${ENVOYGEO_CACHE:-$HOME/.cache/envoygeo}/elasticsearch/$ES_VERSION"
STATE_DIR="${ES_STATE_DIR:-$REPO_ROOT/.local/elasticsearch}"
HOME_DIR="$STATE_DIR/home"
DATA_DIR="$STATE_DIR/data"
LOG_DIR="$STATE_DIR/logs"
PID_FILE="$STATE_DIR/elasticsearch.pid"

log() { echo "elasticsearch: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Prints the running version if something answers GET / on ES_PORT.
answering_version() {
    local body
    body="$(curl -sf --max-time 3 "$ES_URL/" 2>/dev/null)" || return 1
    sed -n 's/.*"number" *: *"\([^"]*\)".*/\1/p' <<<"$body"
}

pid_alive() {
    [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null
}

java_feature_version() {
    "$1" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = \([0-9]*\).*/\1/p'
}

# Elasticsearch 9.x is compiled for Java 21; the box defaults to 17, so look further.
find_java() {
    local candidates=() c
    [[ -n "${ES_JAVA_HOME:-}" ]] && candidates+=("$ES_JAVA_HOME/bin/java")
    [[ -n "${JAVA_HOME:-}" ]] && candidates+=("$JAVA_HOME/bin/java")
    for c in /usr/lib/jvm/temurin-25-jdk-amd64 /usr/lib/jvm/*; do candidates+=("$c/bin/java"); done
    command -v java >/dev/null && candidates+=("$(command -v java)")
    for c in "${candidates[@]}"; do
        [[ -x "$c" && -x "$(dirname "$c")/javac" ]] || continue
        local v
        v="$(java_feature_version "$c")"
        if [[ -n "$v" && "$v" -ge 21 ]]; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

# Gathers the node classpath into the cache once per version (mvn also fills ~/.m2).
ensure_jars() {
    local lib="$CACHE_DIR/lib"
    [[ -f "$lib/.complete" ]] && return 0
    command -v mvn >/dev/null || die "mvn is required to fetch Elasticsearch $ES_VERSION from Maven Central"
    log "fetching Elasticsearch $ES_VERSION jars from Maven Central into $lib"
    rm -rf "$lib.tmp"
    mkdir -p "$lib.tmp" "$CACHE_DIR"
    if ! mvn -B -Dstyle.color=never -f "$LAUNCHER_DIR/pom.xml" dependency:copy-dependencies \
            -Des.version="$ES_VERSION" -DoutputDirectory="$lib.tmp" -DincludeScope=runtime \
            >"$CACHE_DIR/mvn.log" 2>&1; then
        grep -E 'ERROR|BUILD' "$CACHE_DIR/mvn.log" | head -n 20 >&2 || true
        die "mvn could not resolve org.elasticsearch:elasticsearch:$ES_VERSION (full output: $CACHE_DIR/mvn.log)"
    fi
    touch "$lib.tmp/.complete"
    rm -rf "$lib"
    mv "$lib.tmp" "$lib"
}

# Compiles the launcher; the output directory is keyed by the sources' hash so an
# edited launcher is rebuilt and an unchanged one is reused from the cache.
ensure_launcher() {
    local java="$1" javac hash out
    javac="$(dirname "$java")/javac"
    # "v2" is the cache layout (classes/ + launcher.jar); bump it when that changes.
    hash="$( (echo v2; cd "$LAUNCHER_DIR" && find src -name '*.java' -print0 | sort -z | xargs -0 cat) | sha256sum | cut -c1-16)"
    out="$CACHE_DIR/launcher-$hash"
    if [[ ! -f "$out/.complete" ]]; then
        log "compiling launcher into $out"
        rm -rf "$out"
        mkdir -p "$out/classes"
        # shellcheck disable=SC2046
        "$javac" --release 21 -nowarn -d "$out/classes" -cp "$CACHE_DIR/lib/*" \
            $(find "$LAUNCHER_DIR/src" -name '*.java') >&2 || die "launcher compilation failed"
        # A jar, not a directory: the class-data sharing archive only accepts jars on the classpath.
        "$(dirname "$java")/jar" --create --file "$out/launcher.jar" -C "$out/classes" . >&2
        touch "$out/.complete"
    fi
    echo "$out"
}

write_config() {
    mkdir -p "$HOME_DIR/config" "$DATA_DIR" "$LOG_DIR" "$STATE_DIR/tmp"
    # Elasticsearch configures log4j from path.home/config; es.logs.base_path is set by it to path.logs.
    cat >"$HOME_DIR/config/log4j2.properties" <<'EOF'
# Generated by deploy/local/services/elasticsearch.sh on every start.
status = error
appender.rolling.type = RollingFile
appender.rolling.name = rolling
appender.rolling.fileName = ${sys:es.logs.base_path}${sys:file.separator}elasticsearch.log
appender.rolling.filePattern = ${sys:es.logs.base_path}${sys:file.separator}elasticsearch-%i.log
appender.rolling.layout.type = PatternLayout
appender.rolling.layout.pattern = [%d{ISO8601}][%-5p][%-25c{1.}] [%node_name]%marker %m%n
appender.rolling.policies.type = Policies
appender.rolling.policies.size.type = SizeBasedTriggeringPolicy
appender.rolling.policies.size.size = 50MB
appender.rolling.strategy.type = DefaultRolloverStrategy
appender.rolling.strategy.max = 3
rootLogger.level = info
rootLogger.appenderRef.rolling.ref = rolling
EOF
}

# The distribution ships libzstd.so (and libvec.so) in lib/platform/; Maven Central has
# neither. zstd is not optional: index.codec=best_compression stores fields with it and,
# without the library, the first flush fails and the shard goes red. Debian's libzstd1
# exports the same C API, so link it where Elasticsearch looks. libvec only speeds up
# vector search: it is switched off (enableVectorLibrary=false) so that its absence does
# not disable native access as a whole (zstd, mlock, rlimits).
link_native_libs() {
    local dir="$CACHE_DIR/native" lib="" c
    mkdir -p "$dir"
    [[ -e "$dir/libzstd.so" ]] && return 0
    for c in /usr/lib/x86_64-linux-gnu/libzstd.so.1 /usr/lib/aarch64-linux-gnu/libzstd.so.1 \
             /usr/lib64/libzstd.so.1 /usr/lib/libzstd.so.1; do
        [[ -e "$c" ]] && { lib="$c"; break; }
    done
    if [[ -z "$lib" ]] && command -v ldconfig >/dev/null; then
        lib="$(ldconfig -p 2>/dev/null | awk '/libzstd\.so\.1 / {print $NF; exit}')"
    fi
    if [[ -z "$lib" ]]; then
        log "WARNING: no system libzstd.so.1 (apt-get install libzstd1); indices with index.codec=best_compression will fail"
        return 0
    fi
    ln -sf "$lib" "$dir/libzstd.so"
}

print_log_tail() {
    local f
    for f in "$LOG_DIR/elasticsearch.log" "$LOG_DIR/stdout.log"; do
        [[ -s "$f" ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 40 "$f" >&2
    done
}

cmd_start() {
    local version
    if version="$(answering_version)"; then
        echo "elasticsearch $ES_URL $version"
        return 0
    fi
    if ! pid_alive; then
        rm -f "$PID_FILE"
        local java classes
        java="$(find_java)" || die "no JDK 21+ found (set ES_JAVA_HOME); Elasticsearch $ES_VERSION needs Java 21 or newer"
        ensure_jars
        classes="$(ensure_launcher "$java")"
        write_config
        link_native_libs

        local settings=(
            "path.home=$HOME_DIR"
            "path.data=$DATA_DIR"
            "path.logs=$LOG_DIR"
            "cluster.name=envoygeo-local"
            "node.name=envoygeo-es"
            "discovery.type=single-node"
            "network.host=127.0.0.1"
            "http.port=$ES_PORT"
            "transport.port=$ES_TRANSPORT_PORT"
            "node.processors=$ES_PROCESSORS"
            # A developer disk at 90% must not turn every index read-only.
            "cluster.routing.allocation.disk.threshold_enabled=false"
        )
        [[ -n "${ES_WRITE_QUEUE_SIZE:-}" ]] && settings+=("thread_pool.write.queue_size=$ES_WRITE_QUEUE_SIZE")
        if [[ -n "${ES_SETTINGS:-}" ]]; then
            local extra
            for extra in $ES_SETTINGS; do
                [[ "$extra" == *=* ]] || die "ES_SETTINGS entry [$extra] is not key=value"
                settings+=("$extra")
            done
        fi

        local jvm=(
            "-Xms$ES_HEAP_MIN" "-Xmx$ES_HEAP"
            -XX:+UseG1GC -XX:-OmitStackTraceInFastThrow -XX:+ExitOnOutOfMemoryError
            -Djava.awt.headless=true -Dfile.encoding=UTF-8 -Djava.io.tmpdir="$STATE_DIR/tmp"
            -Dlog4j2.formatMsgNoLookups=true -Dlog4j.shutdownHookEnabled=false
            # Elasticsearch's own native libs are not on Maven Central; see link_native_libs.
            -Des.nativelibs.path="$CACHE_DIR/native" -Dorg.elasticsearch.nativeaccess.enableVectorLibrary=false
            # As in the distribution's jvm.options: keep Netty off sun.misc.Unsafe.
            -Dio.netty.noUnsafe=true -Dio.netty.noKeySetOptimization=true -Dio.netty.recycler.maxCapacityPerThread=0
            --enable-native-access=ALL-UNNAMED --add-modules=jdk.incubator.vector
            # Class-data sharing archive, written at the first exit and reused afterwards:
            # loading ~20k classes is most of the start time on a 2-core box.
            -XX:+AutoCreateSharedArchive -XX:SharedArchiveFile="$classes/node.jsa" -Xlog:cds=off
        )
        # JDK 25 reports archive mismatches under the "aot" tag, which older JDKs reject.
        (( $(java_feature_version "$java") >= 25 )) && jvm+=(-Xlog:aot=off)

        log "starting Elasticsearch $ES_VERSION with $java (heap $ES_HEAP_MIN..$ES_HEAP), logs in $LOG_DIR"
        : >"$LOG_DIR/stdout.log"
        # setsid: the node must outlive the calling shell / test session.
        setsid nohup "$java" "${jvm[@]}" -cp "$classes/launcher.jar:$CACHE_DIR/lib/*" \
            org.elasticsearch.node.EnvoygeoNode "${settings[@]}" \
            >>"$LOG_DIR/stdout.log" 2>&1 </dev/null &
        echo $! >"$PID_FILE"
    else
        log "process $(cat "$PID_FILE") is starting, waiting for it"
    fi

    local deadline=$((SECONDS + ES_START_TIMEOUT))
    while ((SECONDS < deadline)); do
        if version="$(answering_version)"; then
            echo "elasticsearch $ES_URL $version"
            return 0
        fi
        if ! pid_alive; then
            log "the node exited during startup"
            print_log_tail
            rm -f "$PID_FILE"
            exit 1
        fi
        sleep 1
    done
    log "no answer on $ES_URL after ${ES_START_TIMEOUT}s (process $(cat "$PID_FILE") left running; use stop)"
    print_log_tail
    exit 1
}

cmd_stop() {
    if ! pid_alive; then
        rm -f "$PID_FILE"
        if answering_version >/dev/null; then
            log "something answers on $ES_URL but it was not started by this script (no live pid in $PID_FILE); leaving it alone"
        else
            log "not running"
        fi
        return 0
    fi
    local pid
    pid="$(cat "$PID_FILE")"
    log "stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "still alive after 60s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PID_FILE"
    log "stopped"
}

cmd_status() {
    local version
    if version="$(answering_version)"; then
        if pid_alive; then
            echo "elasticsearch $ES_URL $version running (pid $(cat "$PID_FILE"))"
        else
            echo "elasticsearch $ES_URL $version running (not started by this script)"
        fi
        return 0
    fi
    if pid_alive; then
        echo "elasticsearch $ES_URL starting (pid $(cat "$PID_FILE"))"
        return 0
    fi
    echo "elasticsearch $ES_URL stopped"
    return 3
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status) cmd_status ;;
    version) echo "$ES_VERSION" ;;
    logs) tail -n "${2:-100}" "$LOG_DIR/elasticsearch.log" ;;
    *)
        echo "usage: $0 start|stop|restart|status|version|logs [lines]" >&2
        exit 2
        ;;
esac
