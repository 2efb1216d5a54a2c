# Shared helpers for deploy/local/services/*.sh (sourced, not executed).
# Why a shared file: every service needs the same answers to "where is the repo",
# "where do downloads go" and "wait until a port answers".

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
# Downloads live outside the clone so a fresh clone (CI) reuses them.
CACHE="${ENVOYGEO_CACHE:-$HOME/.cache/envoygeo}"
# Data, logs and pid files live in the clone, git-ignored.
STATE="$ROOT/.local"
mkdir -p "$CACHE" "$STATE"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for <seconds> <description> <command...>: poll until the command succeeds.
wait_for() {
  local timeout=$1 what=$2; shift 2
  local start=$SECONDS
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS - start > timeout )); then
      log "$what did not come up within ${timeout}s"
      return 1
    fi
    sleep 0.5
  done
}

# stop_pidfile <pidfile> <name>: TERM, wait, then KILL; idempotent.
stop_pidfile() {
  local pidfile=$1 name=$2 pid
  [[ -f $pidfile ]] || { log "$name: not running (no pid file)"; return 0; }
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    log "$name: stopped (pid $pid)"
  fi
  rm -f "$pidfile"
}
