# Shared by the fault drills (sourced, not run): a fresh database and topic prefix, the
# broker, the service as real processes, the load from a process of its own, the outage
# watch on /readyz, and the verdict (the load's own checks plus `keyledger audit` from the
# events topic and from the store).
#
# The broker is Apache Kafka (scripts/broker). A drill that breaks the broker
# (OWN_BROKER=1 before sourcing) starts one of its own in its work folder; the others use
# KEYLEDGER_TEST_KAFKA_BROKERS when set (the test command's broker), else their own too.
# keyledger runs with its production settings: nothing here differs by broker.
#
# Settings (environment): DRILL_COMMANDS (10000), DRILL_RATE (commands/s, 400),
# DRILL_OUTAGE_SECONDS (30), DRILL_PROFILE (release), KEYLEDGER_TEST_DATABASE_URL and
# DRILL_PG_RESTART (a PostgreSQL and how to restart it; else the drill's own cluster),
# DRILL_KEEP=1 keeps the work folder of a drill that passed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keyledger/target}"
# DRILL_PROFILE=debug reuses the test build (CI's short variant); release by default.
PROFILE="${DRILL_PROFILE:-release}"
BIN="$CARGO_TARGET_DIR/$PROFILE/keyledger"
TOOLS="$CARGO_TARGET_DIR/$PROFILE/keyledger-tools"
COMMANDS="${DRILL_COMMANDS:-10000}"
RATE="${DRILL_RATE:-400}"
OUTAGE="${DRILL_OUTAGE_SECONDS:-30}"
WORK=$(mktemp -d "/tmp/keyledger-drill-$DRILL.XXXXXX")
PREFIX="drill$(date +%s)$RANDOM."
FIGURES=()

log() { printf '[drill %s %s] %s\n' "$DRILL" "$(date +%T)" "$*" >&2; }
figure() { FIGURES+=("$1=$2"); log "$1 = $2"; }

build() {
  log "building the $PROFILE binary"
  local profile=$PROFILE
  [ "$profile" = debug ] && profile=dev
  cargo build --profile "$profile" --quiet --manifest-path "$ROOT/Cargo.toml" --workspace --bin keyledger --bin keyledger-tools
}

# The broker: its own (in $WORK/broker, kept across stop/kill and start) or the shared one.
OWN_BROKER=${OWN_BROKER:-}
if [ -z "${KEYLEDGER_TEST_KAFKA_BROKERS:-}" ]; then OWN_BROKER=1; fi
start_broker() {
  if [ -n "$OWN_BROKER" ]; then
    BROKERS=$("$ROOT/scripts/broker" start "$WORK/broker")
  else
    BROKERS=$KEYLEDGER_TEST_KAFKA_BROKERS
  fi
}
stop_broker() { [ -z "$OWN_BROKER" ] || "$ROOT/scripts/broker" stop "$WORK/broker"; }
kill_broker() { "$ROOT/scripts/broker" kill "$WORK/broker"; }

# PostgreSQL: the test command's (KEYLEDGER_TEST_DATABASE_URL, restarted by
# DRILL_PG_RESTART), else a cluster of the drill's own in $WORK/pg with production settings.
start_postgres() {
  if [ -n "${KEYLEDGER_TEST_DATABASE_URL:-}" ]; then
    PGADMIN=$KEYLEDGER_TEST_DATABASE_URL
  else
    PGADMIN=$("$ROOT/scripts/postgres" start "$WORK/pg")
    DRILL_PG_RESTART="$ROOT/scripts/postgres restart $WORK/pg ${DRILL_PG_DOWN_SECONDS:-5}"
  fi
}
restart_postgres() {
  [ -n "${DRILL_PG_RESTART:-}" ] || { log "DRILL_PG_RESTART is not set: cannot restart KEYLEDGER_TEST_DATABASE_URL's server"; return 1; }
  eval "$DRILL_PG_RESTART"
}

fresh_database() {
  # kl_test_*: the test command drops leftovers of earlier runs.
  local name="kl_test_drill_${DRILL//-/_}_$(date +%s)_$RANDOM"
  psql "$PGADMIN" -qc "CREATE DATABASE $name" >/dev/null
  DB="${PGADMIN%/*}/$name"
}

export_service_env() {
  export KEYLEDGER_DATABASE_URL="$DB"
  export KEYLEDGER_PEPPER="drill-pepper-0123456789abcdef0123456789abcdef"
  export KEYLEDGER_API_TOKEN="drill-token-0123456789abcdef0123"
  export KEYLEDGER_SIGNING_KEY="ZHJpbGwtc2lnbmluZy1rZXktMDAwMDAwMDAwMDAwMDA="
  export KEYLEDGER_KAFKA_BROKERS="$BROKERS"
  export KEYLEDGER_TOPIC_PREFIX="$PREFIX"
  export KEYLEDGER_KAFKA_PARTITIONS=6
  unset KEYLEDGER_KAFKA_OPTIONS
  export RUST_LOG="${RUST_LOG:-keyledger=info}"
}

# start_service NAME PORT: the whole service (every role) as a process of its own.
start_service() {
  local name=$1 port=$2
  KEYLEDGER_LISTEN="127.0.0.1:$port" nohup "$BIN" serve >>"$WORK/$name.log" 2>&1 &
  echo $! >"$WORK/$name.pid"
  log "started $name (pid $(cat "$WORK/$name.pid")) on port $port"
}

kill9_service() {
  local name=$1
  kill -9 "$(cat "$WORK/$name.pid")" 2>/dev/null || true
  wait "$(cat "$WORK/$name.pid")" 2>/dev/null || true
  log "killed $name with SIGKILL"
}

stop_service() {
  local name=$1 pid
  pid=$(cat "$WORK/$name.pid" 2>/dev/null || echo "")
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

# wait_ready PORT SECONDS: until /readyz answers 200; prints how long it took.
wait_ready() {
  local port=$1 limit=$2 start=$SECONDS
  while [ $((SECONDS - start)) -lt "$limit" ]; do
    if curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
      echo $((SECONDS - start)); return 0
    fi
    sleep 0.2
  done
  log "port $port not ready after ${limit}s"; return 1
}

# watch_health PORT: records /readyz status codes (one per 200 ms) in $WORK/health.
watch_health() {
  local port=$1
  ( while true; do
      printf '%s %s\n' "$(date +%s)" "$(curl -s -o /dev/null -w '%{http_code}' -m 3 "http://127.0.0.1:$port/readyz" || echo 000)"
      sleep 0.2
    done ) >"$WORK/health" 2>/dev/null &
  echo $! >"$WORK/health.pid"
}
stop_watch() { kill "$(cat "$WORK/health.pid")" 2>/dev/null || true; }
unhealthy_samples() { grep -vc ' 200$' "$WORK/health" || true; }

start_load() {
  "$TOOLS" drill --commands "$COMMANDS" --rate "$RATE" --deadline-seconds 900 \
    --resend-after-seconds 20 >"$WORK/load.json" 2>"$WORK/load.log" &
  echo $! >"$WORK/load.pid"
  log "load started: $COMMANDS commands at $RATE/s (pid $(cat "$WORK/load.pid"))"
}

# wait_load: waits for the load's verdict; records its figures.
wait_load() {
  local rc=0
  wait "$(cat "$WORK/load.pid")" || rc=$?
  LOAD_RC=$rc
  if [ -s "$WORK/load.json" ]; then
    for k in commands redelivered resent_without_result seconds commands_per_second missing_results wrong_status inconsistent_answers effect_errors accepted_keys listed_keys listing_caught_up_seconds; do
      figure "load.$k" "$(jq -r ".$k" "$WORK/load.json")"
    done
    figure "load.final_statuses" "$(jq -c '.final_statuses' "$WORK/load.json")"
  else
    log "the load printed no report (exit $rc); see $WORK/load.log"
  fi
}

# audit_both: the whole log from the events topic and from the store; both must pass.
audit_both() {
  local rc=0 from
  for from in kafka store; do
    if "$BIN" audit --from "$from" --json >"$WORK/audit-$from.json" 2>"$WORK/audit-$from.log"; then
      figure "audit.$from" "pass ($(jq -r '.events' "$WORK/audit-$from.json") events)"
    else
      rc=1
      figure "audit.$from" "FAIL: $(jq -c '.findings[:3]' "$WORK/audit-$from.json" 2>/dev/null || tail -3 "$WORK/audit-$from.log")"
    fi
  done
  AUDIT_RC=$rc
}

verdict() {
  local ok=$1
  echo
  echo "drill $DRILL: $([ "$ok" = 0 ] && echo PASS || echo FAIL)"
  for f in "${FIGURES[@]}"; do echo "  $f"; done
  if [ "$ok" = 0 ] && [ -z "${DRILL_KEEP:-}" ]; then PASSED=1; else echo "  work folder (logs, reports): $WORK"; fi
  return "$ok"
}

cleanup() {
  stop_watch 2>/dev/null || true
  [ -f "$WORK/load.pid" ] && kill "$(cat "$WORK/load.pid")" 2>/dev/null || true
  for p in "$WORK"/*.pid; do
    case "$p" in */health.pid|*/load.pid) ;; *) stop_service "$(basename "$p" .pid)" ;; esac
  done
  stop_broker >/dev/null 2>&1 || true
  [ ! -d "$WORK/pg" ] || "$ROOT/scripts/postgres" stop "$WORK/pg" || true
  if [ -n "${PASSED:-}" ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

# setup: build, broker, database, environment.
setup() {
  build
  start_broker
  start_postgres
  fresh_database
  export_service_env
  log "database $DB, topics $PREFIX*, broker $BROKERS$([ -n "$OWN_BROKER" ] && echo ' (its own)'), work $WORK"
}

# finish: every check; the drill passes when all hold.
finish() {
  audit_both
  local ok=0
  [ "${LOAD_RC:-1}" = 0 ] || ok=1
  [ "${AUDIT_RC:-1}" = 0 ] || ok=1
  [ "${EXTRA_RC:-0}" = 0 ] || ok=1
  verdict "$ok"
}
