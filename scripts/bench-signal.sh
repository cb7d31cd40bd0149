#!/usr/bin/env bash
# Signal benchmark: one signal node (in-process bus) and a two-node Redis
# setup, each driven by `floe loadtest signal` on loopback. Reports server
# memory per connection, CPU per connection set-up (signal and control
# plane) and per relayed message, from /proc of the server processes; and
# the same client against a PeerJS server (`peer` from web/'s npm
# dependencies) as the baseline.
#
#   scripts/bench-signal.sh [PEERS] [ROUNDS]     (default 10000 peers, 10 rounds)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS="${1:-10000}"
ROUNDS="${2:-10}"
source scripts/bench-lib.sh

ADMIN="bench-admin-token-0123456789"
INTERNAL="bench-internal-token-0123456789"
cp_port=$(free_port)
"$floe" control-plane --listen "127.0.0.1:$cp_port" --store "$work/cp.redb" \
  --admin-token "$ADMIN" --internal-token "$INTERNAL" \
  --turn-secrets "k1=bench-turn-secret-0123456789" --stun-url "stun:127.0.0.1:3478" \
  --turn-url "turn:127.0.0.1:3478?transport=udp" --api-rate 100000 2>"$work/cp.log" &
pids+=($!)
cp_pid=$!
wait_http "http://127.0.0.1:$cp_port/readyz"
export FLOE_CONTROL_URL="http://127.0.0.1:$cp_port" FLOE_ADMIN_TOKEN="$ADMIN"
"$floe" tenant create --id bench --name bench --turn true --public-rooms true >/dev/null
key=$("$floe" tenant --json create-key bench)
export FLOE_KEY_ID=$(echo "$key" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
export FLOE_KEY_SECRET=$(echo "$key" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')

signal_node() { # port [redis-url] [node-id]
  local args=(signal --listen "127.0.0.1:$1" --ops-listen 127.0.0.1:0 --control-url "http://127.0.0.1:$cp_port" \
    --internal-token "$INTERNAL" --max-connections-per-ip 100000 --messages-per-sec 1000)
  [ -n "${2:-}" ] && args+=(--redis-url "$2" --redis-prefix "bench:" --node-id "$3")
  FLOE_LOG=warn "$floe" "${args[@]}" 2>>"$work/signal.log" &
  pids+=($!)
  wait_http "http://127.0.0.1:$1/readyz"
}

echo "== one node, in-process bus: $PEERS peers, $ROUNDS offer/answer rounds per pair"
s1=$(free_port)
signal_node "$s1"
spid=${pids[-1]}
"$floe" loadtest --json "$work/single.json" signal --signal-url "http://127.0.0.1:$s1" \
  --peers "$PEERS" --rounds "$ROUNDS" --join-rate 2000 --hold-secs 3 --server-pid "$spid" \
  --control-pid "$cp_pid"
kill "$spid"; wait "$spid" 2>/dev/null || true

peerjs=web/node_modules/peer/dist/bin/peerjs.js
if [ -f "$peerjs" ] && command -v node >/dev/null; then
  echo "== baseline: PeerJS server, same client, same peers and rounds"
  pj=$(free_port)
  node "$peerjs" --port "$pj" --host 127.0.0.1 --concurrent_limit 1000000 >"$work/peerjs.log" 2>&1 &
  pids+=($!); pjpid=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$pj/" >/dev/null 2>&1 && break; sleep 0.1; done
  "$floe" loadtest --json "$work/peerjs.json" signal --protocol peerjs --signal-url "http://127.0.0.1:$pj" \
    --peers "$PEERS" --rounds "$ROUNDS" --join-rate 2000 --hold-secs 3 --server-pid "$pjpid"
  kill "$pjpid"; wait "$pjpid" 2>/dev/null || true
else
  echo "(PeerJS baseline skipped: run 'npm ci' in web/ first)"
fi

if command -v redis-server >/dev/null; then
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >/dev/null &
  pids+=($!)
  for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
  redis="redis://127.0.0.1:$rport"
  half=$(( PEERS / 5 ))
  echo "== one node on the Redis bus: $half peers (baseline for the cross-node cost)"
  r0=$(free_port); signal_node "$r0" "$redis" rb0; rb0=${pids[-1]}
  "$floe" loadtest --json "$work/redis1.json" signal --signal-url "http://127.0.0.1:$r0" \
    --peers "$half" --rounds "$ROUNDS" --join-rate 2000 --hold-secs 1 --server-pid "$rb0"
  echo "== two nodes on the Redis bus, every pair split across them: $half peers"
  r1=$(free_port); signal_node "$r1" "$redis" rb1; rb1=${pids[-1]}
  "$floe" loadtest --json "$work/redis2.json" signal --signal-url "http://127.0.0.1:$r0" \
    --signal-url "http://127.0.0.1:$r1" --peers "$half" --rounds "$ROUNDS" --join-rate 2000 \
    --hold-secs 1 --server-pid "$rb0" --server-pid "$rb1"
  echo "== failover: $PEERS peers on one node of two (Redis bus); kill -9 it; they reconnect to the other"
  f0=$(free_port); signal_node "$f0" "$redis" fo0; fo0=${pids[-1]}
  f1=$(free_port); signal_node "$f1" "$redis" fo1; fo1=${pids[-1]}
  "$floe" loadtest --json "$work/failover.json" failover --signal-url "http://127.0.0.1:$f0" \
    --failover-url "http://127.0.0.1:$f1" --peers "$PEERS" --join-rate 2000 \
    --ready-file "$work/failover.ready" --server-pid "$fo1" &
  lt=$!
  for _ in $(seq 1200); do [ -s "$work/failover.ready" ] && break; sleep 0.1; done
  { kill -9 "$fo0"; wait "$fo0"; } 2>/dev/null || true
  wait "$lt"
  python3 - "$work" <<'PY'
import json, sys
w = sys.argv[1]
single = json.load(open(f"{w}/single.json"))
try:
    peerjs = json.load(open(f"{w}/peerjs.json"))
except OSError:
    peerjs = None
one = json.load(open(f"{w}/redis1.json"))
two = json.load(open(f"{w}/redis2.json"))
def s(r, k): return (r.get("server") or {}).get(k, float("nan"))
print("\nsummary")
print(f"  in-process bus : {s(single,'memory_per_connection_bytes')/1024:.2f} KiB/conn, "
      f"{s(single,'cpu_per_connection_us'):.1f} us CPU/join, {s(single,'cpu_per_message_us'):.1f} us CPU/msg, "
      f"lost {single['messages_lost']}")
print(f"  Redis, 1 node  : {s(one,'cpu_per_message_us'):.1f} us CPU/msg, p50 RTT {one['offer_answer_ms']['p50']:.2f} ms")
# With two nodes each message crosses nodes; node 0 sends half and receives half.
print(f"  Redis, 2 nodes : {s(two,'cpu_per_message_us'):.1f} us CPU/msg over both nodes (every message crosses), "
      f"p50 RTT {two['offer_answer_ms']['p50']:.2f} ms, lost {two['messages_lost']}")
cp_us = (single.get("server") or {}).get("control_cpu_per_connection_us") or 0.0
join = s(single, 'cpu_per_connection_us') + cp_us
room = s(single, 'cpu_per_room_us')
print(f"  join, floe      : {s(single,'cpu_per_connection_us'):.1f} us signal + {cp_us:.1f} us control plane = {join:.1f} us CPU "
      f"(creating a room: {room:.1f} us more, {room/2:.1f} us per peer of a pair)")
if peerjs:
    pj_join, pj_msg = s(peerjs, 'cpu_per_connection_us'), s(peerjs, 'cpu_per_message_us')
    print(f"  join, PeerJS    : {pj_join:.1f} us CPU; {pj_msg:.1f} us CPU/msg; "
          f"{s(peerjs,'memory_per_connection_bytes')/1024:.2f} KiB/conn; lost {peerjs['messages_lost']}")
    print(f"  floe / PeerJS   : join {join/pj_join:.2f}x ({(join + room/2)/pj_join:.2f}x with room creation), "
          f"message {s(single,'cpu_per_message_us')/pj_msg:.2f}x, "
          f"memory {s(single,'memory_per_connection_bytes')/s(peerjs,'memory_per_connection_bytes'):.2f}x")
base = s(single, 'cpu_per_message_us')
print(f"  cross-node / in-process CPU per message: {s(two,'cpu_per_message_us')/base:.2f}x")
fo = json.load(open(f"{w}/failover.json"))
print(f"  failover       : {fo['reconnected']}/{fo['dropped']} peers back on the surviving node in "
      f"{fo['all_back_seconds'] or float('nan'):.2f} s, all pairs signalling in {fo['all_signalling_seconds'] or float('nan'):.2f} s, "
      f"{fo['server_cpu_per_reconnect_us'] or float('nan'):.1f} us CPU per reconnect")
PY
else
  echo "(redis-server not installed: skipping the Redis bus; scripts/test.sh installs it)"
fi
