#!/usr/bin/env bash
# Control-plane benchmark: the latency of usage acks (what every TURN
# server waits for after each usage interval) with many tenants, on the
# embedded store and on Redis, driven by `floe loadtest usage-acks`.
#
#   scripts/bench-control.sh [TENANTS] [BATCHES]   (default 10000 tenants, 500 batches)
set -euo pipefail
cd "$(dirname "$0")/.."
TENANTS="${1:-10000}"
BATCHES="${2:-500}"
source scripts/bench-lib.sh

ADMIN="bench-admin-token-0123456789"
INTERNAL="bench-internal-token-0123456789"
control_plane() { # label store-args...
  local label=$1; shift
  local port; port=$(free_port)
  FLOE_LOG=warn "$floe" control-plane --listen "127.0.0.1:$port" "$@" \
    --admin-token "$ADMIN" --internal-token "$INTERNAL" --api-rate 100000 \
    --turn-secrets "k1=bench-turn-secret-0123456789" --turn-url "turn:127.0.0.1:3478" \
    2>>"$work/cp-$label.log" &
  pids+=($!)
  wait_http "http://127.0.0.1:$port/readyz"
  echo "== $label store: $TENANTS tenants, $BATCHES batches of 20 records"
  "$floe" loadtest --json "$work/$label.json" usage-acks --control-url "http://127.0.0.1:$port" \
    --internal-token "$INTERNAL" --admin-token "$ADMIN" --tenants "$TENANTS" --batches "$BATCHES"
  kill "${pids[-1]}"
}

control_plane embedded --store "$work/cp.redb"
if command -v redis-server >/dev/null; then
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >/dev/null &
  pids+=($!)
  for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
  control_plane redis --store "redis://127.0.0.1:$rport" --redis-prefix "bench:"
else
  echo "(redis-server not installed: skipping the Redis store; scripts/test.sh installs it)"
fi
