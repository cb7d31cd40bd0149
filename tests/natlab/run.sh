#!/usr/bin/env bash
# The NAT lab: browsers behind real NATs, built from Linux network
# namespaces on this machine and torn down on exit, even after a failure.
#
#   public segment  203.0.113.0/24, a bridge in namespace <lab>-pub holding
#                   floe (203.0.113.10, and 203.0.113.11 for RFC 5780) as
#                   separate `floe control-plane`, `floe turn` and two
#                   `floe signal` processes (no `floe dev`, no --allow-peer)
#   site 1, 2       cone NAT: nftables masquerade (endpoint-independent
#                   mapping, address-and-port-dependent filtering)
#   site 3, 4       symmetric NAT: masquerade random (a new port per
#                   destination)
#   each site       a router namespace (203.0.113.2N on the bridge, LAN
#                   198.51.100.64(N-1)/26) and a host namespace behind it
#                   where one Chromium runs
#
# Only documentation ranges, only inside the namespaces made here; nothing
# routes outside them. Each site's NAT is labelled with `floe stun-probe`
# (RFC 5780) before tests/natlab/browsers.mjs drives the browsers through
# the cases. Skipped, with a line that says why, where the machine does not
# allow network namespaces.
#
# Usage: tests/natlab/run.sh [FLOE_BINARY]   (scripts/test.sh runs it)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
floe="${1:-${FLOE_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/floe/target}/debug/floe}}"
chromium="${CHROMIUM:-/usr/bin/chromium}"

skip() { echo "natlab: skipped: $*"; exit 0; }
[ "$(id -u)" -eq 0 ] || skip "network namespaces need root (run as root, or in CI)"
command -v ip >/dev/null || skip "iproute2's ip is not installed"
command -v nft >/dev/null || skip "nftables' nft is not installed (scripts/test.sh installs it)"
[ -x "$chromium" ] || skip "no Chromium at $chromium"
[ -x "$floe" ] || { echo "natlab: no floe binary at $floe" >&2; exit 1; }
[ -d "$root/web/node_modules/playwright-core" ] || { echo "natlab: run 'npm ci' in web/ first" >&2; exit 1; }
probe_ns="natlab-probe-$$"
ip netns add "$probe_ns" 2>/dev/null || skip "this machine does not allow network namespaces (ip netns add failed)"
ip netns del "$probe_ns"

lab="nl$$"
work="$(mktemp -d -t floe-natlab.XXXXXX)"
pids=()
namespaces=()
cleanup() {
  local status=$?
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  # Whatever still runs inside the lab (a browser of a killed driver).
  for ns in "${namespaces[@]}"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  if [ "$status" -ne 0 ]; then
    echo "natlab: failed; the floe logs:" >&2
    for log in "$work"/*.log; do echo "--- $log" >&2; tail -n 30 "$log" >&2; done
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ns() { namespaces+=("$1"); ip netns add "$1"; ip -n "$1" link set lo up; }

# --- The public segment -------------------------------------------------
pub="$lab-pub"
ns "$pub"
ip -n "$pub" link add br0 type bridge
ip -n "$pub" link set br0 up
ip -n "$pub" addr add 203.0.113.10/24 dev br0
ip -n "$pub" addr add 203.0.113.11/24 dev br0

# --- Sites: a NAT router and a host behind it -----------------------------
kinds=(cone cone symmetric symmetric)
for i in 1 2 3 4; do
  kind="${kinds[$((i - 1))]}"
  router="$lab-r$i" host="$lab-h$i" base=$((64 * (i - 1)))
  ns "$router"
  ns "$host"
  ip -n "$pub" link add "p$i" type veth peer name wan netns "$router"
  ip -n "$pub" link set "p$i" master br0 up
  ip -n "$router" addr add "203.0.113.$((20 + i))/24" dev wan
  ip -n "$router" link set wan up
  ip -n "$router" link add lan type veth peer name eth0 netns "$host"
  ip -n "$router" addr add "198.51.100.$((base + 1))/26" dev lan
  ip -n "$router" link set lan up
  ip -n "$host" addr add "198.51.100.$((base + 10))/26" dev eth0
  ip -n "$host" link set eth0 up
  ip -n "$host" route add default via "198.51.100.$((base + 1))"
  ip netns exec "$router" sysctl -qw net.ipv4.ip_forward=1
  random=""
  [ "$kind" = symmetric ] && random=" random"
  ip netns exec "$router" nft -f - <<NFT
table ip nat {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" masquerade$random
  }
}
table ip filter {
  # Unsolicited packets are dropped before conntrack confirms an entry
  # for them, as a home router does: an entry made by a peer's early
  # check would take the port the NAT is about to map the host's own
  # check to, and hole punching between two cone NATs would fail.
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iifname "lo" accept
  }
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan" oifname "wan" accept
  }
}
NFT
  # Chromium in this site's host namespace (Playwright talks to it over
  # pipes, which cross namespaces).
  printf '#!/bin/sh\nexec ip netns exec %s %s "$@"\n' "$host" "$chromium" >"$work/chromium-$i"
  chmod +x "$work/chromium-$i"
done

# --- floe, as separate processes in the public segment ----------------------
admin="natlab-admin-token-0123456789"
internal="natlab-internal-token-0123456789"
secrets="k1=natlab-turn-secret-0123456789"
start() {
  local name="$1"; shift
  ip netns exec "$pub" env FLOE_LOG=info "$floe" --log-format json "$@" >"$work/$name.log" 2>&1 &
  pids+=("$!")
}
wait_http() {
  for _ in $(seq 150); do
    if ip netns exec "$pub" bash -c "exec 3<>/dev/tcp/${1%:*}/${1#*:}" 2>/dev/null; then return; fi
    sleep 0.1
  done
  echo "natlab: nothing listens on $1" >&2
  exit 1
}
start control-plane control-plane --listen 203.0.113.10:8090 --store "$work/control.redb" \
  --admin-token "$admin" --internal-token "$internal" --turn-secrets "$secrets" \
  --stun-url stun:203.0.113.10:3478 --turn-url "turn:203.0.113.10:3478?transport=udp" \
  --enforcement-refresh-ms 500
wait_http 203.0.113.10:8090
start turn turn --listen 203.0.113.10:3478 --alt-ip 203.0.113.11 --relay-ip 203.0.113.10 \
  --http-listen 203.0.113.10:9478 --relay-port-min 49152 --relay-port-max 49999 \
  --control-url http://203.0.113.10:8090 --internal-token "$internal" --turn-secrets "$secrets" \
  --data-dir "$work/turn" --usage-interval-secs 1
tenant() {
  ip netns exec "$pub" "$floe" tenant --control-url http://203.0.113.10:8090 --admin-token "$admin" \
    create --id "$1" --name "$1" --turn "$2" --public-rooms true >/dev/null
}
tenant paid true
tenant free false
start signal-paid signal --listen 203.0.113.10:8080 --ops-listen 203.0.113.10:9080 \
  --control-url http://203.0.113.10:8090 --internal-token "$internal" --serve-app --app-tenant paid
start signal-free signal --listen 203.0.113.10:8081 --ops-listen 203.0.113.10:9081 \
  --control-url http://203.0.113.10:8090 --internal-token "$internal" --serve-app --app-tenant free
wait_http 203.0.113.10:3478
wait_http 203.0.113.10:8080
wait_http 203.0.113.10:8081

# --- Label each site's NAT (RFC 5780) ----------------------------------------
labels=()
for i in 1 2 3 4; do
  read -r mapping filtering < <(ip netns exec "$lab-h$i" "$floe" stun-probe \
    --server 203.0.113.10:3478 --wait-ms 300 --json |
    python3 -c 'import json,sys; r = json.load(sys.stdin); print(r["mapping"], r["filtering"])')
  echo "natlab: site $i (${kinds[$((i - 1))]} NAT): mapping $mapping, filtering $filtering"
  case "${kinds[$((i - 1))]}:$mapping" in
    cone:endpoint-independent | symmetric:address-and-port-dependent) ;;
    *) echo "natlab: site $i is not the ${kinds[$((i - 1))]} NAT it was built as" >&2; exit 1 ;;
  esac
  labels+=("$mapping/$filtering")
done

# --- The browsers ------------------------------------------------------------
ip netns exec "$pub" env \
  NATLAB_DIR="$work" NATLAB_ADMIN="$admin" NATLAB_LABELS="$(IFS=,; echo "${labels[*]}")" \
  NATLAB_RESULTS="${NATLAB_RESULTS:-}" \
  timeout 240 node "$here/browsers.mjs"
