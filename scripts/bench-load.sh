#!/usr/bin/env bash
# The big load scenario on this machine:
#  1. against `floe dev`: 10,000 signal-only peers on its one node, then
#     PAIRS pairs relaying BYTES each way through TURN over UDP (ledger
#     reconciled), then the same over TCP with a tenth of the pairs
#     reconnecting their signaling mid-transfer;
#  2. against a multi-node setup: two signal nodes on one Redis, separate
#     TURN and control-plane processes, the UDP transfer scenario with
#     peers spread over both signal nodes, then 10,000 signal-only peers
#     spread over both.
# Ends with a table of the headline figures, each run against the first.
#
#   scripts/bench-load.sh [PAIRS] [BYTES]     (default 1000 pairs, 1 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS="${1:-1000}"
BYTES="${2:-1048576}"
source scripts/bench-lib.sh
field() { python3 -c "import json,sys; print(json.load(open('$1'))['$2'])"; }

echo "== floe dev: 10000 signal-only peers, then $PAIRS pairs x $BYTES B each way over UDP, then over TCP with churn"
FLOE_LOG=warn "$floe" dev --data-dir "$work/dev" --signal-port 0 --control-port 0 \
  --turn-port 0 --turn-http-port 0 >"$work/dev.out" 2>"$work/dev.err" &
pids+=($!)
dev_pid=$!
for _ in $(seq 200); do [ -f "$work/dev/endpoints.json" ] && break; sleep 0.05; done
ep="$work/dev/endpoints.json"
# Signal-only first, so memory per connection is measured on a fresh process.
"$floe" loadtest --json "$work/dev-signal.json" signal --signal-url "$(field "$ep" signal_url)" \
  --key-id "$(field "$ep" api_key_id)" --key-secret "$(field "$ep" api_key_secret)" \
  --peers 10000 --rounds 5 --join-rate 2000 --server-pid "$dev_pid"
"$floe" loadtest --json "$work/dev-transfer.json" transfer --signal-url "$(field "$ep" signal_url)" \
  --control-url "$(field "$ep" control_url)" --key-id "$(field "$ep" api_key_id)" \
  --key-secret "$(field "$ep" api_key_secret)" --pairs "$PAIRS" --bytes "$BYTES" --join-rate 200 --timeout-secs 300
"$floe" loadtest --json "$work/dev-transfer-tcp.json" transfer --signal-url "$(field "$ep" signal_url)" \
  --control-url "$(field "$ep" control_url)" --key-id "$(field "$ep" api_key_id)" \
  --key-secret "$(field "$ep" api_key_secret)" --pairs "$PAIRS" --bytes "$BYTES" --join-rate 200 --timeout-secs 300 \
  --turn-transport tcp --churn 0.1
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
signal_pids=()
for n in 0 1; do
  port=$(free_port)
  FLOE_LOG=warn "$floe" signal --listen "127.0.0.1:$port" --ops-listen 127.0.0.1:0 --control-url "http://127.0.0.1:$cp" \
    --internal-token "$INTERNAL" --redis-url "redis://127.0.0.1:$rport" --node-id "node$n" \
    --max-connections-per-ip 100000 2>>"$work/signal.log" &
  pids+=($!)
  signal_pids+=($!)
  wait_http "http://127.0.0.1:$port/readyz"
  urls+=(--signal-url "http://127.0.0.1:$port")
done
"$floe" loadtest --json "$work/multi-transfer.json" transfer "${urls[@]}" \
  --control-url "http://127.0.0.1:$cp" --key-id "$kid" --key-secret "$ksecret" --tenant bench \
  --pairs "$PAIRS" --bytes "$BYTES" --join-rate 200 --timeout-secs 300
"$floe" loadtest --json "$work/multi-signal.json" signal "${urls[@]}" --tenant bench \
  --key-id "$kid" --key-secret "$ksecret" --peers 10000 --rounds 5 --join-rate 2000 \
  --server-pid "${signal_pids[0]}" --server-pid "${signal_pids[1]}"

echo "== headline figures (ratio against the first run of each kind)"
python3 - "$work" <<'PY'
import json, sys, os
w = sys.argv[1]
load = lambda n: json.load(open(os.path.join(w, n + ".json")))
runs = [("dev UDP", "dev-transfer"), ("dev TCP + 10% churn", "dev-transfer-tcp"), ("2 nodes UDP", "multi-transfer")]
base = None
print(f"{'transfer run':<22}{'verified':>9}{'failed':>7}{'peak peers':>11}{'goodput Mbit/s':>15}{'ratio':>7}{'client CPU %':>13}{'ledger':>8}")
for name, f in runs:
    r = load(f)
    base = base or r["goodput_mbps"] or 1
    ledger = "exact" if r["reconciled"] else ("consist" if r["consistent"] else "MISMATCH")
    print(f"{name:<22}{r['transfers_verified']:>9}{r['transfers_failed']:>7}{r['peak_transferring_peers']:>11}"
          f"{r['goodput_mbps']:>15.1f}{r['goodput_mbps']/base:>7.2f}{r['client_cpu_percent']:>13.0f}{ledger:>8}")
print(f"{'signal-only run':<22}{'connected':>10}{'lost':>6}{'KiB/conn':>9}{'µs CPU/msg':>11}{'offer→answer p99 ms':>20}{'ratio':>7}")
base = None
for name, f in [("dev, 1 node", "dev-signal"), ("2 nodes on Redis", "multi-signal")]:
    r = load(f)
    s = r.get("server") or {}
    p99 = (r.get("offer_answer_ms") or {}).get("p99", 0)
    base = base or p99 or 1
    print(f"{name:<22}{r['connected']:>10}{r['messages_lost']:>6}{s.get('memory_per_connection_bytes', 0)/1024:>9.2f}"
          f"{s.get('cpu_per_message_us', 0):>11.1f}{p99:>20.1f}{p99/base:>7.2f}")
PY
