#!/usr/bin/env bash
# The big load scenario on this machine:
#  1. against `floe dev`: PAIRS pairs relaying BYTES each way through TURN
#     (ledger reconciled), then 10,000 signal-only peers on its one node;
#  2. against a multi-node setup: two signal nodes on one Redis, separate
#     TURN and control-plane processes, the same transfer scenario with
#     peers spread over both signal nodes.
#
#   scripts/bench-load.sh [PAIRS] [BYTES]     (default 1000 pairs, 1 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS="${1:-1000}"
BYTES="${2:-1048576}"
source scripts/bench-lib.sh
field() { python3 -c "import json,sys; print(json.load(open('$1'))['$2'])"; }

echo "== floe dev: $PAIRS pairs x $BYTES B each way, then 10000 signal-only peers"
FLOE_LOG=warn "$floe" dev --data-dir "$work/dev" --signal-port 0 --control-port 0 \
  --turn-port 0 --turn-http-port 0 >"$work/dev.out" 2>"$work/dev.err" &
pids+=($!)
dev_pid=$!
for _ in $(seq 200); do [ -f "$work/dev/endpoints.json" ] && break; sleep 0.05; done
ep="$work/dev/endpoints.json"
"$floe" loadtest --json "$work/dev-transfer.json" transfer --signal-url "$(field "$ep" signal_url)" \
  --control-url "$(field "$ep" control_url)" --key-id "$(field "$ep" api_key_id)" \
  --key-secret "$(field "$ep" api_key_secret)" --pairs "$PAIRS" --bytes "$BYTES" --join-rate 200 --timeout-secs 300
"$floe" loadtest --json "$work/dev-signal.json" signal --signal-url "$(field "$ep" signal_url)" \
  --key-id "$(field "$ep" api_key_id)" --key-secret "$(field "$ep" api_key_secret)" \
  --peers 10000 --rounds 5 --join-rate 2000 --server-pid "$dev_pid"
kill "$dev_pid"; wait "$dev_pid" 2>/dev/null || true

echo "== multi-node: 2 signal nodes on Redis, separate TURN and control plane"
rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
ADMIN="bench-admin-token-0123456789"; INTERNAL="bench-internal-token-0123456789"
SECRETS="k1=bench-turn-secret-0123456789"
cp=$(free_port); turn=$(free_port)
FLOE_LOG=warn "$floe" control-plane --listen "127.0.0.1:$cp" --store "redis://127.0.0.1:$rport" \
  --admin-token "$ADMIN" --internal-token "$INTERNAL" --turn-secrets "$SECRETS" \
  --stun-url "stun:127.0.0.1:$turn" --turn-url "turn:127.0.0.1:$turn?transport=udp" --api-rate 100000 \
  2>>"$work/cp.log" &
pids+=($!)
wait_http "http://127.0.0.1:$cp/readyz"
FLOE_LOG=warn "$floe" turn --listen "127.0.0.1:$turn" --http-listen "127.0.0.1:$(free_port)" \
  --turn-secrets "$SECRETS" --control-url "http://127.0.0.1:$cp" --internal-token "$INTERNAL" \
  --allow-peer 127.0.0.0/8 --data-dir "$work/turn" 2>>"$work/turn.log" &
pids+=($!)
export FLOE_CONTROL_URL="http://127.0.0.1:$cp" FLOE_ADMIN_TOKEN="$ADMIN"
"$floe" tenant create --id bench --name bench --turn true >/dev/null
key=$("$floe" tenant --json create-key bench)
kid=$(echo "$key" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
ksecret=$(echo "$key" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
urls=()
for n in 0 1; do
  port=$(free_port)
  FLOE_LOG=warn "$floe" signal --listen "127.0.0.1:$port" --control-url "http://127.0.0.1:$cp" \
    --internal-token "$INTERNAL" --redis-url "redis://127.0.0.1:$rport" --node-id "node$n" \
    --max-connections-per-ip 100000 2>>"$work/signal.log" &
  pids+=($!)
  wait_http "http://127.0.0.1:$port/readyz"
  urls+=(--signal-url "http://127.0.0.1:$port")
done
"$floe" loadtest --json "$work/multi-transfer.json" transfer "${urls[@]}" \
  --control-url "http://127.0.0.1:$cp" --key-id "$kid" --key-secret "$ksecret" --tenant bench \
  --pairs "$PAIRS" --bytes "$BYTES" --join-rate 200 --timeout-secs 300
