#!/usr/bin/env bash
# Browser transfer benchmark: SIZE MiB of random data between two Chromium
# contexts on this machine, four ways in one run, each verified by SHA-256:
#   - the file-share app on a direct path,
#   - a bare RTCDataChannel send loop (same chunks and backpressure): the ceiling,
#   - the app forced through floe's TURN,
#   - the app forced through coturn.
# floe runs as separate processes (control plane, signal serving the app,
# TURN); the coturn run has its own control plane and signal node whose
# ICE servers name coturn (TURN REST credentials, one shared secret).
#   scripts/bench-web.sh [SIZE_MIB]      (default 256)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE="${1:-256}"
command -v turnserver >/dev/null || { echo "coturn is not installed (apt-get install coturn)" >&2; exit 1; }
[ -x /usr/bin/chromium ] || { echo "chromium is not installed (apt-get install chromium)" >&2; exit 1; }
[ -d web/node_modules ] || (cd web && npm ci --no-audit --no-fund --loglevel=error)
source scripts/bench-lib.sh

ADMIN="bench-admin-token-0123456789"
INTERNAL="bench-internal-token-0123456789"
SECRET="bench-turn-secret-0123456789"

turn_port=$(free_port)
FLOE_LOG=warn "$floe" turn --listen "127.0.0.1:$turn_port" --http-listen "127.0.0.1:$(free_port)" \
  --turn-secrets "k1=$SECRET" --allow-peer 127.0.0.0/8 --relay-ip 127.0.0.1 \
  --relay-port-min 30000 --relay-port-max 39999 2>>"$work/turn.log" &
pids+=($!)
coturn_port=$(free_port)
turnserver -n --no-cli --no-tls --no-dtls --listening-ip 127.0.0.1 --relay-ip 127.0.0.1 \
  --listening-port "$coturn_port" --min-port 40000 --max-port 44999 --use-auth-secret \
  --static-auth-secret "$SECRET" --realm floe --allow-loopback-peers --no-multicast-peers \
  --log-file "$work/coturn.log" --simple-log >/dev/null 2>&1 &
pids+=($!)

# A control plane and a signal node serving the app, whose TURN listens on
# port $1; sets $stack_url to the signal node's URL.
stack() {
  local cp sig
  cp=$(free_port); sig=$(free_port)
  FLOE_LOG=warn "$floe" control-plane --listen "127.0.0.1:$cp" --store "$work/cp-$cp.redb" \
    --admin-token "$ADMIN" --internal-token "$INTERNAL" --turn-secrets "k1=$SECRET" \
    --stun-url "stun:127.0.0.1:$1" --turn-url "turn:127.0.0.1:$1?transport=udp" \
    --api-rate 100000 >/dev/null 2>>"$work/cp.log" &
  pids+=($!)
  wait_http "http://127.0.0.1:$cp/readyz"
  FLOE_CONTROL_URL="http://127.0.0.1:$cp" FLOE_ADMIN_TOKEN="$ADMIN" \
    "$floe" tenant create --id bench --name bench --turn true --public-rooms true >/dev/null
  FLOE_LOG=warn "$floe" signal --listen "127.0.0.1:$sig" --ops-listen 127.0.0.1:0 \
    --control-url "http://127.0.0.1:$cp" --internal-token "$INTERNAL" \
    --serve-app --app-tenant bench >/dev/null 2>>"$work/signal.log" &
  pids+=($!)
  wait_http "http://127.0.0.1:$sig/readyz"
  stack_url="http://127.0.0.1:$sig"
}
stack "$turn_port"
floe_stack="$stack_url"
stack "$coturn_port"
coturn_stack="$stack_url"

run() { (cd web && node bench/transfer.mjs "$@") | tee -a "$work/results.jsonl"; }
echo "== $SIZE MiB, one Chromium, two contexts"
run app "$floe_stack" "$SIZE"
run bare "$SIZE"
run app "$floe_stack" "$SIZE" relay
LABEL=app-relayed-coturn run app "$coturn_stack" "$SIZE" relay

python3 - "$work/results.jsonl" <<'PY'
import json, sys
by = {r["mode"]: r for r in (json.loads(l) for l in open(sys.argv[1]) if l.strip())}
print("\nsummary")
for k in ["app-direct", "bare-datachannel", "app-relayed", "app-relayed-coturn"]:
    r = by.get(k)
    if r:
        print(f"  {k:20s} {r['mbit_s']:8.1f} Mbit/s  ({r['seconds']:.2f} s, path {r['path']})")
d, b, f, c = (by.get(k, {}).get("mbit_s") for k in ["app-direct", "bare-datachannel", "app-relayed", "app-relayed-coturn"])
if d and b: print(f"  app / bare loop:        {d / b:.2f}x  (goal >= 0.8)")
if f and c: print(f"  floe relay / coturn:    {f / c:.2f}x  (goal >= 1.0)")
PY
